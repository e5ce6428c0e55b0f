"""DP-SGD overhead: samples/s and peak memory, non-private vs DP, for full (ghost), head and lora.

Every configuration runs in its own fresh subprocess (so peak RSS is that configuration's alone) on the same
model, data, sequence length and batch size; the JSON printed at the end holds the side-by-side ratios.

    python benchmarks/dp_overhead.py                   # MiniLM, seq 64, batch 32 (several minutes on 2 cores)
    python benchmarks/dp_overhead.py --model tiny --steps 4   # quick check

Targets (issue "Local DP-SGD ..."): DP >= 0.9x non-private throughput for head and lora, >= 0.6x for full
with ghost clipping, DP peak memory <= 1.3x non-private.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    n = args.batch_size * args.steps
    ds = make_synthetic(n, seed=0)
    # Make every example exactly seq_len tokens so the comparison is like for like.
    ds.texts = [(t + " ") * 20 for t in ds.texts]
    enc = encode(ds, load_tokenizer(args.model), max_length=args.seq_len)
    model = build_model(ModelSpec(source=args.model, labels=("negative", "positive"), train_part=args.part))
    settings = TrainSettings(epochs=1, batch_size=args.batch_size, max_physical_batch_size=args.batch_size,
                             learning_rate=1e-4, weight_decay=0.0, warmup_ratio=0.0, seed=0)
    dp = None
    if args.dp:
        dp = DpSettings(noise_multiplier=1.0, clipping_norm=1.0,
                        grad_sample_mode=args.mode or ("ghost" if args.part == "full" else "hooks"), noise_seed=0)
    # Warm-up step outside the timing (allocations, hook registration).
    warm = enc.__class__(input_ids=enc.input_ids[: args.batch_size], labels=enc.labels[: args.batch_size])
    train_local(model, warm, settings=settings, device=torch.device("cpu"), dp=dp)
    t0 = time.perf_counter()
    res = train_local(model, enc, settings=settings, device=torch.device("cpu"), dp=dp)
    secs = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"samples_per_s": res.examples_seen / secs, "examples": res.examples_seen,
                      "seconds": secs, "peak_rss_mb": peak_kb / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="full,head,lora")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--part", default="head", help=argparse.SUPPRESS)
    ap.add_argument("--dp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    results: dict[str, dict] = {}
    for part in args.parts.split(","):
        row = {}
        for dp in (False, True):
            cmd = [sys.executable, __file__, "--worker", "--part", part, "--model", args.model,
                   "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--threads", str(args.threads)] + (["--dp"] if dp else [])
            env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            row["dp" if dp else "non_private"] = json.loads(out.stdout.strip().splitlines()[-1])
        row["throughput_ratio"] = row["dp"]["samples_per_s"] / row["non_private"]["samples_per_s"]
        row["memory_ratio"] = row["dp"]["peak_rss_mb"] / row["non_private"]["peak_rss_mb"]
        row["mode"] = "ghost" if part == "full" else "hooks"
        row["target_throughput_ratio"] = 0.6 if part == "full" else 0.9
        row["meets_targets"] = row["throughput_ratio"] >= row["target_throughput_ratio"] and row["memory_ratio"] <= 1.3
        results[part] = row
        print(f"{part}: {json.dumps(row)}", file=sys.stderr)
    print(json.dumps({"model": args.model, "seq_len": args.seq_len, "batch_size": args.batch_size,
                      "steps": args.steps, "threads": args.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
