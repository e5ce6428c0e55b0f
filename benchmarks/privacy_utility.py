"""Privacy/utility on SST-2 with fedpriv's defaults: dev accuracy at ε in {1, 3, 8} and without DP, 4 nodes.

Every setting is one ``fedpriv simulate`` run on the same split of ``sst2/train.tsv`` (4 nodes, Dirichlet
alpha = 1, seed 0) with ``sst2/dev.tsv`` as the server-held ``--eval-data``, δ = 1e-5. Modes:

* ``defaults`` (the default): nothing but the data flags, so the train part is ``auto`` and every training
  value comes from the recipe (docs/models.md): under DP the linear probe on the frozen, mean-pooled MiniLM,
  without DP full fine-tuning. Each ε runs ``--repeats`` times and the median is reported. The partition stays
  seed 0; the DP noise is fresh OS entropy on every run, as a user gets it (``--noise-seeds`` makes the runs
  reproducible instead: noise seeds 0..R-1, which each simulated node must then allow with
  ``--allow-fixed-noise-seed``);
* ``lora`` / ``full``: the same with ``--train-part lora`` / ``full`` and their large-batch DP recipes
  (slow on a CPU: hours for ``full``; see docs/measured-dp-utility.md for what was run).

    python benchmarks/privacy_utility.py                                  # defaults, ε 1,3,8 x 3 + no DP
    python benchmarks/privacy_utility.py --epsilons 8 --repeats 1         # one run
    python benchmarks/privacy_utility.py --mode lora --epsilons 8,inf --repeats 1

``--run-config`` adds run-config keys to every run (e.g. ``"num-server-rounds=5"``). ``--train-size N`` trains
on a seeded random sample of N rows of ``train.tsv``; the dev set is always the whole ``dev.tsv``.

Targets (issue 14): ε=8 ≥ 0.80, ε=3 ≥ 0.79, ε=1 ≥ 0.76, no DP ≥ 0.86 within 3 rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {1.0: 0.76, 3.0: 0.79, 8.0: 0.80, math.inf: 0.86}


def subsample_tsv(src: Path, dst: Path, n: int, seed: int) -> int:
    """Write a seeded random sample of ``n`` data rows of ``src`` (header kept, file order kept) to ``dst``."""
    import random

    header, *rows = src.read_text(encoding="utf-8").splitlines()
    rows = [r for r in rows if r.strip()]
    keep = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    dst.write_text("\n".join([header] + [rows[i] for i in keep]) + "\n", encoding="utf-8")
    return len(keep)


def command(eps: float, repeat: int, args: argparse.Namespace, out: Path, train: Path) -> list[str]:
    cmd = [sys.executable, "-m", "fedpriv", "simulate", "--data", str(train),
           "--eval-data", str(Path(args.data_dir) / "dev.tsv"), "--text-col", "sentence", "--label-col", "label",
           "--nodes", "4", "--partition", "dirichlet", "--alpha", "1", "--seed", "0", "--out", str(out), "--quiet"]
    if args.model != "minilm":
        cmd += ["--model", args.model]
    if args.mode != "defaults":
        cmd += ["--train-part", args.mode]
    run_config = args.run_config
    if math.isinf(eps):
        cmd.append("--no-dp")
    else:
        cmd += ["--epsilon", str(eps), "--delta", "1e-5"]
        if args.noise_seeds:  # a node refuses a known noise seed unless its own config allows it (issue 13)
            cmd.append("--allow-fixed-noise-seed")
            run_config = f"{run_config} noise-seed={repeat}".strip()
    if run_config:
        cmd += ["--run-config", run_config]
    return cmd


def run_setting(eps: float, repeat: int, args: argparse.Namespace, tmp: Path, train: Path) -> dict:
    out = tmp / f"eps-{eps}-{repeat}"
    cmd = command(eps, repeat, args, out, train)
    env = dict(os.environ, FLWR_HOME=str(tmp / "flwr"), PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
    last = rows[-1] if rows else {}
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    budget_ok = None
    if not math.isinf(eps) and last.get("epsilon"):
        budget_ok = all(v <= eps + 1e-9 for v in last["epsilon"].values())
    # A failed run's last row is the untrained model's accuracy: report the failure, never that as a result.
    ok = proc.returncode == 0
    return {
        "epsilon_budget": "inf" if math.isinf(eps) else eps,
        "repeat": repeat,
        "returncode": proc.returncode,
        "eval_accuracy": last.get("eval_accuracy") if ok else None,
        "eval_accuracy_by_round": [r.get("eval_accuracy") for r in rows],
        "epsilon_spent": last.get("epsilon"),
        "within_budget": budget_ok,
        "train_part": config.get("train-part"),
        "recipe": {k: config.get(k) for k in ("batch-size", "local-epochs", "learning-rate", "clipping-norm",
                                               "pooling", "num-server-rounds")},
        "rounds": len(rows),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(cmd[1:]).replace(str(tmp), "OUT"),
        "stderr_tail": proc.stderr[-800:] if proc.returncode else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    ap.add_argument("--model", default="minilm", help="the model (default: fedpriv's default, MiniLM)")
    ap.add_argument("--mode", choices=("defaults", "lora", "full"), default="defaults")
    ap.add_argument("--epsilons", default="1,3,8,inf")
    ap.add_argument("--repeats", type=int, default=3, help="runs per DP setting; the median is reported")
    ap.add_argument("--noise-seeds", action="store_true",
                    help="reproducible noise: seeds 0..R-1, allowed by every simulated node's config")
    ap.add_argument("--train-size", type=int, default=0, help="subsample train.tsv to N rows (0: all)")
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--run-config", default="")
    args = ap.parse_args()
    results, summary = [], []
    train = Path(args.data_dir) / "train.tsv"
    with tempfile.TemporaryDirectory() as tmp:
        train_rows = None
        if args.train_size > 0:
            train_rows = subsample_tsv(train, Path(tmp) / "train-sample.tsv", args.train_size, args.sample_seed)
            train = Path(tmp) / "train-sample.tsv"
        for e in args.epsilons.split(","):
            eps = float(e)
            reps = 1 if math.isinf(eps) else args.repeats
            runs = []
            for r in range(reps):
                res = run_setting(eps, r, args, Path(tmp), train)
                print(json.dumps(res), file=sys.stderr, flush=True)
                runs.append(res)
            accs = [x["eval_accuracy"] for x in runs if x["eval_accuracy"] is not None]
            med = statistics.median(accs) if accs else None
            failed = [x["repeat"] for x in runs if x["returncode"] != 0]
            summary.append({"epsilon_budget": runs[0]["epsilon_budget"], "runs": len(runs),
                            "failed_runs": failed, "eval_accuracy_median": med, "eval_accuracies": accs,
                            "target": TARGETS.get(eps),
                            "target_met": None if med is None or failed else med >= TARGETS.get(eps, 0),
                            "all_within_budget": all(x["within_budget"] is not False for x in runs),
                            "wall_seconds_median": statistics.median(x["wall_seconds"] for x in runs)})
            results.extend(runs)
    print(json.dumps({"benchmark": "privacy_utility", "dataset": "sst2", "nodes": 4, "partition": "dirichlet(1), seed 0",
                      "mode": args.mode, "delta": 1e-5, "train_rows": train_rows or "all",
                      "run_config": args.run_config, "noise": "seeds 0..R-1" if args.noise_seeds else "OS entropy",
                      "summary": summary, "results": results}, indent=2))


if __name__ == "__main__":
    main()
