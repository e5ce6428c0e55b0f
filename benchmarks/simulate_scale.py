"""Scale of the local federation: wall time and peak memory of 10, 50 and 100 virtual nodes x 2 rounds.

Each size runs ``fedpriv simulate`` (tiny model, small data per node) in a fresh process; peak memory is the
largest resident set of the whole process tree (the driver plus Ray's workers), sampled every 0.2 s.

    python benchmarks/simulate_scale.py                       # 10, 50, 100 nodes
    python benchmarks/simulate_scale.py --nodes 10 --dp       # one size, with DP-SGD on every node
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_one(nodes: int, *, per_node: int, rounds: int, dp: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedpriv", "simulate", "--model", "tiny", "--nodes", str(nodes),
               "--rounds", str(rounds), "--synthetic-size", str(nodes * per_node), "--out", str(out), "--quiet",
               "--run-config", f"min-nodes={max(1, nodes // 2)}"]
        if not dp:
            cmd.append("--no-dp")
        env = dict(os.environ, FLWR_HOME=str(Path(tmp) / "flwr"), PYTHONPATH=str(ROOT))
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(ps))
            time.sleep(0.2)
        stdout, stderr = proc.communicate()
        wall = time.perf_counter() - t0
        rows = []
        if (out / "metrics.jsonl").exists():
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return {
            "nodes": nodes,
            "rounds": rounds,
            "examples_per_node": per_node,
            "dp": dp,
            "returncode": proc.returncode,
            "wall_seconds": round(wall, 1),
            "peak_memory_mb": round(peak / 2**20, 1),
            "rounds_completed": len(rows),
            "nodes_trained_last_round": rows[-1]["nodes_trained"] if rows else 0,
            "last_accuracy": rows[-1]["accuracy"] if rows else None,
            "stderr_tail": stderr[-500:] if proc.returncode else "",
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="10,50,100")
    ap.add_argument("--per-node", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dp", action="store_true")
    args = ap.parse_args()
    results = []
    for n in [int(x) for x in args.nodes.split(",")]:
        r = run_one(n, per_node=args.per_node, rounds=args.rounds, dp=args.dp)
        print(json.dumps(r), file=sys.stderr)
        results.append(r)
    base = results[0]
    for r in results:
        r["wall_ratio_vs_smallest"] = round(r["wall_seconds"] / base["wall_seconds"], 2)
        r["memory_ratio_vs_smallest"] = round(r["peak_memory_mb"] / base["peak_memory_mb"], 2)
    print(json.dumps({"benchmark": "simulate_scale", "cpus": os.cpu_count(),
                      "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "results": results}, indent=2))


if __name__ == "__main__":
    main()
