"""Group fairness from per-group confusion counts (nodes send counts; the server sums; metrics come from sums).

Per group g (binary task, positive class index ``positive_index``): TP, FP, FN, TN from g's confusion matrix;
n = TP+FP+FN+TN. Rates, each with a 95% Wilson score interval (Wilson 1927):

* ``selection_rate`` = (TP+FP)/n, ``accuracy`` = (TP+TN)/n,
* ``tpr`` = TP/(TP+FN), ``fnr`` = FN/(TP+FN) (undefined without positives),
* ``fpr`` = FP/(FP+TN) (undefined without negatives), ``precision`` = TP/(TP+FP) (undefined without
  predicted positives).

Gaps follow fairlearn's definitions (``between_groups``): ``demographic_parity_difference`` = max - min of
selection rates, ``demographic_parity_ratio`` = min / max; ``equalized_odds_difference`` = the larger of the
TPR and FPR differences (fairlearn's ``agg="worst_case"``), ``equalized_odds_ratio`` = the smaller of the TPR
and FPR ratios; ``equal_opportunity_difference`` = TPR difference; ``accuracy_difference``;
``worst_group_accuracy``. A group whose rate is undefined is left out of that gap and the gap names it; a
ratio with a zero maximum is undefined. Groups smaller than ``min_group_size`` are flagged, never dropped.
Multiclass tasks are reported one-vs-rest per class.

Missing group values: :func:`group_confusions` raises by default (naming the example index); with
``missing="unknown"`` they form an explicit group ``"unknown"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from common.metrics import confusion_matrix

Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval
UNKNOWN_GROUP = "unknown"

ERR_MISSING_GROUP = "group value missing at example {index}; fill it in or pass missing='unknown'"
ERR_EPSILON = "epsilon must be > 0 (the count release's privacy parameter), got {value!r}"
ERR_SHAPE = "group {group!r}: confusion matrix has shape {got}, expected {expected}"
ERR_THRESHOLD_KEY = "unknown fairness threshold {key!r}; valid: {valid}"

THRESHOLDS = {
    "max-demographic-parity-difference": ("demographic_parity_difference", "max"),
    "min-demographic-parity-ratio": ("demographic_parity_ratio", "min"),
    "max-equalized-odds-difference": ("equalized_odds_difference", "max"),
    "min-equalized-odds-ratio": ("equalized_odds_ratio", "min"),
    "max-equal-opportunity-difference": ("equal_opportunity_difference", "max"),
    "max-accuracy-difference": ("accuracy_difference", "max"),
    "min-worst-group-accuracy": ("worst_group_accuracy", "min"),
}


def _missing(g: Any) -> bool:
    if g is None:
        return True
    if isinstance(g, float) and math.isnan(g):
        return True
    return isinstance(g, str) and not g.strip()


def group_confusions(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                     groups: Sequence[Any], *, num_classes: int, missing: str = "raise") -> dict[str, np.ndarray]:
    """Per-group (C, C) confusion matrices; group values (str or int) are keyed by their string form."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if not (len(t) == len(p) == len(groups)):
        raise ValueError(f"y_true, y_pred and groups differ in length: {len(t)}, {len(p)}, {len(groups)}")
    keys: list[str] = []
    for i, g in enumerate(groups):
        if _missing(g):
            if missing != "unknown":
                raise ValueError(ERR_MISSING_GROUP.format(index=i))
            keys.append(UNKNOWN_GROUP)
        else:
            keys.append(str(g))
    arr = np.asarray(keys, dtype=object)
    out: dict[str, np.ndarray] = {}
    for g in sorted(set(keys)):
        mask = arr == g
        out[g] = confusion_matrix(t[mask], p[mask], num_classes=num_classes)
    return out


def merge_group_confusions(parts: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Sum per-group matrices from several nodes; a node may lack some groups."""
    out: dict[str, np.ndarray] = {}
    for part in parts:
        for g, m in part.items():
            m = np.asarray(m, dtype=np.int64)
            if g in out and out[g].shape != m.shape:
                raise ValueError(ERR_SHAPE.format(group=g, got=m.shape, expected=out[g].shape))
            out[g] = out[g] + m if g in out else m.copy()
    return out


def wilson_interval(successes: int, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927); (nan, nan) for n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(num: int, den: int, reason: str) -> dict[str, Any]:
    if den <= 0:
        return {"value": None, "ci_low": None, "ci_high": None, "undefined_reason": reason}
    lo, hi = wilson_interval(num, den)
    return {"value": num / den, "ci_low": lo, "ci_high": hi, "undefined_reason": None}


def binary_counts(cm: np.ndarray, positive_index: int) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of one class against the rest."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = int(cm[positive_index, positive_index])
    fp = int(cm[:, positive_index].sum() - tp)
    fn = int(cm[positive_index, :].sum() - tp)
    tn = int(cm.sum() - tp - fp - fn)
    return tp, fp, fn, tn


def _group_rates(tp: int, fp: int, fn: int, tn: int, *, min_group_size: int) -> dict[str, Any]:
    n = tp + fp + fn + tn
    return {
        "n": n,
        "counts": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "small_group": n < min_group_size,
        "selection_rate": _rate(tp + fp, n, "no examples"),
        "accuracy": _rate(tp + tn, n, "no examples"),
        "tpr": _rate(tp, tp + fn, "no positive examples"),
        "fnr": _rate(fn, tp + fn, "no positive examples"),
        "fpr": _rate(fp, fp + tn, "no negative examples"),
        "precision": _rate(tp, tp + fp, "no positive predictions"),
    }


def _spread(groups: dict[str, dict[str, Any]], rate: str) -> tuple[float | None, float | None, list[str]]:
    """(max - min, min / max, excluded groups) of a rate across the groups where it is defined."""
    vals = {g: m[rate]["value"] for g, m in groups.items()}
    defined = {g: v for g, v in vals.items() if v is not None}
    excluded = sorted(g for g, v in vals.items() if v is None)
    if not defined:
        return None, None, excluded
    hi, lo = max(defined.values()), min(defined.values())
    return hi - lo, (lo / hi if hi > 0 else None), excluded


def _gap(value: float | None, excluded: list[str], reason: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"value": value, "excluded_groups": excluded}
    if value is None:
        out["undefined_reason"] = reason or "no group has this rate defined"
    return out


def _binary_report(group_cms: dict[str, np.ndarray], *, positive_index: int, min_group_size: int) -> dict[str, Any]:
    groups = {g: _group_rates(*binary_counts(cm, positive_index), min_group_size=min_group_size)
              for g, cm in sorted(group_cms.items())}
    dp_d, dp_r, dp_x = _spread(groups, "selection_rate")
    tpr_d, tpr_r, tpr_x = _spread(groups, "tpr")
    fpr_d, fpr_r, fpr_x = _spread(groups, "fpr")
    acc_d, _, acc_x = _spread(groups, "accuracy")
    eo_d = None if tpr_d is None or fpr_d is None else max(tpr_d, fpr_d)
    eo_r = None if tpr_r is None or fpr_r is None else min(tpr_r, fpr_r)
    accs = [m["accuracy"]["value"] for m in groups.values() if m["accuracy"]["value"] is not None]
    worst = min(accs) if accs else None
    worst_group = min((g for g in groups if groups[g]["accuracy"]["value"] is not None),
                      key=lambda g: groups[g]["accuracy"]["value"], default=None)
    gaps = {
        "demographic_parity_difference": _gap(dp_d, dp_x),
        "demographic_parity_ratio": _gap(dp_r, dp_x, "the largest selection rate is 0"),
        "equalized_odds_difference": _gap(eo_d, sorted(set(tpr_x) | set(fpr_x))),
        "equalized_odds_ratio": _gap(eo_r, sorted(set(tpr_x) | set(fpr_x)), "a largest TPR or FPR is 0"),
        "equal_opportunity_difference": _gap(tpr_d, tpr_x),
        "accuracy_difference": _gap(acc_d, acc_x),
        "worst_group_accuracy": {**_gap(worst, acc_x), "group": worst_group},
    }
    return {"groups": groups, "gaps": gaps,
            "small_groups": sorted(g for g, m in groups.items() if m["small_group"])}


def fairness_report(group_cms: dict[str, np.ndarray], *, labels: Sequence[str], positive_index: int = 1,
                    min_group_size: int = 30) -> dict[str, Any]:
    """JSON-able per-group rates with intervals, and fairness gaps (fairlearn names), from summed counts.

    Binary: ``{"groups", "gaps", "small_groups", "positive_label", "min_group_size"}``. Multiclass adds
    ``per_class`` (one-vs-rest binary reports keyed by class name) and keeps per-group accuracy on top.
    """
    c = len(labels)
    for g, cm in group_cms.items():
        if np.asarray(cm).shape != (c, c):
            raise ValueError(ERR_SHAPE.format(group=g, got=np.asarray(cm).shape, expected=(c, c)))
    if c == 2:
        rep = _binary_report(group_cms, positive_index=positive_index, min_group_size=min_group_size)
        return {**rep, "positive_label": str(labels[positive_index]), "min_group_size": min_group_size}
    per_class = {str(labels[k]): _binary_report(group_cms, positive_index=k, min_group_size=min_group_size)
                 for k in range(c)}
    groups = {}
    for g, cm in sorted(group_cms.items()):
        cm = np.asarray(cm)
        n = int(cm.sum())
        groups[g] = {"n": n, "small_group": n < min_group_size,
                     "accuracy": _rate(int(np.trace(cm)), n, "no examples")}
    acc_d, _, acc_x = _spread(groups, "accuracy")
    accs = [m["accuracy"]["value"] for m in groups.values() if m["accuracy"]["value"] is not None]
    # Headline gaps for multiclass: the worst one-vs-rest value over classes.
    gaps: dict[str, Any] = {"accuracy_difference": _gap(acc_d, acc_x),
                            "worst_group_accuracy": _gap(min(accs) if accs else None, acc_x)}
    for name in ("demographic_parity_difference", "equalized_odds_difference", "equal_opportunity_difference"):
        vals = [r["gaps"][name]["value"] for r in per_class.values() if r["gaps"][name]["value"] is not None]
        gaps[name] = _gap(max(vals) if vals else None, [], "undefined for every class")
    return {"groups": groups, "gaps": gaps, "per_class": per_class,
            "small_groups": sorted(g for g, m in groups.items() if m["small_group"]), "min_group_size": min_group_size}


def headline_gap(report: dict[str, Any]) -> tuple[str, float | None]:
    g = (report.get("gaps") or {}).get("equalized_odds_difference") or {}
    return "equalized_odds_difference", g.get("value")


def check_thresholds(report: dict[str, Any], thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """Violations of thresholds such as ``{"max-equalized-odds-difference": 0.1}``; undefined gaps are not."""
    out = []
    for key, limit in thresholds.items():
        if key not in THRESHOLDS:
            raise ValueError(ERR_THRESHOLD_KEY.format(key=key, valid=", ".join(THRESHOLDS)))
        metric, kind = THRESHOLDS[key]
        value = ((report.get("gaps") or {}).get(metric) or {}).get("value")
        if value is None:
            continue
        if (kind == "max" and value > limit) or (kind == "min" and value < limit):
            out.append({"metric": metric, "value": value, "threshold": limit, "rule": key})
    return out


# --------------------------------------------------------------------------------------------- noisy counts


def _discrete_laplace(shape: tuple[int, ...], *, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Two-sided geometric noise, P(k) ∝ exp(-ε|k|) (Ghosh, Roughgarden, Sundararajan 2009).

    The difference of two i.i.d. geometric variables with success probability 1 - exp(-ε).
    """
    p = 1.0 - math.exp(-epsilon)
    return rng.geometric(p, size=shape).astype(np.int64) - rng.geometric(p, size=shape).astype(np.int64)


def noisy_counts(cm: np.ndarray, *, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """An ε-DP release of a confusion matrix (add/remove one example changes one cell by 1: L1 sensitivity 1).

    Noise is discrete Laplace with scale 1/ε; negative results are clamped to 0 (post-processing).
    """
    if not (isinstance(epsilon, int | float) and epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(ERR_EPSILON.format(value=epsilon))
    cm = np.asarray(cm, dtype=np.int64)
    return np.maximum(cm + _discrete_laplace(cm.shape, epsilon=epsilon, rng=rng), 0)


def noisy_group_confusions(group_cms: dict[str, np.ndarray], *, epsilon: float,
                           rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Noise every group's matrix with the same ε: each example is in exactly one group (parallel
    composition), so the whole release is ε-DP."""
    return {g: noisy_counts(cm, epsilon=epsilon, rng=rng) for g, cm in sorted(group_cms.items())}
