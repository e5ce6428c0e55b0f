"""K-fold cross-validation of a whole federation (``fedpriv simulate --folds K``).

Fold k holds out fold k of *every node's* data as that node's validation set (a seeded K-way partition of the
node's rows, see :func:`common.data.kfold_split`) and trains a fresh federation on the other K-1 folds, in
``RUN_DIR/fold-k/``. Nothing is pooled: each node splits its own data.

Privacy: every fold trains on the same records again, so the folds compose. The simulated nodes keep one
state directory across folds (one accountant and one signed ledger per node and dataset), and fold k asks
each node to stay within ``budget * (k + 1) / K`` in total, so the K folds together never exceed the node's
budget and every fold's releases are in its ledger. The summary reports the total ε the folds cost.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.seeds import derived_seed
from server.rows import RoundRow
from server.rundir import RunDir
from simulations.runner import nodes_ledger_epsilon

SUMMARY_FILE = "cv.json"
METRIC_KEYS = ("accuracy", "macro_f1", "loss", "eval_accuracy", "eval_macro_f1", "eval_loss")
GAP_KEYS = ("demographic_parity_difference", "equalized_odds_difference", "equal_opportunity_difference",
            "accuracy_difference", "worst_group_accuracy")


def fold_configs(cfg: RunConfig, *, folds: int, budget: float, out: Path) -> list[RunConfig]:
    """One run config per fold: its own run directory, its held-out fold and, with DP, its cumulative ε ask."""
    if folds < 2:
        raise ValueError(f"--folds must be >= 2; got {folds}")
    base = min(cfg.epsilon, budget) if cfg.epsilon > 0 else budget
    return [cfg.replace(cv_folds=folds, cv_fold=k, out=str(out / f"fold-{k}"),
                        epsilon=base * (k + 1) / folds if cfg.dp else cfg.epsilon,
                        noise_seed=_fold_noise_seed(cfg.noise_seed, k))
            for k in range(folds)]


def _fold_noise_seed(noise_seed: int, fold: int) -> int:
    """A fixed noise seed must not repeat across folds: folds train on the same records, and two releases
    with the same noise let an observer cancel it. -1 (OS entropy) stays -1."""
    if noise_seed < 0:
        return noise_seed

    return derived_seed(noise_seed, "cv-fold", fold)


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(float(x)) else None


def fold_metrics(row: RoundRow) -> dict[str, float]:
    """The scalar metrics of one round's row: utility keys and the fairness gaps (``gap.<name>``)."""
    out = {k: v for k in METRIC_KEYS if (v := row.metric(k)) is not None}
    if row.fairness is not None:
        for k in GAP_KEYS:
            if (v := _number(row.fairness.gap(k))) is not None:
                out[f"gap.{k}"] = v
    return out


def summarize(out: Path, folds: int) -> dict[str, Any]:
    """Mean, standard deviation (n-1), min and max of each metric over the folds' last completed rounds, and
    the ε each node spent over all folds: from the nodes' own ledgers when they are in ``out/nodes`` (they
    hold every release), else the largest cumulative ε any fold's round reports, failed rounds included
    (nodes that trained in a round that failed still spent)."""
    per_fold: list[dict[str, Any]] = []
    eps: dict[str, float] = {}
    for k in range(folds):
        all_rows = RunDir(out / f"fold-{k}").read_rows()
        for r in all_rows:
            for node, e in r.epsilon.items():
                if (v := _number(e)) is not None:
                    eps[node] = max(eps.get(node, 0.0), v)
        rows = [r for r in all_rows if r.status == "ok"]
        if rows:
            per_fold.append({"fold": k, "round": rows[-1].round, **fold_metrics(rows[-1])})
    stats: dict[str, dict[str, float]] = {}
    keys = sorted({k for f in per_fold for k in f if k not in ("fold", "round")})
    for key in keys:
        vals = [f[key] for f in per_fold if key in f]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        stats[key] = {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "folds": len(vals)}
    for node, v in nodes_ledger_epsilon(out / "nodes").items():
        eps[node] = max(eps.get(node, 0.0), v)
    return {"folds": folds, "completed_folds": len(per_fold), "per_fold": per_fold, "metrics": stats,
            "epsilon_total": eps}


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    path = out / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
