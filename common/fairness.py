"""Group fairness from per-group confusion counts: nodes send counts, the server sums, metrics come from sums.

Representation: ``dict[str, np.ndarray]`` mapping a group name to its (C, C) int64 confusion matrix (rows =
true class, columns = predicted class). Summing the dicts of all nodes gives exactly the per-group matrices of
the pooled predictions, so every number below equals the pooled computation.

Binary rates (positive class index ``positive_index``; TP, FP, FN, TN of one group; n = TP+FP+FN+TN)
------------------------------------------------------------------------------------------------------
``selection_rate`` = (TP+FP)/n, ``accuracy`` = (TP+TN)/n, ``tpr`` = TP/(TP+FN), ``fnr`` = FN/(TP+FN),
``fpr`` = FP/(FP+TN), ``precision`` = TP/(TP+FP). Each is reported as ``{"value", "ci_low", "ci_high",
"undefined_reason"}`` with a Wilson score interval (Wilson 1927). A rate whose denominator is 0 (TPR of a
group without positive examples, FPR without negatives, precision without predicted positives, anything of an
empty group) has ``value`` None and a reason. Groups with n < ``min_group_size`` are flagged
(``small_group``), never dropped.

Gaps (fairlearn 0.15 names and definitions, ``method="between_groups"``)
--------------------------------------------------------------------------
* ``demographic_parity_difference`` = max_g - min_g selection rate; ``demographic_parity_ratio`` = min / max.
* ``equal_opportunity_difference`` = max - min TPR; ``equal_opportunity_ratio`` = min / max TPR.
* ``equalized_odds_difference`` = max(TPR difference, FPR difference) (fairlearn's ``agg="worst_case"``);
  ``equalized_odds_ratio`` = min(TPR ratio, FPR ratio).
* ``accuracy_difference`` = max - min accuracy; ``worst_group_accuracy`` = min accuracy (``group_min``).

With one group every difference is 0 and every ratio 1 (as fairlearn). Where fairlearn differs, on purpose:

* fairlearn computes rates with ``sklearn.metrics.confusion_matrix(normalize="true")``, which turns 0/0 into
  0 (a group without positives gets TPR 0 and can dominate the gap). Here an undefined rate is left out of that
  gap; the gap lists each excluded group with the reason (``excluded``). With every group defined the values
  are fairlearn's exactly (tested to 1e-12).
* A ratio whose maximum is 0 (0/0) is None with a reason, where fairlearn returns NaN (not JSON). The
  equalized-odds ratio is the minimum over the components that are defined (fairlearn's builtin ``min`` over a
  NaN-containing pair depends on the order); None only when both are undefined.

Multiclass (C > 2) tasks are reported one-vs-rest: ``per_class[label]`` is the binary report of that class
against the rest, ``groups`` holds per-group overall accuracy, and the top-level ``gaps`` take the worst class
(largest difference, smallest ratio, naming it in ``"class"``) plus accuracy gaps from overall accuracy.

Missing group values: :func:`group_confusions` raises by default, naming the example indices; with
``missing="unknown"`` such examples form an explicit group ``"unknown"`` (merged with a group that is
already literally called ``"unknown"``).

References
----------
E. B. Wilson, "Probable inference, the law of succession, and statistical inference", JASA 22 (1927) 209-212.
M. Hardt, E. Price, N. Srebro, "Equality of opportunity in supervised learning", NeurIPS 2016.
A. Ghosh, T. Roughgarden, M. Sundararajan, "Universally utility-maximizing privacy mechanisms", STOC 2009.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from common.metrics import as_confusion, confusion_matrix

UNKNOWN_GROUP = "unknown"
MISSING_MODES = ("raise", "unknown")

ERR_MISSING_GROUP = ("group value missing (None, NaN or empty string) at example index {index}; fill it in, "
                     "or pass missing='unknown' to count such examples in an explicit group 'unknown'")
ERR_MISSING_MODE = "missing must be one of {modes}, got {value!r}"
ERR_LENGTHS = "y_true, y_pred and groups must have the same length, got {n_true}, {n_pred} and {n_groups}"
ERR_MERGE = "cannot merge group confusion matrices: {problems}"
ERR_LABELS = "labels must name at least 2 classes, got {labels!r}"
ERR_POSITIVE_INDEX = "positive_index must be an integer in [0, {c}) for labels {labels!r}, got {value!r}"
ERR_REPORT_SHAPE = "group {group!r}: confusion matrix has shape {got}, expected {expected} for labels {labels!r}"
ERR_CONFIDENCE = "confidence must be a number in (0, 1), got {value!r}"
ERR_MIN_GROUP_SIZE = "min_group_size must be an integer >= 0, got {value!r}"
ERR_THRESHOLD_KEY = "unknown fairness threshold {keys}; valid keys: {valid}"
ERR_THRESHOLD_VALUE = "fairness threshold {key!r} must be a finite number, got {value!r}"
ERR_WIRE = "group counts do not match the federation: {problems}"

#: Threshold key -> (gap name in ``report["gaps"]``, "max" = value must be <= limit, "min" = >= limit).
THRESHOLDS: dict[str, tuple[str, str]] = {
    "max-demographic-parity-difference": ("demographic_parity_difference", "max"),
    "min-demographic-parity-ratio": ("demographic_parity_ratio", "min"),
    "max-equalized-odds-difference": ("equalized_odds_difference", "max"),
    "min-equalized-odds-ratio": ("equalized_odds_ratio", "min"),
    "max-equal-opportunity-difference": ("equal_opportunity_difference", "max"),
    "max-accuracy-difference": ("accuracy_difference", "max"),
    "min-worst-group-accuracy": ("worst_group_accuracy", "min"),
}
HEADLINE_GAP = "equalized_odds_difference"

_REASONS = {"n": "no examples", "pos": "no positive examples", "neg": "no negative examples",
            "pred": "no positive predictions"}


# ------------------------------------------------------------------------------------------- counting


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    try:
        return bool(value != value)  # NaN, NaT
    except TypeError:  # pandas.NA: comparisons give NA, whose truth value is ambiguous
        return True


def group_confusions(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                     groups: Sequence[Any] | np.ndarray, *, num_classes: int,
                     missing: str = "raise") -> dict[str, np.ndarray]:
    """Per-group confusion matrices of one node's predictions.

    Parameters
    ----------
    y_true, y_pred : array-like of int, shape (n,)
        Class indices in ``[0, num_classes)``.
    groups : sequence, shape (n,)
        Group value of each example, str or int (any value; the key is ``str(value)``, so ``1`` and ``"1"``
        are the same group).
    num_classes : int
        C.
    missing : {"raise", "unknown"}
        What to do with a missing group value (None, NaN, pandas NA, empty or blank string): ``"raise"``
        (default) raises ``ValueError`` naming the indices of all such examples; ``"unknown"`` counts them in
        the group ``"unknown"``.

    Returns
    -------
    dict of str to numpy.ndarray of int64, shape (C, C)
        Only groups that occur, sorted by name.
    """

    if missing not in MISSING_MODES:
        raise ValueError(ERR_MISSING_MODE.format(modes=MISSING_MODES, value=missing))
    t = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    g = list(groups)
    if not (len(t) == len(p) == len(g)):
        raise ValueError(ERR_LENGTHS.format(n_true=len(t), n_pred=len(p), n_groups=len(g)))
    absent = [i for i, v in enumerate(g) if _is_missing(v)]
    if absent and missing == "raise":
        shown = ", ".join(map(str, absent[:10])) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
        raise ValueError(ERR_MISSING_GROUP.format(index=shown))
    keys = [str(v) for v in g]
    for i in absent:
        keys[i] = UNKNOWN_GROUP
    names, inverse = np.unique(np.asarray(keys, dtype=str), return_inverse=True) if keys else ([], None)
    cm_all = confusion_matrix(t, p, num_classes=num_classes)  # validates labels once
    if inverse is None:
        return {}
    c = cm_all.shape[0]
    flat = np.bincount(inverse.ravel() * c * c + t.astype(np.int64) * c + p.astype(np.int64),
                       minlength=len(names) * c * c)
    return {str(name): flat[k * c * c:(k + 1) * c * c].reshape(c, c).astype(np.int64)
            for k, name in enumerate(names)}


def merge_group_confusions(parts: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Sum per-group matrices from several nodes.

    A node may lack some groups (its counts for them are zero) or send an all-zero matrix (an empty node).
    Every matrix must be (C, C) non-negative integer counts with the same C; all problems are collected and
    reported in one ``ValueError`` (``ERR_MERGE``) naming the node position and the group.

    Returns
    -------
    dict of str to numpy.ndarray of int64
        New arrays, sorted by group name; the inputs are not modified.
    """
    out: dict[str, np.ndarray] = {}
    problems: list[str] = []
    shape: tuple[int, ...] | None = None
    for node, part in enumerate(parts):
        for group, m in part.items():
            try:
                a = as_confusion(m)
            except ValueError as exc:
                problems.append(f"node {node}, group {group!r}: {exc}")
                continue
            if shape is None:
                shape = a.shape
            if a.shape != shape:
                problems.append(f"node {node}, group {group!r}: shape {a.shape}, expected {shape}")
                continue
            key = str(group)
            out[key] = out[key] + a if key in out else a.copy()
    if problems:
        raise ValueError(ERR_MERGE.format(problems="; ".join(problems)))
    return dict(sorted(out.items()))


def group_confusions_to_wire(group_cms: Mapping[str, np.ndarray], *, labels: Sequence[str]) -> dict[str, Any]:
    """The JSON wire form ``{"labels": [...], "groups": {"g": [[...], ...]}}`` (groups sorted by name)."""
    return {"labels": [str(x) for x in labels],
            "groups": {str(g): as_confusion(m).tolist() for g, m in sorted(group_cms.items())}}


def group_confusions_from_wire(obj: Mapping[str, Any], *, labels: Sequence[str],
                               num_examples: int | None = None) -> dict[str, np.ndarray]:
    """Parse and validate the wire form received from a node against the federation's labels.

    Parameters
    ----------
    obj : mapping
        ``{"labels": [...], "groups": {"g": [[...], ...]}}`` as decoded from JSON.
    labels : sequence of str, length C
        The federation's class names in index order.
    num_examples : int, optional
        When given (exact, un-noised counts), the counts of all groups together must sum to it.

    Raises ``ValueError`` (``ERR_WIRE``) listing every problem: labels that differ (order matters), a group
    matrix that is not (C, C) non-negative integer counts, a total that differs from ``num_examples``.
    """
    problems: list[str] = []
    raw = obj.get("labels") if isinstance(obj, Mapping) else None
    got = list(raw) if isinstance(raw, list | tuple) else raw
    if got != [str(x) for x in labels]:
        problems.append(f"labels {got!r}, expected {list(labels)!r}")
    groups = obj.get("groups") if isinstance(obj, Mapping) else None
    if not isinstance(groups, Mapping):
        problems.append("'groups' must be an object mapping group name to a matrix")
        groups = {}
    out: dict[str, np.ndarray] = {}
    c = len(labels)
    for g, m in groups.items():
        try:
            a = as_confusion(m)
        except ValueError as exc:
            problems.append(f"group {g!r}: {exc}")
            continue
        if a.shape != (c, c):
            problems.append(f"group {g!r}: shape {a.shape}, expected {(c, c)}")
            continue
        out[str(g)] = a
    if num_examples is not None and not problems:
        total = int(sum(int(a.sum()) for a in out.values()))
        if total != num_examples:
            problems.append(f"counts sum to {total}, but num-examples is {num_examples}")
    if problems:
        raise ValueError(ERR_WIRE.format(problems="; ".join(problems)))
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------- rates


def wilson_interval(successes: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927).

    With p = successes / n and z the standard normal quantile at (1 + confidence) / 2::

        centre = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))

    Unlike the Wald interval it stays inside [0, 1] and is not degenerate at p = 0 or 1.

    Returns
    -------
    (low, high) : tuple of float
        ``(nan, nan)`` for n = 0.
    """
    if not (isinstance(confidence, int | float) and 0 < confidence < 1):
        raise ValueError(ERR_CONFIDENCE.format(value=confidence))
    if n <= 0:
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # The score interval always contains p (exactly 0 or 1 at the ends); min/max only undo float rounding.
    return max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p))


def _rate(num: int, den: int, reason: str, confidence: float) -> dict[str, Any]:
    if den <= 0:
        return {"value": None, "ci_low": None, "ci_high": None, "undefined_reason": reason}
    lo, hi = wilson_interval(num, den, confidence=confidence)
    return {"value": num / den, "ci_low": lo, "ci_high": hi, "undefined_reason": None}


def binary_counts(cm: np.ndarray, positive_index: int) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of class ``positive_index`` against the rest (one-vs-rest for C > 2)."""
    m = np.asarray(cm, dtype=np.int64)
    tp = int(m[positive_index, positive_index])
    fp = int(m[:, positive_index].sum()) - tp
    fn = int(m[positive_index, :].sum()) - tp
    return tp, fp, fn, int(m.sum()) - tp - fp - fn


def _group_rates(tp: int, fp: int, fn: int, tn: int, *, min_group_size: int, confidence: float) -> dict[str, Any]:
    n = tp + fp + fn + tn
    return {
        "n": n,
        "counts": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "small_group": n < min_group_size,
        "selection_rate": _rate(tp + fp, n, _REASONS["n"], confidence),
        "accuracy": _rate(tp + tn, n, _REASONS["n"], confidence),
        "tpr": _rate(tp, tp + fn, _REASONS["pos"], confidence),
        "fpr": _rate(fp, fp + tn, _REASONS["neg"], confidence),
        "fnr": _rate(fn, tp + fn, _REASONS["pos"], confidence),
        "precision": _rate(tp, tp + fp, _REASONS["pred"], confidence),
    }


# ------------------------------------------------------------------------------------------- gaps


def _gap(value: float | None = None, *, reason: str | None = None, excluded: dict[str, str] | None = None,
         compared: int = 0, max_group: str | None = None, min_group: str | None = None) -> dict[str, Any]:
    return {"value": value, "undefined_reason": None if value is not None else reason,
            "groups_compared": compared, "max_group": max_group, "min_group": min_group,
            "excluded": dict(excluded or {})}


def _spread(groups: Mapping[str, Mapping[str, Any]], rate: str, kind: str) -> dict[str, Any]:
    """max - min (kind "difference") or min / max (kind "ratio") of a rate over the groups where it is defined."""
    defined = {g: m[rate]["value"] for g, m in groups.items() if m[rate]["value"] is not None}
    excluded = {g: f"{rate} undefined: {m[rate]['undefined_reason']}" for g, m in groups.items()
                if m[rate]["value"] is None}
    if not defined:
        return _gap(reason=f"no group has a defined {rate}", excluded=excluded)
    hi_g = max(defined, key=lambda g: defined[g])
    lo_g = min(defined, key=lambda g: defined[g])
    hi, lo = defined[hi_g], defined[lo_g]
    common = {"excluded": excluded, "compared": len(defined), "max_group": hi_g, "min_group": lo_g}
    if kind == "difference":
        return _gap(hi - lo, **common)
    if hi == 0:
        return _gap(reason=f"every compared group has {rate} 0, so min/max is 0/0", **common)
    return _gap(lo / hi, **common)


def _worst_case(parts: Mapping[str, dict[str, Any]], *, pick: str, what: str) -> dict[str, Any]:
    """Combine component gaps: the largest (pick "max") or smallest ("min") defined value."""
    defined = {k: g for k, g in parts.items() if g["value"] is not None}
    excluded = {grp: why for g in parts.values() for grp, why in g["excluded"].items()}
    for grp in excluded:  # a group left out of only one component is named with every reason
        excluded[grp] = "; ".join(g["excluded"][grp] for g in parts.values() if grp in g["excluded"])
    if not defined:
        out = _gap(reason=f"no component of {what} is defined", excluded=excluded)
    else:
        key = (max if pick == "max" else min)(defined, key=lambda k: defined[k]["value"])
        b = defined[key]
        out = _gap(b["value"], excluded=excluded, compared=b["groups_compared"], max_group=b["max_group"],
                   min_group=b["min_group"])
        out["binding"] = key
    out["components"] = {k: g["value"] for k, g in parts.items()}
    return out


def _binary_gaps(groups: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    tpr_d, fpr_d = _spread(groups, "tpr", "difference"), _spread(groups, "fpr", "difference")
    tpr_r, fpr_r = _spread(groups, "tpr", "ratio"), _spread(groups, "fpr", "ratio")
    acc_d = _spread(groups, "accuracy", "difference")
    worst = dict(acc_d)
    worst["value"] = None if acc_d["value"] is None else groups[acc_d["min_group"]]["accuracy"]["value"]
    worst["group"] = acc_d["min_group"]
    return {
        "demographic_parity_difference": _spread(groups, "selection_rate", "difference"),
        "demographic_parity_ratio": _spread(groups, "selection_rate", "ratio"),
        "equalized_odds_difference": _worst_case({"tpr_difference": tpr_d, "fpr_difference": fpr_d}, pick="max",
                                                 what="equalized_odds_difference"),
        "equalized_odds_ratio": _worst_case({"tpr_ratio": tpr_r, "fpr_ratio": fpr_r}, pick="min",
                                            what="equalized_odds_ratio"),
        "equal_opportunity_difference": tpr_d,
        "equal_opportunity_ratio": tpr_r,
        "accuracy_difference": acc_d,
        "worst_group_accuracy": worst,
    }


def _validate_report_args(group_cms: Mapping[str, np.ndarray], labels: Sequence[str], positive_index: int,
                          min_group_size: int, confidence: float) -> dict[str, np.ndarray]:
    c = len(labels)
    if c < 2:
        raise ValueError(ERR_LABELS.format(labels=list(labels)))
    if isinstance(positive_index, bool) or not isinstance(positive_index, int | np.integer) \
            or not 0 <= positive_index < c:
        raise ValueError(ERR_POSITIVE_INDEX.format(c=c, labels=list(labels), value=positive_index))
    if isinstance(min_group_size, bool) or not isinstance(min_group_size, int | np.integer) or min_group_size < 0:
        raise ValueError(ERR_MIN_GROUP_SIZE.format(value=min_group_size))
    if not (isinstance(confidence, int | float) and 0 < confidence < 1):
        raise ValueError(ERR_CONFIDENCE.format(value=confidence))
    out = {}
    for g, m in sorted(group_cms.items()):
        a = as_confusion(m)
        if a.shape != (c, c):
            raise ValueError(ERR_REPORT_SHAPE.format(group=g, got=a.shape, expected=(c, c), labels=list(labels)))
        out[str(g)] = a
    return out


def _binary_report(cms: Mapping[str, np.ndarray], k: int, *, min_group_size: int,
                   confidence: float) -> dict[str, Any]:
    groups = {g: _group_rates(*binary_counts(m, k), min_group_size=min_group_size, confidence=confidence)
              for g, m in cms.items()}
    c = len(next(iter(cms.values()))) if cms else k + 1
    total = sum(cms.values(), np.zeros((c, c), dtype=np.int64))
    overall = _group_rates(*binary_counts(total, k), min_group_size=min_group_size, confidence=confidence)
    return {"groups": groups, "overall": overall, "gaps": _binary_gaps(groups),
            "small_groups": [g for g, m in groups.items() if m["small_group"]]}


def fairness_report(group_cms: Mapping[str, np.ndarray], *, labels: Sequence[str], positive_index: int = 1,
                    min_group_size: int = 30, confidence: float = 0.95) -> dict[str, Any]:
    """Per-group rates with Wilson intervals and fairlearn-named gaps, from (summed) per-group counts.

    Parameters
    ----------
    group_cms : mapping of str to array-like, shape (C, C)
        Per-group confusion matrices (typically :func:`merge_group_confusions` of all nodes).
    labels : sequence of str, length C >= 2
        Class names in index order.
    positive_index : int, default 1
        The positive class of a binary task (ignored for C > 2, where every class is reported one-vs-rest).
    min_group_size : int, default 30
        Groups with fewer examples are flagged ``small_group`` (and listed in ``small_groups``), not dropped.
    confidence : float in (0, 1), default 0.95
        Level of the Wilson score intervals.

    Returns
    -------
    dict (JSON-able)
        Binary: ``kind="binary"``, ``labels``, ``positive_label``, ``positive_index``, ``confidence``,
        ``min_group_size``, ``groups`` ({group: {n, counts, small_group, selection_rate, accuracy, tpr, fpr,
        fnr, precision}}), ``overall`` (the same for all groups pooled), ``small_groups`` and ``gaps``
        ({name: {value, undefined_reason, groups_compared, max_group, min_group, excluded}}; see the module
        docstring). Multiclass: ``kind="multiclass"``, ``groups`` ({group: {n, small_group, accuracy}}),
        ``per_class`` ({label: binary report of that class vs the rest}) and worst-class ``gaps``.
    """
    cms = _validate_report_args(group_cms, labels, positive_index, min_group_size, confidence)
    meta = {"labels": [str(x) for x in labels], "confidence": float(confidence), "min_group_size": int(min_group_size)}
    if len(labels) == 2:
        rep = _binary_report(cms, int(positive_index), min_group_size=min_group_size, confidence=confidence)
        return {"kind": "binary", **meta, "positive_label": str(labels[positive_index]),
                "positive_index": int(positive_index), **rep}
    per_class = {str(lab): _binary_report(cms, k, min_group_size=min_group_size, confidence=confidence)
                 for k, lab in enumerate(labels)}
    groups: dict[str, dict[str, Any]] = {}
    for g, m in cms.items():
        n = int(m.sum())
        groups[g] = {"n": n, "small_group": n < min_group_size,
                     "accuracy": _rate(int(np.trace(m)), n, _REASONS["n"], confidence)}
    acc_d = _spread(groups, "accuracy", "difference")
    worst = {**acc_d, "value": None if acc_d["value"] is None else groups[acc_d["min_group"]]["accuracy"]["value"],
             "group": acc_d["min_group"]}
    gaps: dict[str, Any] = {"accuracy_difference": acc_d, "worst_group_accuracy": worst}
    for name in next(iter(per_class.values()))["gaps"]:
        if name in gaps:
            continue
        vals = {lab: r["gaps"][name] for lab, r in per_class.items() if r["gaps"][name]["value"] is not None}
        pick = min if "ratio" in name else max
        if not vals:
            gaps[name] = {**_gap(reason="undefined for every class"), "class": None}
        else:
            lab = pick(vals, key=lambda k: vals[k]["value"])
            gaps[name] = {**vals[lab], "class": lab}
    return {"kind": "multiclass", **meta, "groups": groups, "per_class": per_class, "gaps": gaps,
            "small_groups": [g for g, m in groups.items() if m["small_group"]]}


def headline_gap(report: Mapping[str, Any]) -> tuple[str, float | None]:
    """``("equalized_odds_difference", value)`` for one-number tables; value None if undefined or absent."""
    gap = (report.get("gaps") or {}).get(HEADLINE_GAP) or {}
    return HEADLINE_GAP, gap.get("value")


def check_thresholds(report: Mapping[str, Any], thresholds: Mapping[str, float]) -> list[dict[str, Any]]:
    """Violations of fairness thresholds such as ``{"max-equalized-odds-difference": 0.1}``.

    Keys are those of ``THRESHOLDS``: ``max-*`` requires gap <= limit, ``min-*`` requires gap >= limit. A gap
    that is undefined in ``report`` (value None) cannot be checked and is not reported as a violation; read its
    ``undefined_reason`` in the report.

    Returns
    -------
    list of dict
        ``[{"metric", "value", "threshold", "rule"}]`` in the order of ``thresholds``; empty when all hold.

    Raises
    ------
    ValueError
        ``ERR_THRESHOLD_KEY`` naming every unknown key and listing the valid ones (checked before anything
        else); ``ERR_THRESHOLD_VALUE`` for a limit that is not a finite number.
    """
    unknown = [k for k in thresholds if k not in THRESHOLDS]
    if unknown:
        raise ValueError(ERR_THRESHOLD_KEY.format(keys=", ".join(map(repr, unknown)), valid=", ".join(THRESHOLDS)))
    for key, limit in thresholds.items():
        if isinstance(limit, bool) or not isinstance(limit, int | float) or not math.isfinite(limit):
            raise ValueError(ERR_THRESHOLD_VALUE.format(key=key, value=limit))
    out = []
    for key, limit in thresholds.items():
        metric, kind = THRESHOLDS[key]
        value = ((report.get("gaps") or {}).get(metric) or {}).get("value")
        if value is not None and ((kind == "max" and value > limit) or (kind == "min" and value < limit)):
            out.append({"metric": metric, "value": value, "threshold": float(limit), "rule": key})
    return out


# ------------------------------------------------------------------------------------------- typed report


@dataclass(frozen=True)
class Gap:
    """One gap of a fairness report: ``value`` (None when undefined, with ``undefined_reason``) and the rest of
    its JSON fields (``groups_compared``, ``max_group``, ``min_group``, ``excluded``, and where they apply
    ``binding``, ``components``, ``group``, ``class``) kept as written."""

    value: float | None
    undefined_reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "undefined_reason": self.undefined_reason, **self.details}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Gap:
        rest = {k: v for k, v in obj.items() if k not in ("value", "undefined_reason")}
        return cls(value=obj.get("value"), undefined_reason=obj.get("undefined_reason"), details=rest)


@dataclass(frozen=True)
class FairnessReport:
    """The typed form of :func:`fairness_report`'s JSON (the one reader: :meth:`from_json`; the one writer:
    :meth:`to_json`, which gives back the JSON as written). Field meanings: see :func:`fairness_report`.

    ``groups`` keeps each group's entry as written (``n``, ``small_group``, and rates
    ``{"value", "ci_low", "ci_high", "undefined_reason"}``); read a rate with :meth:`rate`.
    """

    kind: str
    labels: list[str]
    gaps: dict[str, Gap]
    groups: dict[str, dict[str, Any]]
    small_groups: list[str]
    confidence: float = 0.95
    min_group_size: int = 30
    extra: dict[str, Any] = field(default_factory=dict)  # binary: positive_label/index, overall; multi: per_class

    def gap(self, name: str) -> float | None:
        """The value of gap ``name``; None when undefined or absent."""
        g = self.gaps.get(name)
        return None if g is None else g.value

    def headline(self) -> float | None:
        """The headline gap (``HEADLINE_GAP``, equalized-odds difference)."""
        return self.gap(HEADLINE_GAP)

    def rate(self, group: str, name: str) -> float | None:
        """The value of rate ``name`` (``tpr``, ``fpr``, ``selection_rate``, ``accuracy``, ...) of ``group``."""
        return ((self.groups.get(group) or {}).get(name) or {}).get("value")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "labels": list(self.labels), "confidence": self.confidence,
                "min_group_size": self.min_group_size, **self.extra, "groups": self.groups,
                "gaps": {k: g.to_json() for k, g in self.gaps.items()}, "small_groups": list(self.small_groups)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> FairnessReport:
        known = ("kind", "labels", "confidence", "min_group_size", "groups", "gaps", "small_groups")
        return cls(kind=str(obj.get("kind", "binary")), labels=list(obj.get("labels") or []),
                   gaps={k: Gap.from_json(g) for k, g in (obj.get("gaps") or {}).items()},
                   groups=dict(obj.get("groups") or {}), small_groups=list(obj.get("small_groups") or []),
                   confidence=float(obj.get("confidence", 0.95)), min_group_size=int(obj.get("min_group_size", 30)),
                   extra={k: v for k, v in obj.items() if k not in known})
