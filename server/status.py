"""A short summary of a run directory (``fedpriv status``): rounds, nodes, ε per node, last metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from server.rundir import RunDir


def summarise(run_dir: str | Path) -> dict[str, Any]:
    """Read ``config.json``, ``metrics.jsonl`` and the checkpoint; never needs the model or the nodes."""
    rd = RunDir(run_dir)
    if not rd.config_path.exists() and not rd.metrics_path.exists():
        raise FileNotFoundError(f"{rd.path} is not a fedpriv run directory (no config.json or metrics.jsonl)")
    cfg = json.loads(rd.config_path.read_text()) if rd.config_path.exists() else {}
    rows = rd.read_rows()
    state_path = rd.checkpoint_dir / "state.json"
    ckpt_round = json.loads(state_path.read_text())["round"] if state_path.exists() else 0
    nodes: dict[str, dict[str, Any]] = {}
    for r in rows:
        for name, n in r.nodes.items():
            d = nodes.setdefault(name, {"rounds_trained": 0, "refusals": 0, "rejected": 0})
            status = n.get("status")
            d["rounds_trained"] += status == "ok"
            d["refusals"] += status == "refused"
            d["rejected"] += status == "rejected"
            if "epsilon" in n:
                d["epsilon"] = n["epsilon"]
            if "noise-multiplier" in n:
                d["noise_multiplier"] = n["noise-multiplier"]
            if "epsilon-budget" in n:
                d["budget"] = n["epsilon-budget"]
            if n.get("warning"):
                d["warning"] = n["warning"]
            if d.get("budget") is not None and d.get("epsilon") is not None:
                d["epsilon_left"] = max(float(d["budget"]) - float(d["epsilon"]), 0.0)
    last = rows[-1] if rows else None
    fair = last.fairness if last is not None else None
    return {
        "run_dir": str(rd.path),
        "run_id": cfg.get("fedpriv-run"),
        "rounds_planned": cfg.get("num-server-rounds"),
        "rounds_done": len(rows),
        "checkpoint_round": ckpt_round,
        "finished": (rd.model_dir / "config.json").exists() and len(rows) >= int(cfg.get("num-server-rounds", 0) or 0),
        "nodes": nodes,
        "last_accuracy": last.federated.accuracy if last is not None else None,
        "last_eval_accuracy": last.held_out.accuracy if last is not None and last.held_out is not None else None,
        "last_equalized_odds_difference": fair.headline() if fair is not None else None,
        "failed_rounds": [r.round for r in rows if r.status == "failed"],
    }
