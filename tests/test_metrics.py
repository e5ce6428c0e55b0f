"""common.metrics: summed per-node confusion matrices give scikit-learn's metrics of the pooled data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from common.metrics import (
    ERR_BAD_MATRIX,
    ERR_LABEL_RANGE,
    ERR_LABELS_SHAPE,
    ERR_LENGTHS,
    ERR_NO_MATRICES,
    ERR_NOT_INTEGER,
    ERR_NUM_CLASSES,
    ERR_SHAPES,
    classification_metrics,
    confusion_matrix,
    sum_confusions,
)

TOL = 1e-12  # summed counts and pooled predictions must agree to rounding error


@st.composite
def federated_predictions(draw):
    """(C, y_true, y_pred, node of each example, number of nodes); some nodes may hold nothing."""
    c = draw(st.integers(2, 5))
    n = draw(st.integers(1, 80))
    y = draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    p = draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    k = draw(st.integers(1, 5))
    node = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    return c, np.array(y), np.array(p), np.array(node), k


def _federated(c, y, p, node, k):
    return sum_confusions(confusion_matrix(y[node == i], p[node == i], num_classes=c) for i in range(k))


def assert_matches_sklearn(rep, y, p, c):
    labels = list(range(c))
    kw = {"labels": labels, "zero_division": 0}
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, **kw)
    assert rep["confusion_matrix"] == sk_confusion_matrix(y, p, labels=labels).tolist()
    assert rep["accuracy"] == pytest.approx(accuracy_score(y, p), abs=TOL)
    for k in range(c):
        got = rep["per_class"][f"c{k}"]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((prec[k], rec[k], f1[k]), abs=TOL)
        assert got["support"] == sup[k]
    for avg in ("macro", "micro"):
        ref = precision_recall_fscore_support(y, p, average=avg, **kw)[:3]
        got = (rep[f"{avg}_precision"], rep[f"{avg}_recall"], rep[f"{avg}_f1"])
        assert got == pytest.approx(ref, abs=TOL), avg
    assert rep["weighted_f1"] == pytest.approx(precision_recall_fscore_support(y, p, average="weighted", **kw)[2],
                                               abs=TOL)


@settings(max_examples=40, deadline=None)
@given(federated_predictions())
def test_summed_counts_equal_sklearn_on_pooled_data(case):
    c, y, p, node, k = case
    cm = _federated(c, y, p, node, k)
    np.testing.assert_array_equal(cm, sk_confusion_matrix(y, p, labels=list(range(c))))
    assert cm.dtype == np.int64
    rep = classification_metrics(cm, labels=[f"c{i}" for i in range(c)])
    assert_matches_sklearn(rep, y, p, c)
    json.dumps(rep, allow_nan=False)


@pytest.mark.parametrize(("y", "p"), [
    pytest.param([0, 0, 1, 2, 2], [0, 0, 0, 0, 2], id="class-1-never-predicted"),
    pytest.param([1, 1, 1], [1, 0, 2], id="single-true-class"),
    pytest.param([2, 2], [2, 2], id="single-class-everywhere"),
    pytest.param([0, 1, 2], [1, 2, 0], id="all-wrong"),
])
def test_edge_cases_match_sklearn(y, p):
    y, p = np.array(y), np.array(p)
    rep = classification_metrics(confusion_matrix(y, p, num_classes=3), labels=["c0", "c1", "c2"])
    assert_matches_sklearn(rep, y, p, 3)


def test_never_predicted_class_has_zero_precision():
    rep = classification_metrics(confusion_matrix([0, 1, 1], [0, 0, 0], num_classes=2), labels=["a", "b"])
    assert rep["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert rep["per_class"]["a"]["precision"] == pytest.approx(1 / 3)


def test_empty_gives_zero_matrix_and_zero_metrics():
    cm = confusion_matrix([], [], num_classes=2)
    np.testing.assert_array_equal(cm, np.zeros((2, 2)))
    rep = classification_metrics(cm, labels=["a", "b"])
    assert rep["num_examples"] == 0
    assert rep["accuracy"] == rep["macro_f1"] == rep["weighted_f1"] == 0.0
    assert rep["per_class"]["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_empty_node_does_not_change_the_sum():
    a = confusion_matrix([0, 1, 1], [0, 1, 0], num_classes=2)
    np.testing.assert_array_equal(sum_confusions([a, np.zeros((2, 2), dtype=np.int64)]), a)


def test_sum_does_not_modify_inputs():
    a = np.array([[1, 2], [3, 4]])
    sum_confusions([a, a])
    np.testing.assert_array_equal(a, [[1, 2], [3, 4]])


def test_integral_float_labels_are_accepted():
    np.testing.assert_array_equal(confusion_matrix([0.0, 1.0], [1.0, 1.0], num_classes=2), [[0, 1], [0, 1]])


def test_error_messages():
    with pytest.raises(ValueError) as e:
        confusion_matrix([0, 1], [0], num_classes=2)
    assert str(e.value) == ERR_LENGTHS.format(n_true=2, n_pred=1)
    with pytest.raises(ValueError) as e:
        confusion_matrix([0, 3, 3, -1], [0, 0, 0, 0], num_classes=2)
    assert str(e.value) == ERR_LABEL_RANGE.format(name="y_true", num_classes=2, values=[-1, 3])
    with pytest.raises(ValueError) as e:
        confusion_matrix([0, 1], [0.5, 1], num_classes=2)
    assert str(e.value) == ERR_NOT_INTEGER.format(name="y_pred", dtype="float64")
    with pytest.raises(ValueError) as e:
        confusion_matrix([0], [0], num_classes=0)
    assert str(e.value) == ERR_NUM_CLASSES.format(value=0)
    with pytest.raises(ValueError) as e:
        sum_confusions([])
    assert str(e.value) == ERR_NO_MATRICES
    with pytest.raises(ValueError) as e:
        sum_confusions([np.zeros((2, 2), int), np.zeros((3, 3), int)])
    assert str(e.value) == ERR_SHAPES.format(first=(2, 2), other=(3, 3))
    with pytest.raises(ValueError) as e:
        sum_confusions([np.array([[1, -1], [0, 0]])])
    assert str(e.value) == ERR_BAD_MATRIX.format(problem="a negative count (-1)")
    with pytest.raises(ValueError) as e:
        sum_confusions([np.zeros((2, 3), int)])
    assert str(e.value) == ERR_BAD_MATRIX.format(problem="shape (2, 3)")
    with pytest.raises(ValueError) as e:
        classification_metrics(np.zeros((2, 2), int), labels=["a", "b", "c"])
    assert str(e.value) == ERR_LABELS_SHAPE.format(shape=(2, 2), c=3, labels=["a", "b", "c"])
