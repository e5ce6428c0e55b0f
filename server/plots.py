"""PNG charts of per-round metrics for run reports.

Every helper takes ``rows``, a list of per-round dicts as written to ``metrics.jsonl`` (``"round"`` plus scalar
metrics and/or a ``"fairness"`` report from :func:`common.fairness.fairness_report`), writes one PNG and returns
its path. Figures are drawn on matplotlib's Agg canvas through ``matplotlib.figure.Figure`` (no pyplot, no
global backend switch, no display), so they work on headless servers and in threads.

Values that are None, missing, non-numeric or non-finite are skipped point by point; a series with no value is
left out of the legend; a chart without any data says so instead of failing. A single round is drawn as
markers. Rows without ``"round"`` are numbered by position (1, 2, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

GAP_KEYS = ("demographic_parity_difference", "equalized_odds_difference", "equal_opportunity_difference",
            "accuracy_difference")
_STYLES = ("-", "--", ":", "-.")
_DPI = 110


def _number(v: Any) -> float | None:
    """A finite float from a scalar or a ``{"value": ...}`` dict, else None."""
    if isinstance(v, Mapping):
        v = v.get("value")
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def _series(rows: Sequence[Mapping[str, Any]], get: Callable[[Mapping[str, Any]], Any]) -> tuple[list, list]:
    xs, ys = [], []
    for i, row in enumerate(rows):
        y = _number(get(row))
        if y is not None:
            xs.append(row.get("round", i + 1))
            ys.append(y)
    return xs, ys


def _report(row: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    rep = row.get(key)
    return rep if isinstance(rep, Mapping) else {}


def _new_figure(title: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.0))
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _finish(fig, ax, out_path: str | Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ncol = 1 if len(handles) <= 12 else 2
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=ncol, frameon=False)
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def plot_metric_over_rounds(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], out_path: str | Path, *,
                            title: str, ylabel: str, hlines: Mapping[str, float] | None = None) -> Path:
    """One line per top-level key of the rows (e.g. ``accuracy``, ``eps:node-0``) over rounds.

    Parameters
    ----------
    rows : sequence of dict
        Per-round dicts; ``row[key]`` may be a number, a ``{"value": ...}`` dict, None or absent.
    keys : sequence of str
        Row keys to draw; a leading ``"eps:"`` is dropped from the legend label.
    out_path : path
        PNG to write (parent folders are created).
    title, ylabel : str
    hlines : mapping of str to float, optional
        Labelled horizontal reference lines (e.g. a budget ``{"ε max": 8.0}``).

    Returns
    -------
    pathlib.Path
        ``out_path``.
    """
    fig, ax = _new_figure(title, ylabel)
    for key in keys:
        xs, ys = _series(rows, lambda r, k=key: r.get(k))
        if xs:
            ax.plot(xs, ys, marker="o", label=key.removeprefix("eps:"))
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="grey", linewidth=1, label=name)
    return _finish(fig, ax, out_path)


def plot_group_rates_over_rounds(rows: Sequence[Mapping[str, Any]], out_path: str | Path, *,
                                 rates: Sequence[str] = ("tpr", "fpr"), key: str = "fairness") -> Path:
    """Per-group rates (default TPR solid, FPR dashed; one colour per group) over rounds.

    Reads ``row[key]["groups"][group][rate]["value"]`` of each row (a binary fairness report; multiclass
    reports have only ``accuracy`` per group, so pass ``rates=("accuracy",)`` for them). Undefined rates
    (None) leave gaps in the line.
    """
    fig, ax = _new_figure("Per-group rates over rounds", "rate")
    ax.set_ylim(-0.02, 1.02)
    groups = sorted({str(g) for r in rows for g in (_report(r, key).get("groups") or {})})
    for gi, group in enumerate(groups):
        for ri, rate in enumerate(rates):
            xs, ys = _series(rows, lambda r, g=group, k=rate: ((_report(r, key).get("groups") or {}).get(g) or {}).get(k))
            if xs:
                ax.plot(xs, ys, linestyle=_STYLES[ri % len(_STYLES)], marker="o", markersize=3,
                        color=f"C{gi % 10}", label=f"{group} {rate.upper()}")
    return _finish(fig, ax, out_path)


def plot_gaps_over_rounds(rows: Sequence[Mapping[str, Any]], out_path: str | Path, *,
                          gaps: Sequence[str] = GAP_KEYS, key: str = "fairness") -> Path:
    """Fairness gaps (``row[key]["gaps"][name]["value"]``, default ``GAP_KEYS``) over rounds."""
    fig, ax = _new_figure("Fairness gaps over rounds", "gap")
    for name in gaps:
        xs, ys = _series(rows, lambda r, n=name: (_report(r, key).get("gaps") or {}).get(n))
        if xs:
            ax.plot(xs, ys, marker="o", label=name)
    return _finish(fig, ax, out_path)


def plot_trials(values: Sequence[float | None], out_path: str | Path, *, metric: str,
                title: str = "Hyperparameter search") -> Path:
    """A search's metric per trial (``fedpriv tune``): one marker per completed trial, a cross on the x axis
    for each failed one (``None``), and the best value so far as a step line.

    Parameters
    ----------
    values : sequence of float or None
        Metric of trial 1, 2, ... in order; None (or a non-finite value) for a failed trial.
    out_path : path
        PNG to write (parent folders are created).
    metric : str
        Name of the metric (the y label and the legend).
    title : str

    Returns
    -------
    pathlib.Path
        ``out_path``.
    """
    fig, ax = _new_figure(title, metric)
    ax.set_xlabel("trial")
    xs, ys, failed = [], [], []
    best_x, best_y = [], []
    best = None
    for i, v in enumerate(values, start=1):
        y = _number(v)
        if y is None:
            failed.append(i)
            continue
        xs.append(i)
        ys.append(y)
        best = y if best is None else max(best, y)
        best_x.append(i)
        best_y.append(best)
    if xs:
        ax.plot(xs, ys, linestyle="none", marker="o", label=metric)
        ax.step(best_x, best_y, where="post", color="grey", linewidth=1, label="best so far")
    if failed:
        ax.plot(failed, [0.0 if not ys else min(ys)] * len(failed), linestyle="none", marker="x", color="C3",
                label="failed")
    return _finish(fig, ax, out_path)


def plot_epsilon_against_budget(spent: Mapping[str, Sequence[tuple[int, float]]], out_path: str | Path, *,
                                budgets: Mapping[str, float | None],
                                refused: Mapping[str, Sequence[int]] | None = None) -> Path:
    """ε spent per node over rounds, each node's budget as a dashed line of the same colour, y-axis from 0.

    Parameters
    ----------
    spent : mapping of node name to sequence of (round, ε)
        Cumulative ε after each round the node released in; a ``(0, ε)`` point is what the node had spent
        before this run (0 for a fresh node). Non-finite values are skipped.
    out_path : path
        PNG to write (parent folders are created).
    budgets : mapping of node name to float or None
        The node's ε budget (from its ledger); None draws no budget line for that node.
    refused : mapping of node name to sequence of int, optional
        Rounds the node refused to train in: a cross at the node's ε at that point.

    Returns
    -------
    pathlib.Path
        ``out_path``.
    """
    fig = epsilon_figure(spent, budgets=budgets, refused=refused)
    return _finish(fig, fig.axes[0], out_path)


def epsilon_figure(spent: Mapping[str, Sequence[tuple[int, float]]], *, budgets: Mapping[str, float | None],
                   refused: Mapping[str, Sequence[int]] | None = None):
    """The figure :func:`plot_epsilon_against_budget` saves (same arguments), for inspection in tests."""
    fig, ax = _new_figure("ε spent per node against its budget (dashed)", "ε (cumulative)")
    top = 0.0
    names = sorted(set(spent) | set(budgets))
    for i, node in enumerate(names):
        colour = f"C{i % 10}"
        # nodes often spend alike: earlier nodes are drawn wider so that coinciding lines stay visible
        width = 1.5 + 3.0 * (len(names) - 1 - i) / max(len(names) - 1, 1)
        xs, ys = _series([{"round": r, "v": e} for r, e in spent.get(node, ())], lambda r: r.get("v"))
        if xs:
            ax.plot(xs, ys, marker="o", color=colour, linewidth=width, markersize=2 + width, label=f"{node} spent")
            top = max(top, *ys)
        budget = _number(budgets.get(node))
        if budget is not None:
            ax.axhline(budget, linestyle="--", color=colour, linewidth=width * 0.8, label=f"{node} budget {budget:g}")
            top = max(top, budget)
        for r in (refused or {}).get(node, ()):
            before = [y for x, y in zip(xs, ys, strict=True) if x <= r]
            ax.plot([r], [before[-1] if before else 0.0], marker="x", markersize=9, linestyle="none",
                    color=colour, label=f"{node} refused" if r == (refused or {})[node][0] else None)
    ax.set_ylim(0.0, top * 1.08 if top > 0 else 1.0)
    return fig
