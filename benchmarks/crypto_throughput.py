"""Encrypted container throughput and memory: encrypt and decrypt MB/s, and the peak memory of
decrypt-to-memory relative to the plaintext size. Prints one JSON object.

    python benchmarks/crypto_throughput.py                  # 256 MB, 3 repeats
    python benchmarks/crypto_throughput.py --size-mb 16 --repeats 1

Targets (issue "Encrypted local datasets"): >= 300 MB/s each way on the project's 2-core CPU; decrypt-to-memory
peak memory <= 1.5x the plaintext. MB = 2**20 bytes. Timings are medians over the repeats (best also shown);
encrypt is file to file including the fsync and rename of ``encrypt_file``. Decryption runs in a fresh
subprocess so that its memory is measured alone, two ways: growth of the resident set over the baseline
after imports (/proc/self/status VmHWM and VmRSS; Linux), and the peak of Python allocations (``tracemalloc``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_MB_S = 300.0
TARGET_MEMORY_RATIO = 1.5


def _timed(fn, repeats: int, *, before=None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``; ``before()`` runs untimed ahead of each call."""
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _memory_kib() -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak so far) of this process, from /proc/self/status (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":")
                out[name] = int(value.split()[0])
    return out


def decrypt_worker(path: str, key_file: str, repeats: int) -> None:
    """Child process: time decrypt_to_memory, then measure its peak memory (RSS and tracemalloc)."""
    sys.path.insert(0, str(ROOT))
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: F401 - imports before the baseline

    from common.crypto import KeySource, decrypt_to_memory

    src = KeySource.from_key_file(key_file)
    before = _memory_kib()
    t0 = time.perf_counter()
    data = decrypt_to_memory(path, key_source=src)
    seconds = [time.perf_counter() - t0]
    after = _memory_kib()  # the result is still alive here
    # The peak's growth, or (if startup set a higher peak) the growth of what is resident with the result alive.
    rss_growth = 1024 * max(after["VmHWM"] - before["VmHWM"], after["VmRSS"] - before["VmRSS"])
    size = len(data)
    del data
    seconds += _timed(lambda: decrypt_to_memory(path, key_source=src), repeats - 1)
    tracemalloc.start()
    decrypt_to_memory(path, key_source=src)  # the peak is recorded while the result is alive
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"seconds": seconds, "bytes": size, "rss_peak_growth": rss_growth,
                      "tracemalloc_peak": traced_peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=256, help="plaintext size in MiB (default 256)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each operation (default 3)")
    ap.add_argument("--worker", nargs=2, metavar=("PATH", "KEY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size_mb < 1 or args.repeats < 1:
        ap.error(f"--size-mb and --repeats must be >= 1, got {args.size_mb} and {args.repeats}")
    if args.worker:
        decrypt_worker(*args.worker, args.repeats)
        return
    sys.path.insert(0, str(ROOT))
    from common.crypto import (
        DEFAULT_CHUNK_SIZE,
        KeySource,
        decrypt_file,
        encrypt_bytes,
        encrypt_file,
        generate_key,
        write_key_file,
    )

    mb = float(args.size_mb)
    size = args.size_mb << 20
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "data.csv"
        with open(plain, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(1 << 20))
        key = Path(tmp) / "k"
        write_key_file(key, generate_key())
        src = KeySource.from_key_file(key)
        enc = Path(tmp) / "data.fpenc"
        back = Path(tmp) / "back.csv"
        # Outputs are removed untimed before each run, so no run pays for deleting the previous one.
        enc_s = _timed(lambda: encrypt_file(plain, enc, key_source=src), args.repeats,
                       before=lambda: enc.unlink(missing_ok=True))
        dec_file_s = _timed(lambda: decrypt_file(enc, back, key_source=src), args.repeats,
                            before=lambda: back.unlink(missing_ok=True))
        enc_mem_s = _timed(functools.partial(encrypt_bytes, plain.read_bytes(), key_source=src), args.repeats)
        out = subprocess.run([sys.executable, __file__, "--worker", str(enc), str(key), "--repeats",
                              str(args.repeats)], capture_output=True, text=True, check=True)
        dec = json.loads(out.stdout.strip().splitlines()[-1])
    assert dec["bytes"] == size

    def rate(seconds: list[float]) -> dict[str, float]:
        return {"median": round(mb / statistics.median(seconds), 1), "best": round(mb / min(seconds), 1)}

    result = {
        "benchmark": "crypto_throughput",
        "plaintext_mb": mb,
        "chunk_size": DEFAULT_CHUNK_SIZE,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_average_at_start": round(load_before, 2),
        "encrypt_mb_per_s": rate(enc_s),  # encrypt_file: file to file, with fsync + atomic rename
        "encrypt_in_memory_mb_per_s": rate(enc_mem_s),  # encrypt_bytes
        "decrypt_to_memory_mb_per_s": rate(dec["seconds"]),  # decrypt_to_memory, what a node does
        "decrypt_file_mb_per_s": rate(dec_file_s),  # decrypt_file: verify in memory, then write + fsync
        "decrypt_peak_memory_ratio_rss": round(dec["rss_peak_growth"] / size, 3),
        "decrypt_peak_memory_ratio_tracemalloc": round(dec["tracemalloc_peak"] / size, 3),
        "targets": {"mb_per_s": TARGET_MB_S, "peak_memory_ratio": TARGET_MEMORY_RATIO},
    }
    result["meets_targets"] = (
        result["encrypt_mb_per_s"]["median"] >= TARGET_MB_S
        and result["decrypt_to_memory_mb_per_s"]["median"] >= TARGET_MB_S
        and max(result["decrypt_peak_memory_ratio_rss"], result["decrypt_peak_memory_ratio_tracemalloc"])
        <= TARGET_MEMORY_RATIO
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
