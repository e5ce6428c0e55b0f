"""PNG charts for reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _value(v: Any) -> float | None:
    if isinstance(v, dict):
        v = v.get("value")
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _series(rows: Sequence[dict[str, Any]], get) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        y = get(r)
        if y is not None:
            xs.append(int(r["round"]))
            ys.append(y)
    return xs, ys


def _save(fig, out_path: Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    _plt().close(fig)
    return out_path


def plot_metric_over_rounds(rows: Sequence[dict[str, Any]], keys: Sequence[str], out_path: Path, *, title: str,
                            ylabel: str, hlines: dict[str, float] | None = None) -> Path:
    """One line per key (values may be missing or None in some rounds)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for key in keys:
        xs, ys = _series(rows, lambda r, k=key: _value(r.get(k)))
        if xs:
            ax.plot(xs, ys, marker="o", label=key.removeprefix("eps:"))
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="grey", linewidth=1)
        ax.annotate(name, (ax.get_xlim()[0], y), fontsize=8, color="grey", va="bottom")
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, out_path)


def plot_group_rates_over_rounds(rows: Sequence[dict[str, Any]], out_path: Path, *,
                                 rates: Sequence[str] = ("tpr", "fpr"), key: str = "fairness") -> Path:
    """Per-group TPR and FPR (solid / dashed) over rounds, from each row's fairness report."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    groups = sorted({g for r in rows for g in ((r.get(key) or {}).get("groups") or {})})
    styles = ["-", "--", ":", "-."]
    for gi, g in enumerate(groups):
        for ri, rate in enumerate(rates):
            xs, ys = _series(rows, lambda r, g=g, rate=rate: _value((((r.get(key) or {}).get("groups") or {})
                                                                     .get(g) or {}).get(rate)))
            if xs:
                ax.plot(xs, ys, linestyle=styles[ri % len(styles)], marker="o", color=f"C{gi}", label=f"{g} {rate.upper()}")
    ax.set_title("Per-group rates over rounds")
    ax.set_xlabel("round")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, out_path)


GAP_KEYS = ("demographic_parity_difference", "equalized_odds_difference", "equal_opportunity_difference",
            "accuracy_difference")


def plot_gaps_over_rounds(rows: Sequence[dict[str, Any]], out_path: Path, *, key: str = "fairness") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name in GAP_KEYS:
        xs, ys = _series(rows, lambda r, n=name: _value(((r.get(key) or {}).get("gaps") or {}).get(n)))
        if xs:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_title("Fairness gaps over rounds")
    ax.set_xlabel("round")
    ax.set_ylabel("gap")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, out_path)
