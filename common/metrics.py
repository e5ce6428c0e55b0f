"""Classification metrics computed from a confusion matrix.

A confusion matrix is an int64 array of shape (C, C): rows are true classes, columns predicted classes, both
indexed 0..C-1 in the federation's label order. Nodes send matrices, the server sums them; every metric here is
a function of the summed matrix alone, so federated metrics equal the metrics of the pooled predictions exactly
(the sum of per-node counts *is* the count over the pooled data).

With M the matrix, per class k: TP_k = M[k, k], predicted_k = sum_i M[i, k], support_k = sum_j M[k, j], and

* precision_k = TP_k / predicted_k, recall_k = TP_k / support_k,
  F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k) (the harmonic mean of precision and recall, in scikit-learn's form);
* accuracy = trace(M) / sum(M);
* macro_* = unweighted mean over all C classes (absent classes included, as scikit-learn with ``labels``);
* micro_* = the pooled TP / pooled denominator; for single-label classification all three equal accuracy;
* weighted_f1 = sum_k support_k F1_k / sum_k support_k.

Zero division follows scikit-learn's ``zero_division=0``: a ratio whose denominator is 0 is reported as 0.0
(a class never predicted has precision 0.0; a class absent from the data has recall and F1 0.0; the class's
``support`` and the top-level ``num_examples`` say when that happened). An empty matrix (no examples) gives
0.0 everywhere, where scikit-learn refuses empty input.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

ERR_NUM_CLASSES = "num_classes must be an integer >= 1, got {value!r}"
ERR_LENGTHS = "y_true has {n_true} entries but y_pred has {n_pred}; they must be the same length"
ERR_NOT_INTEGER = "{name} must hold integer class indices, got dtype {dtype}"
ERR_LABEL_RANGE = "{name} holds class indices outside [0, {num_classes}): {values}"
ERR_NO_MATRICES = "no confusion matrices to sum"
ERR_SHAPES = "confusion matrices have different shapes: {first} and {other}"
ERR_BAD_MATRIX = "confusion matrix must be a square 2-D array of non-negative integer counts, got {problem}"
ERR_LABELS_SHAPE = "confusion matrix has shape {shape}, expected ({c}, {c}) for the {c} labels {labels}"


def _class_indices(values: Sequence[int] | np.ndarray, *, name: str, num_classes: int) -> np.ndarray:
    a = np.asarray(values).ravel()
    if a.size == 0:
        return a.astype(np.int64)
    if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        a = a.astype(np.int64)  # e.g. labels read as float from a CSV with missing values elsewhere
    if a.dtype.kind not in "iub":
        raise ValueError(ERR_NOT_INTEGER.format(name=name, dtype=a.dtype))
    a = a.astype(np.int64)
    bad = np.unique(a[(a < 0) | (a >= num_classes)])
    if bad.size:
        raise ValueError(ERR_LABEL_RANGE.format(name=name, num_classes=num_classes, values=bad[:10].tolist()))
    return a


def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, *,
                     num_classes: int) -> np.ndarray:
    """Count (true class, predicted class) pairs.

    Parameters
    ----------
    y_true, y_pred : array-like of int, shape (n,)
        Class indices in ``[0, num_classes)``. Integral floats (``1.0``) are accepted; ``n`` may be 0.
    num_classes : int
        C, the number of classes of the federation (not of this sample: absent classes get zero rows).

    Returns
    -------
    numpy.ndarray of int64, shape (C, C)
        ``M[i, j]`` = number of examples with true class i predicted as j; equals
        ``sklearn.metrics.confusion_matrix(y_true, y_pred, labels=range(C))``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise ValueError(ERR_NUM_CLASSES.format(value=num_classes))
    c = int(num_classes)
    t = _class_indices(y_true, name="y_true", num_classes=c)
    p = _class_indices(y_pred, name="y_pred", num_classes=c)
    if t.shape != p.shape:
        raise ValueError(ERR_LENGTHS.format(n_true=t.size, n_pred=p.size))
    return np.bincount(t * c + p, minlength=c * c).astype(np.int64).reshape(c, c)


def as_confusion(m: Any) -> np.ndarray:
    """Validate one confusion matrix (square, 2-D, non-negative integer counts) and return it as int64."""
    a = np.asarray(m)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(ERR_BAD_MATRIX.format(problem=f"shape {a.shape}"))
    if a.size and a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        a = a.astype(np.int64)
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(ERR_BAD_MATRIX.format(problem=f"dtype {a.dtype}"))
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise ValueError(ERR_BAD_MATRIX.format(problem=f"a negative count ({int(a.min())})"))
    return a


def sum_confusions(matrices: Iterable[np.ndarray]) -> np.ndarray:
    """Element-wise sum of confusion matrices (e.g. one per node).

    Parameters
    ----------
    matrices : iterable of array-like, each shape (C, C)
        Non-negative integer counts, all the same shape.

    Returns
    -------
    numpy.ndarray of int64, shape (C, C)
        A new array; the inputs are not modified.

    Raises
    ------
    ValueError
        ``ERR_NO_MATRICES`` for an empty iterable (C would be unknown), ``ERR_SHAPES`` for mismatched shapes,
        ``ERR_BAD_MATRIX`` for a matrix that is not square non-negative integer counts.
    """
    total: np.ndarray | None = None
    for m in matrices:
        a = as_confusion(m)
        if total is None:
            total = a.copy()
        elif a.shape != total.shape:
            raise ValueError(ERR_SHAPES.format(first=total.shape, other=a.shape))
        else:
            total += a
    if total is None:
        raise ValueError(ERR_NO_MATRICES)
    return total


def _div(num: float, den: float) -> float:
    """num / den, or 0.0 when den == 0 (scikit-learn's ``zero_division=0``)."""
    return float(num) / float(den) if den else 0.0


def classification_metrics(cm: np.ndarray, *, labels: Sequence[str]) -> dict[str, Any]:
    """Utility metrics of a (summed) confusion matrix, as a JSON-able dict.

    Parameters
    ----------
    cm : array-like, shape (C, C)
        Rows = true class, columns = predicted class.
    labels : sequence of str, length C
        Class names in index order; keys of ``per_class``.

    Returns
    -------
    dict
        ``num_examples`` (int), ``accuracy``, ``per_class`` ({label: {precision, recall, f1, support}}),
        ``macro_precision``, ``macro_recall``, ``macro_f1``, ``micro_precision``, ``micro_recall``,
        ``micro_f1``, ``weighted_f1`` (floats) and ``confusion_matrix`` (nested lists). Definitions and the
        zero-division rule are in the module docstring; values equal scikit-learn's
        ``precision_recall_fscore_support(..., labels=range(C), zero_division=0)`` on the pooled data.
    """
    m = as_confusion(cm)
    c = len(labels)
    if m.shape != (c, c):
        raise ValueError(ERR_LABELS_SHAPE.format(shape=m.shape, c=c, labels=list(labels)))
    total = int(m.sum())
    tp = np.diag(m)
    predicted = m.sum(axis=0)
    support = m.sum(axis=1)
    per_class: dict[str, dict[str, float | int]] = {}
    precs, recs, f1s = [], [], []
    for k, name in enumerate(labels):
        fp, fn = int(predicted[k] - tp[k]), int(support[k] - tp[k])
        p, r = _div(tp[k], predicted[k]), _div(tp[k], support[k])
        f = _div(2 * int(tp[k]), 2 * int(tp[k]) + fp + fn)
        precs.append(p)
        recs.append(r)
        f1s.append(f)
        per_class[str(name)] = {"precision": p, "recall": r, "f1": f, "support": int(support[k])}
    accuracy = _div(int(tp.sum()), total)
    return {
        "num_examples": total,
        "accuracy": accuracy,
        "per_class": per_class,
        "macro_precision": float(np.mean(precs)),
        "macro_recall": float(np.mean(recs)),
        "macro_f1": float(np.mean(f1s)),
        "micro_precision": accuracy,
        "micro_recall": accuracy,
        "micro_f1": accuracy,
        "weighted_f1": _div(float(np.dot(f1s, support)), total),
        "confusion_matrix": m.tolist(),
    }
