"""DP-SGD overhead: samples/s and peak memory, non-private vs DP, for full (ghost), head and lora.

All configurations use the same model, data, sequence length, logical batch size and physical batch cap; the
JSON printed at the end holds the side-by-side ratios. Per part:

* throughput: one subprocess alternates non-private and DP epochs (after one warm-up epoch of each) for
  ``--repeats`` rounds and reports per-sample throughput (examples seen / seconds; DP sees a Poisson number of
  examples). The ratio uses each variant's best repetition (least disturbed by other load on the machine) and
  the median is reported too. Alternating in one process keeps both variants under the same machine load;
* memory: one fresh subprocess per variant (warm-up + one epoch), so its peak RSS is that variant's alone.

For ghost-clipping parts a third variant, ``dp_opacus``, runs the same DP step with Opacus' own two-pass
ghost clipping in the same alternation, so the speed-up of fedpriv's trimmed first pass (client/ghost.py) is
measured side by side (``speedup_vs_opacus_ghost``).

Parts are ``full`` (ghost clipping), ``head`` (the product default: classifier + pooler, top-k-layers 0),
``classifier`` (the output layer alone), ``head:K`` (also the top K encoder layers) and ``lora``;
``PART:K:MODE`` forces a grad-sample mode.

    python benchmarks/dp_overhead.py                   # MiniLM, seq 64, batch 32 (about 15 min on 2 cores)
    python benchmarks/dp_overhead.py --model tiny --steps 2 --repeats 1   # quick check

Targets (issue "Local DP-SGD ..."): DP >= 0.9x non-private throughput for head, classifier and lora, >= 0.6x
for full with ghost clipping, DP peak memory <= 1.3x non-private.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_part(spec: str) -> tuple[str, int, str]:
    """``full`` | ``head`` | ``head:2`` | ``lora`` | ``head:2:ghost`` -> (part, top_k_layers, grad_sample_mode)."""
    bits = spec.split(":")
    part = bits[0]
    k = int(bits[1]) if len(bits) > 1 and bits[1] else 0
    mode = bits[2] if len(bits) > 2 else ("ghost" if part == "full" else "hooks")
    return part, k, mode


def worker(args: argparse.Namespace) -> None:
    import resource
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from client.train import DpSettings, TrainSettings, train_local
    from common.data import encode
    from common.model import ModelSpec, build_model, load_tokenizer
    from simulations.synthetic import make_synthetic

    torch.set_num_threads(args.threads)
    part, k, mode = parse_part(args.part)
    n = args.batch_size * args.steps
    ds = make_synthetic(n, seed=0)
    # Make every example exactly seq_len tokens so the comparison is like for like.
    ds.texts = [(t + " ") * 20 for t in ds.texts]
    enc = encode(ds, load_tokenizer(args.model), max_length=args.seq_len)
    model = build_model(ModelSpec(source=args.model, labels=("negative", "positive"), train_part=part,
                                  top_k_layers=k))
    phys = args.max_physical_batch_size or 2 * args.batch_size
    settings = TrainSettings(epochs=1, batch_size=args.batch_size, max_physical_batch_size=phys,
                             learning_rate=1e-4, weight_decay=0.0, warmup_ratio=0.0, seed=0)
    dp = DpSettings(noise_multiplier=1.0, clipping_norm=1.0, grad_sample_mode=mode, noise_seed=0)
    # dp_opacus: the same DP step with Opacus' own two-pass ghost clipping, for the side-by-side speed-up
    variants = {"non_private": None, "dp": dp,
                "dp_opacus": DpSettings(noise_multiplier=1.0, clipping_norm=1.0, grad_sample_mode="ghost-opacus",
                                        noise_seed=0)}
    names = args.variants.split(",")
    cpu = torch.device("cpu")
    # Warm-up epoch of each variant outside the timing (first-call imports, allocations, kernel selection).
    warm = enc.__class__(input_ids=enc.input_ids[: args.batch_size], labels=enc.labels[: args.batch_size])
    for name in names:
        train_local(model, warm, settings=settings, device=cpu, dp=variants[name])
    rss_before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            t0, c0 = time.perf_counter(), time.process_time()
            res = train_local(model, enc, settings=settings, device=cpu, dp=variants[name])
            secs, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            runs[name].append({"samples_per_s": res.examples_seen / secs, "examples": res.examples_seen,
                               "seconds": round(secs, 2), "cpu_seconds": round(cpu_s, 2)})
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    for name, rs in runs.items():
        rates = [r["samples_per_s"] for r in rs]
        out[name] = {"samples_per_s_best": max(rates), "samples_per_s_median": statistics.median(rates),
                     "runs": rs}
    print(json.dumps({"variants": out, "peak_rss_mb": peak_kb / 1024, "rss_before_timed_mb": rss_before,
                      "top_k_layers": k, "grad_sample_mode": mode, "max_physical_batch_size": phys}))


def _run_worker(args: argparse.Namespace, part: str, variants: str, steps: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--part", part, "--model", args.model,
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--steps", str(steps),
           "--threads", str(args.threads), "--variants", variants, "--repeats", str(repeats),
           "--max-physical-batch-size", str(args.max_physical_batch_size)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-physical-batch-size", type=int, default=0,
                    help="physical batch cap for both variants (0: 2x batch size, so a Poisson draw is not split)")
    ap.add_argument("--steps", type=int, default=4, help="logical batches per timed epoch")
    ap.add_argument("--repeats", type=int, default=3, help="alternating non-private/DP epochs for throughput")
    ap.add_argument("--memory-steps", type=int, default=2, help="logical batches in each memory subprocess")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="full,head,classifier,lora,head:2")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--part", default="head", help=argparse.SUPPRESS)
    ap.add_argument("--variants", default="non_private,dp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    results: dict[str, dict] = {}
    for spec in args.parts.split(","):
        part, k, mode = parse_part(spec)
        load_start = _loadavg()
        ghost = mode == "ghost"
        thr = _run_worker(args, spec, "non_private,dp,dp_opacus" if ghost else "non_private,dp", args.steps,
                          args.repeats)
        mem = {v: _run_worker(args, spec, v, args.memory_steps, 1) for v in ("non_private", "dp")}
        np_, dp_ = thr["variants"]["non_private"], thr["variants"]["dp"]
        row = {
            "part": part, "top_k_layers": k, "mode": mode, "max_physical_batch_size": thr["max_physical_batch_size"],
            "non_private": {"samples_per_s": round(np_["samples_per_s_best"], 2),
                            "samples_per_s_median": round(np_["samples_per_s_median"], 2),
                            "peak_rss_mb": round(mem["non_private"]["peak_rss_mb"], 1), "runs": np_["runs"]},
            "dp": {"samples_per_s": round(dp_["samples_per_s_best"], 2),
                   "samples_per_s_median": round(dp_["samples_per_s_median"], 2),
                   "peak_rss_mb": round(mem["dp"]["peak_rss_mb"], 1), "runs": dp_["runs"]},
            "throughput_ratio": round(dp_["samples_per_s_best"] / np_["samples_per_s_best"], 3),
            "throughput_ratio_median": round(dp_["samples_per_s_median"] / np_["samples_per_s_median"], 3),
            "memory_ratio": round(mem["dp"]["peak_rss_mb"] / mem["non_private"]["peak_rss_mb"], 3),
            "target_throughput_ratio": 0.6 if part == "full" else 0.9,
            "loadavg_start_end": [load_start, _loadavg()],
        }
        if ghost:  # fedpriv's trimmed ghost clipping vs Opacus' own, same process, alternating
            op = thr["variants"]["dp_opacus"]
            row["dp_opacus_ghost"] = {"samples_per_s": round(op["samples_per_s_best"], 2),
                                      "samples_per_s_median": round(op["samples_per_s_median"], 2), "runs": op["runs"]}
            row["opacus_ghost_throughput_ratio"] = round(op["samples_per_s_best"] / np_["samples_per_s_best"], 3)
            row["speedup_vs_opacus_ghost"] = round(dp_["samples_per_s_best"] / op["samples_per_s_best"], 3)
        row["meets_targets"] = (row["throughput_ratio"] >= row["target_throughput_ratio"]
                                and row["memory_ratio"] <= 1.3)
        results[spec] = row
        print(f"{spec}: {json.dumps(row)}", file=sys.stderr, flush=True)
    print(json.dumps({"model": args.model, "seq_len": args.seq_len, "batch_size": args.batch_size,
                      "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
                      "cpus": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
