"""Encrypted container throughput and memory: encrypt and decrypt MB/s of a 256 MB file, peak memory of
decrypt-to-memory relative to the plaintext size.

    python benchmarks/crypto_throughput.py              # 256 MB
    python benchmarks/crypto_throughput.py --size-mb 32

Targets (issue "Encrypted local datasets"): >= 300 MB/s each way on this CPU; decrypt-to-memory peak memory
<= 1.5x the plaintext. Peak memory is measured in a fresh subprocess as the growth of its maximum resident set
over its baseline after imports, so nothing else of this script is counted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def decrypt_worker(path: str, key_file: str) -> None:
    sys.path.insert(0, str(ROOT))
    import psutil

    from common.crypto import KeySource, decrypt_to_memory

    src = KeySource.from_key_file(key_file)
    proc = psutil.Process()
    base_rss = proc.memory_info().rss
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    data = decrypt_to_memory(path, key_source=src)
    secs = time.perf_counter() - t0
    held = proc.memory_info().rss - base_rss  # the result is still alive here
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_max
    print(json.dumps({"seconds": secs, "bytes": len(data), "peak_growth_bytes": max(held, peak)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--worker", nargs=2, metavar=("PATH", "KEY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        decrypt_worker(*args.worker)
        return
    sys.path.insert(0, str(ROOT))
    from common.crypto import KeySource, encrypt_bytes, encrypt_file, generate_key, write_key_file

    size = args.size_mb * 2**20
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "data.csv"
        with open(plain, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(2**20))
        key = Path(tmp) / "k"
        write_key_file(key, generate_key())
        src = KeySource.from_key_file(key)
        enc = Path(tmp) / "data.fpenc"
        t0 = time.perf_counter()
        encrypt_file(plain, enc, key_source=src)
        enc_s = time.perf_counter() - t0
        data = plain.read_bytes()
        t0 = time.perf_counter()
        encrypt_bytes(data, key_source=src)
        enc_mem_s = time.perf_counter() - t0
        del data
        out = subprocess.run([sys.executable, __file__, "--worker", str(enc), str(key)], capture_output=True,
                             text=True, check=True)
        dec = json.loads(out.stdout.strip().splitlines()[-1])
    mb = size / 2**20
    result = {
        "benchmark": "crypto_throughput",
        "plaintext_mb": mb,
        "encrypt_mb_per_s": round(mb / enc_s, 1),  # file to file, including fsync of the output
        "encrypt_in_memory_mb_per_s": round(mb / enc_mem_s, 1),
        "decrypt_to_memory_mb_per_s": round(mb / dec["seconds"], 1),
        "decrypt_peak_memory_ratio": round(dec["peak_growth_bytes"] / size, 3),
        "targets": {"mb_per_s": 300, "peak_memory_ratio": 1.5},
    }
    result["meets_targets"] = (result["encrypt_mb_per_s"] >= 300 and result["decrypt_to_memory_mb_per_s"] >= 300
                               and result["decrypt_peak_memory_ratio"] <= 1.5)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
