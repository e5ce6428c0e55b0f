"""Privacy/utility trade-off on SST-2: dev accuracy at ε in {1, 3, 8, inf}, δ = 1e-5, MiniLM, 4 nodes.

Every setting is one ``fedpriv simulate`` run on the same split of ``sst2/train.tsv`` (4 nodes, Dirichlet
alpha = 1) with ``sst2/dev.tsv`` as the server-held ``--eval-data``; ε = inf is the same run without DP. The
defaults are the measured configuration: ``--train-part classifier`` (a linear probe: the classifier's 770
weights train, so DP noise spread over few coordinates), 5 rounds of 2 local epochs, batch 64, the auto
learning rate (5e-2 for ``classifier``).

    python benchmarks/privacy_utility.py --data-dir ../shared/data/sst2
    python benchmarks/privacy_utility.py --data-dir ../shared/data/sst2 --epsilons 8,inf --rounds 1   # shorter
    python benchmarks/privacy_utility.py --data-dir ../shared/data/sst2 --train-size 2000 --rounds 2  # subsample

``--train-size N`` trains on a seeded random sample of N rows of ``train.tsv`` (written to a temporary TSV);
the dev set is always the whole ``dev.tsv``. ``--lr 0`` (the default) leaves the learning rate to fedpriv's
default for the train part.

Target (issue "Local DP-SGD ..."): at ε = 8 within 5 points of the non-private run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def subsample_tsv(src: Path, dst: Path, n: int, seed: int) -> int:
    """Write a seeded random sample of ``n`` data rows of ``src`` (header kept, file order kept) to ``dst``."""
    import random

    header, *rows = src.read_text(encoding="utf-8").splitlines()
    rows = [r for r in rows if r.strip()]
    keep = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    dst.write_text("\n".join([header] + [rows[i] for i in keep]) + "\n", encoding="utf-8")
    return len(keep)


def run_setting(eps: float, args: argparse.Namespace, tmp: Path, train: Path) -> dict:
    out = tmp / f"eps-{eps}"
    cmd = [sys.executable, "-m", "fedpriv", "simulate", "--data", str(train),
           "--eval-data", str(Path(args.data_dir) / "dev.tsv"), "--text-col", "sentence", "--label-col", "label",
           "--model", args.model, "--train-part", args.train_part, "--nodes", "4", "--partition", "dirichlet",
           "--alpha", "1", "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs),
           "--out", str(out), "--quiet", "--seed", "0", "--run-config", args.run_config]
    if args.lr > 0:
        cmd += ["--lr", str(args.lr)]
    if math.isinf(eps):
        cmd.append("--no-dp")
    else:
        cmd += ["--epsilon", str(eps), "--delta", "1e-5"]
    env = dict(os.environ, FLWR_HOME=str(tmp / "flwr"), PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
    last = rows[-1] if rows else {}
    return {
        "epsilon_budget": "inf" if math.isinf(eps) else eps,
        "returncode": proc.returncode,
        "eval_accuracy": last.get("eval_accuracy"),
        "eval_accuracy_by_round": [r.get("eval_accuracy") for r in rows],
        "eval_macro_f1": last.get("eval_macro_f1"),
        "epsilon_spent_max": max((last.get("epsilon") or {}).values(), default=None),
        "rounds": len(rows),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "stderr_tail": proc.stderr[-800:] if proc.returncode else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    ap.add_argument("--epsilons", default="1,3,8,inf")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--train-part", default="classifier")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.0, help="0: fedpriv's default for the train part")
    ap.add_argument("--train-size", type=int, default=0, help="subsample train.tsv to N rows (0: all)")
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--run-config", default="max-length=64 batch-size=64 max-physical-batch-size=32")
    args = ap.parse_args()
    results = []
    train = Path(args.data_dir) / "train.tsv"
    with tempfile.TemporaryDirectory() as tmp:
        train_rows = None
        if args.train_size > 0:
            train_rows = subsample_tsv(train, Path(tmp) / "train-sample.tsv", args.train_size, args.sample_seed)
            train = Path(tmp) / "train-sample.tsv"
        for e in args.epsilons.split(","):
            r = run_setting(float(e), args, Path(tmp), train)
            print(json.dumps(r), file=sys.stderr)
            results.append(r)
    base = next((r for r in results if r["epsilon_budget"] == "inf"), None)
    if base and base["eval_accuracy"] is not None:
        for r in results:
            if r["eval_accuracy"] is not None:
                r["points_below_non_private"] = round(100 * (base["eval_accuracy"] - r["eval_accuracy"]), 2)
    at8 = next((r for r in results if r["epsilon_budget"] == 8.0 and "points_below_non_private" in r), None)
    print(json.dumps({"benchmark": "privacy_utility", "dataset": "sst2", "nodes": 4, "model": args.model,
                      "train_part": args.train_part, "rounds": args.rounds, "local_epochs": args.local_epochs,
                      "delta": 1e-5,
                      "train_rows": train_rows or "all", "sample_seed": args.sample_seed if train_rows else None,
                      "lr": args.lr or "auto", "run_config": args.run_config, "results": results,
                      "target_eps8_within_5_points": None if at8 is None else at8["points_below_non_private"] <= 5},
                     indent=2))


if __name__ == "__main__":
    main()
