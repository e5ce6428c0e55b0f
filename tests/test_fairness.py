"""common.fairness: federated group fairness from summed counts equals fairlearn on the pooled predictions."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equal_opportunity_difference,
    equal_opportunity_ratio,
    equalized_odds_difference,
    equalized_odds_ratio,
    false_negative_rate,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, precision_score

from client.count_noise import (
    ERR_EPSILON,
    ERR_RNG,
    ERR_UNLISTED_GROUPS,
    discrete_laplace,
    noisy_counts,
    noisy_group_confusions,
)
from common.fairness import (
    ERR_CONFIDENCE,
    ERR_LABELS,
    ERR_MERGE,
    ERR_MISSING_GROUP,
    ERR_MISSING_MODE,
    ERR_POSITIVE_INDEX,
    ERR_REPORT_SHAPE,
    ERR_THRESHOLD_KEY,
    ERR_THRESHOLD_VALUE,
    ERR_WIRE,
    THRESHOLDS,
    UNKNOWN_GROUP,
    check_thresholds,
    fairness_report,
    group_confusions,
    group_confusions_from_wire,
    group_confusions_to_wire,
    headline_gap,
    merge_group_confusions,
    wilson_interval,
)

TOL = 1e-12  # federated (summed counts) vs pooled fairlearn: equal up to float rounding
LABELS = ["nontoxic", "toxic"]
JIGSAW = Path("/work/shared/data/jigsaw-sentence-templates/en_sentence_templates_annotated.csv")
RATE_FNS = {"selection_rate": selection_rate, "accuracy": accuracy_score, "tpr": true_positive_rate,
            "fpr": false_positive_rate, "fnr": false_negative_rate,
            "precision": partial(precision_score, zero_division=0)}


# ------------------------------------------------------------------------------------------- helpers


def _none_if_nan(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _value(report: dict, gap: str) -> float | None:
    return report["gaps"][gap]["value"]


def _approx(got: float | None, want: float | None) -> bool:
    if got is None or want is None:
        return got is None and want is None
    return abs(got - want) <= TOL


def _mf(fn, y, p, g) -> MetricFrame:
    # a list, not an object ndarray: fairlearn 0.15 rejects a 1-element object array as "too many dimensions"
    return MetricFrame(metrics=fn, y_true=y, y_pred=p, sensitive_features=list(g))


def fairlearn_reference(y: np.ndarray, p: np.ndarray, g: np.ndarray) -> tuple[pd.DataFrame, dict]:
    """fairlearn on the pooled data: per-group rates, and gaps with each rate over the groups where it is defined.

    fairlearn scores an undefined TPR/FPR as 0; fedpriv leaves such groups out of that gap, so for TPR (FPR)
    the reference restricts the pooled rows to groups with positives (negatives). With every group defined
    this is fairlearn's own functions (checked separately, in test_every_rate_defined_...).
    """
    mf = _mf(RATE_FNS, y, p, g)
    diff, ratio = mf.difference(), mf.ratio()

    def spread(rate, mask):
        if not mask.any():
            return None, None
        if mask.all():
            return _none_if_nan(diff[rate]), _none_if_nan(ratio[rate])
        sub = _mf(RATE_FNS[rate], y[mask], p[mask], g[mask])
        return _none_if_nan(sub.difference()), _none_if_nan(sub.ratio())

    def worst(parts, pick):
        vals = [v for v in parts if v is not None]
        return pick(vals) if vals else None

    tpr_d, tpr_r = spread("tpr", np.isin(g, g[y == 1]))
    fpr_d, fpr_r = spread("fpr", np.isin(g, g[y == 0]))
    return mf.by_group, {
        "demographic_parity_difference": diff["selection_rate"],
        "demographic_parity_ratio": _none_if_nan(ratio["selection_rate"]),
        "equal_opportunity_difference": tpr_d,
        "equal_opportunity_ratio": tpr_r,
        "equalized_odds_difference": worst([tpr_d, fpr_d], max),
        "equalized_odds_ratio": worst([tpr_r, fpr_r], min),
        "accuracy_difference": diff["accuracy"],
        "worst_group_accuracy": mf.group_min()["accuracy"],
    }


def assert_report_matches_fairlearn(rep: dict, y: np.ndarray, p: np.ndarray, g: np.ndarray) -> None:
    by_group, gaps = fairlearn_reference(y, p, g)
    assert sorted(rep["groups"]) == sorted(str(x) for x in by_group.index)
    for idx, row in by_group.iterrows():
        mine = rep["groups"][str(idx)]
        assert mine["n"] == int((g == idx).sum())
        for rate in RATE_FNS:
            v = mine[rate]["value"]
            if v is None:  # only where the denominator is 0; fairlearn/sklearn report 0 there
                assert mine[rate]["undefined_reason"]
                assert row[rate] == 0
            else:
                assert abs(v - row[rate]) <= TOL, (idx, rate)
                assert mine[rate]["ci_low"] <= v <= mine[rate]["ci_high"]
    for gap, want in gaps.items():
        assert _approx(_value(rep, gap), want), (gap, _value(rep, gap), want)
    json.dumps(rep, allow_nan=False)


def _split_over_nodes(y, p, g, node, k, num_classes=2):
    parts = [group_confusions(y[node == i], p[node == i], list(g[node == i]), num_classes=num_classes)
             for i in range(k)]
    parts.append({})  # a node that evaluated nothing
    return merge_group_confusions(parts)


@st.composite
def federated_groups(draw, *, both_classes: bool = False, num_classes: int = 2):
    """(y, p, groups, node, k): binary or multiclass predictions, str or int groups, spread over k nodes."""
    names = draw(st.sampled_from([["a", "b", "c", "d"], [0, 1, 2, 3], ["x y", "ünïcode", "7", "z"]]))
    n_groups = draw(st.integers(1, 4))
    ys, ps, gs = [], [], []
    for name in names[:n_groups]:
        n = draw(st.integers(2 if both_classes else 1, 20))
        y = draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n))
        if both_classes:
            y[:2] = [0, 1]
        ys += y
        ps += draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n))
        gs += [name] * n
    k = draw(st.integers(1, 4))
    node = draw(st.lists(st.integers(0, k - 1), min_size=len(ys), max_size=len(ys)))
    return np.array(ys), np.array(ps), np.array(gs, dtype=object), np.array(node), k


# ------------------------------------------------------------------------------------------- equivalence


@settings(max_examples=25, deadline=None)
@given(federated_groups())
def test_summed_counts_equal_fairlearn_on_pooled_data(case):
    y, p, g, node, k = case
    merged = _split_over_nodes(y, p, g, node, k)
    pooled = group_confusions(y, p, list(g), num_classes=2)
    assert merged.keys() == pooled.keys()
    for name in pooled:
        np.testing.assert_array_equal(merged[name], pooled[name])
    assert_report_matches_fairlearn(fairness_report(merged, labels=LABELS), y, p, g)


@settings(max_examples=12, deadline=None)
@given(federated_groups(both_classes=True))
def test_every_rate_defined_gives_fairlearn_functions_exactly(case):
    y, p, g, node, k = case
    rep = fairness_report(_split_over_nodes(y, p, g, node, k), labels=LABELS)
    kw = {"sensitive_features": list(g)}
    assert all(not gap["excluded"] for name, gap in rep["gaps"].items() if "odds" in name or "opportunity" in name)
    assert _approx(_value(rep, "equalized_odds_difference"), equalized_odds_difference(y, p, agg="worst_case", **kw))
    assert _approx(_value(rep, "equal_opportunity_difference"), equal_opportunity_difference(y, p, **kw))
    assert _approx(_value(rep, "equal_opportunity_ratio"), _none_if_nan(equal_opportunity_ratio(y, p, **kw)))
    assert _approx(_value(rep, "demographic_parity_difference"), demographic_parity_difference(y, p, **kw))
    assert _approx(_value(rep, "demographic_parity_ratio"), _none_if_nan(demographic_parity_ratio(y, p, **kw)))
    ref = equalized_odds_ratio(y, p, agg="worst_case", **kw)
    if math.isnan(ref):  # fairlearn: min([nan, fpr_ratio]) is nan; fedpriv takes the defined component
        assert _value(rep, "equalized_odds_ratio") == rep["gaps"]["equalized_odds_ratio"]["components"]["fpr_ratio"]
    else:
        assert _approx(_value(rep, "equalized_odds_ratio"), ref)


@settings(max_examples=8, deadline=None)
@given(federated_groups(num_classes=3))
def test_multiclass_is_one_vs_rest_fairlearn(case):
    y, p, g, node, k = case
    labels = ["neg", "neu", "pos"]
    rep = fairness_report(_split_over_nodes(y, p, g, node, k, num_classes=3), labels=labels)
    assert rep["kind"] == "multiclass"
    acc = _mf(accuracy_score, y, p, g).by_group
    for idx, v in acc.items():
        assert abs(rep["groups"][str(idx)]["accuracy"]["value"] - v) <= TOL
    for c, label in enumerate(labels):
        yb, pb = (y == c).astype(int), (p == c).astype(int)
        for gap, want in fairlearn_reference(yb, pb, g)[1].items():
            if gap not in ("accuracy_difference", "worst_group_accuracy"):
                assert _approx(_value(rep["per_class"][label], gap), want), (label, gap)
    eo = [_value(r, "equalized_odds_difference") for r in rep["per_class"].values()]
    assert _value(rep, "equalized_odds_difference") == max(v for v in eo if v is not None)
    assert _approx(_value(rep, "worst_group_accuracy"), float(acc.min()))
    json.dumps(rep, allow_nan=False)


# ------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def jigsaw_sample():
    """A stratified sample of the Jigsaw sentence templates: 250 toxic + 250 nontoxic per identity category.

    Stratified (not a plain random sample) so that every group keeps the 50% base rate of the full set and a
    perfect predictor has exactly equal selection rates.
    """
    if not JIGSAW.exists():
        pytest.skip(f"{JIGSAW} not present (shared data set of the project; see its PROVENANCE.md)")
    df = pd.read_csv(JIGSAW, usecols=["label", "identity_category"])
    parts = [grp.sample(n=250, random_state=0) for _, grp in df.groupby(["identity_category", "label"])]
    sample = pd.concat(parts).sample(frac=1.0, random_state=1)
    y = sample["label"].to_numpy()
    g = sample["identity_category"].to_numpy(dtype=object)
    node = np.random.default_rng(2).integers(0, 4, size=len(y))
    return y, g, node


def test_jigsaw_perfect_predictor_has_zero_gaps(jigsaw_sample):
    y, g, node = jigsaw_sample
    rep = fairness_report(_split_over_nodes(y, y.copy(), g, node, 4), labels=LABELS)
    assert len(rep["groups"]) == 7 and rep["small_groups"] == []
    for gap in ("demographic_parity_difference", "equalized_odds_difference", "equal_opportunity_difference",
                "accuracy_difference"):
        assert _value(rep, gap) == 0.0, gap
    assert _value(rep, "demographic_parity_ratio") == 1.0
    assert _value(rep, "worst_group_accuracy") == 1.0
    # FPR is 0 in every group: its ratio is 0/0, so the equalized-odds ratio is the TPR ratio, 1.
    assert rep["gaps"]["equalized_odds_ratio"]["components"] == {"tpr_ratio": 1.0, "fpr_ratio": None}
    assert _value(rep, "equalized_odds_ratio") == 1.0


def test_jigsaw_flipped_group_has_hand_computed_gaps(jigsaw_sample):
    y, g, node = jigsaw_sample
    p = np.where(g == "religion", 1 - y, y)
    rep = fairness_report(_split_over_nodes(y, p, g, node, 4), labels=LABELS)
    # religion: 250 positives all predicted 0, 250 negatives all predicted 1 -> TP=0, FN=250, FP=250, TN=0.
    assert rep["groups"]["religion"]["counts"] == {"tp": 0, "fp": 250, "fn": 250, "tn": 0}
    rel = {k: rep["groups"]["religion"][k]["value"] for k in ("selection_rate", "accuracy", "tpr", "fpr")}
    assert rel == {"selection_rate": 0.5, "accuracy": 0.0, "tpr": 0.0, "fpr": 1.0}
    # Every other group is predicted perfectly: selection 0.5, accuracy 1, TPR 1, FPR 0.
    expected = {"demographic_parity_difference": 0.0,  # balanced data: flipping keeps selection at 0.5
                "demographic_parity_ratio": 1.0,
                "equal_opportunity_difference": 1.0, "equalized_odds_difference": 1.0,
                "equal_opportunity_ratio": 0.0, "equalized_odds_ratio": 0.0,
                "accuracy_difference": 1.0, "worst_group_accuracy": 0.0}
    assert {k: _value(rep, k) for k in expected} == expected
    assert rep["gaps"]["worst_group_accuracy"]["group"] == "religion"
    assert_report_matches_fairlearn(rep, y, p, g)


def test_jigsaw_group_always_flagged_toxic(jigsaw_sample):
    y, g, node = jigsaw_sample
    p = np.where(g == "disability", 1, y)
    rep = fairness_report(_split_over_nodes(y, p, g, node, 4), labels=LABELS)
    # disability: TP=250, FP=250 -> selection 1, TPR 1, FPR 1, accuracy 0.5; others: 0.5, 1, 0, 1.
    expected = {"demographic_parity_difference": 0.5, "demographic_parity_ratio": 0.5,
                "equal_opportunity_difference": 0.0, "equalized_odds_difference": 1.0,
                "accuracy_difference": 0.5, "worst_group_accuracy": 0.5}
    assert {k: _value(rep, k) for k in expected} == expected
    assert rep["gaps"]["equalized_odds_difference"]["binding"] == "fpr_difference"
    assert rep["gaps"]["demographic_parity_difference"]["max_group"] == "disability"
    assert headline_gap(rep) == ("equalized_odds_difference", 1.0)
    assert_report_matches_fairlearn(rep, y, p, g)


# ------------------------------------------------------------------------------------------- edge cases


def _report(y, p, g, **kw):
    return fairness_report(group_confusions(y, p, g, num_classes=2), labels=LABELS, **kw)


def test_single_group_gaps_are_zero_like_fairlearn():
    y, p = np.array([0, 1, 1, 0, 1]), np.array([0, 1, 0, 1, 1])
    rep = _report(y, p, ["all"] * 5)
    for gap in ("demographic_parity_difference", "equalized_odds_difference", "accuracy_difference"):
        assert _value(rep, gap) == 0.0
    assert _value(rep, "demographic_parity_ratio") == 1.0
    assert _value(rep, "equalized_odds_difference") == equalized_odds_difference(y, p, sensitive_features=["all"] * 5)


def test_group_without_positives_is_excluded_from_tpr_gaps():
    y = [1, 1, 0, 0, 0, 0]
    p = [1, 0, 0, 1, 0, 0]
    rep = _report(y, p, ["a", "a", "a", "a", "b", "b"])
    b = rep["groups"]["b"]
    assert b["tpr"] == {"value": None, "ci_low": None, "ci_high": None, "undefined_reason": "no positive examples"}
    assert b["fnr"]["value"] is None and b["fpr"]["value"] == 0.0
    eop = rep["gaps"]["equal_opportunity_difference"]
    assert eop["value"] == 0.0 and eop["groups_compared"] == 1
    assert eop["excluded"] == {"b": "tpr undefined: no positive examples"}
    eo = rep["gaps"]["equalized_odds_difference"]
    assert eo["value"] == 0.5 and eo["binding"] == "fpr_difference"  # FPR a = 1/2, b = 0
    assert eo["excluded"] == {"b": "tpr undefined: no positive examples"}


def test_group_without_negatives_has_undefined_fpr():
    rep = _report([1, 1, 0, 1], [1, 0, 0, 1], ["a", "a", "a", "b"])
    assert rep["groups"]["b"]["fpr"]["undefined_reason"] == "no negative examples"
    assert rep["gaps"]["equalized_odds_difference"]["excluded"] == {"b": "fpr undefined: no negative examples"}


def test_no_positive_predictions_makes_precision_undefined():
    rep = _report([1, 0], [0, 0], ["a", "a"])
    assert rep["groups"]["a"]["precision"]["undefined_reason"] == "no positive predictions"


def test_all_zero_selection_makes_parity_ratio_undefined():
    rep = _report([1, 0, 1, 0], [0, 0, 0, 0], ["a", "a", "b", "b"])
    gap = rep["gaps"]["demographic_parity_ratio"]
    assert gap["value"] is None and "0/0" in gap["undefined_reason"]
    assert _value(rep, "demographic_parity_difference") == 0.0


def test_empty_node_and_empty_group():
    a = group_confusions([0, 1, 1], [0, 1, 0], ["x", "x", "y"], num_classes=2)
    merged = merge_group_confusions([a, {"x": np.zeros((2, 2), np.int64), "z": np.zeros((2, 2), np.int64)}, {}])
    np.testing.assert_array_equal(merged["x"], a["x"])
    rep = fairness_report(merged, labels=LABELS)
    z = rep["groups"]["z"]
    assert z["n"] == 0 and z["small_group"]
    assert all(z[r]["value"] is None for r in ("selection_rate", "accuracy", "tpr", "fpr", "fnr", "precision"))
    assert rep["gaps"]["accuracy_difference"]["excluded"] == {"z": "accuracy undefined: no examples"}
    json.dumps(rep, allow_nan=False)


def test_no_groups_at_all():
    rep = fairness_report({}, labels=LABELS)
    assert rep["groups"] == {} and _value(rep, "equalized_odds_difference") is None
    assert check_thresholds(rep, {"max-equalized-odds-difference": 0.1}) == []


@pytest.mark.parametrize("groups", [[1, 1, 2], ["1", "1", "2"], np.array([1, 1, 2]), pd.Series([1, 1, 2])],
                         ids=["int", "str", "numpy-int", "pandas"])
def test_group_values_are_keyed_by_their_string(groups):
    cms = group_confusions([0, 1, 1], [0, 1, 0], groups, num_classes=2)
    assert list(cms) == ["1", "2"]
    np.testing.assert_array_equal(cms["1"], [[1, 0], [0, 1]])


@pytest.mark.parametrize("blank", [None, float("nan"), np.nan, "", "  ", pd.NA], ids=repr)
def test_missing_group_values_raise_or_map_to_unknown(blank):
    groups = ["a", blank, "b", blank]
    with pytest.raises(ValueError) as e:
        group_confusions([0, 1, 0, 1], [0, 1, 1, 1], groups, num_classes=2)
    assert str(e.value) == ERR_MISSING_GROUP.format(index="1, 3")
    cms = group_confusions([0, 1, 0, 1], [0, 1, 1, 1], groups, num_classes=2, missing="unknown")
    assert sorted(cms) == ["a", "b", UNKNOWN_GROUP]
    np.testing.assert_array_equal(cms[UNKNOWN_GROUP], [[0, 0], [0, 2]])


def test_many_missing_values_are_summarised_and_mode_is_validated():
    with pytest.raises(ValueError) as e:
        group_confusions([0] * 12, [0] * 12, [None] * 12, num_classes=2)
    assert str(e.value) == ERR_MISSING_GROUP.format(index="0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more")
    with pytest.raises(ValueError) as e:
        group_confusions([0], [0], ["a"], num_classes=2, missing="drop")
    assert str(e.value) == ERR_MISSING_MODE.format(modes=("raise", "unknown"), value="drop")


def test_small_groups_are_flagged_not_dropped():
    rep = _report([0, 1] * 20 + [0, 1], [0, 1] * 20 + [1, 1], ["big"] * 40 + ["small"] * 2, min_group_size=30)
    assert rep["small_groups"] == ["small"] and rep["groups"]["small"]["small_group"]
    assert not rep["groups"]["big"]["small_group"]
    assert _value(rep, "accuracy_difference") == 0.5


def test_positive_index_zero_swaps_the_roles():
    y, p, g = [0, 0, 1, 1, 0], [0, 1, 1, 0, 0], ["a", "a", "b", "b", "b"]
    swapped = _report(y, p, g, positive_index=0)
    flipped = _report([1 - v for v in y], [1 - v for v in p], g, positive_index=1)
    assert swapped["groups"] == flipped["groups"] and swapped["gaps"] == flipped["gaps"]
    assert swapped["positive_label"] == "nontoxic"


def test_report_argument_errors():
    cm = {"a": np.zeros((2, 2), np.int64)}
    with pytest.raises(ValueError) as e:
        fairness_report(cm, labels=["only"])
    assert str(e.value) == ERR_LABELS.format(labels=["only"])
    with pytest.raises(ValueError) as e:
        fairness_report(cm, labels=LABELS, positive_index=2)
    assert str(e.value) == ERR_POSITIVE_INDEX.format(c=2, labels=LABELS, value=2)
    with pytest.raises(ValueError) as e:
        fairness_report(cm, labels=["a", "b", "c"])
    assert str(e.value) == ERR_REPORT_SHAPE.format(group="a", got=(2, 2), expected=(3, 3), labels=["a", "b", "c"])
    with pytest.raises(ValueError) as e:
        fairness_report(cm, labels=LABELS, confidence=1.0)
    assert str(e.value) == ERR_CONFIDENCE.format(value=1.0)


def test_merge_collects_every_problem():
    bad = [{"a": np.zeros((2, 2), int)}, {"a": np.zeros((3, 3), int), "b": np.array([[-1, 0], [0, 0]])}]
    with pytest.raises(ValueError) as e:
        merge_group_confusions(bad)
    assert str(e.value) == ERR_MERGE.format(problems=(
        "node 1, group 'a': shape (3, 3), expected (2, 2); node 1, group 'b': confusion matrix must be a square "
        "2-D array of non-negative integer counts, got a negative count (-1)"))


def test_wire_round_trip_and_validation():
    cms = group_confusions([0, 1, 1], [0, 1, 0], ["x", "x", "y"], num_classes=2)
    wire = json.loads(json.dumps(group_confusions_to_wire(cms, labels=LABELS)))
    assert wire == {"labels": LABELS, "groups": {"x": [[1, 0], [0, 1]], "y": [[0, 0], [1, 0]]}}
    back = group_confusions_from_wire(wire, labels=LABELS)
    assert back.keys() == cms.keys() and all((back[k] == cms[k]).all() for k in cms)
    with pytest.raises(ValueError) as e:
        group_confusions_from_wire({"labels": ["toxic", "nontoxic"], "groups": {"x": [[1, 2, 3]]}}, labels=LABELS)
    assert str(e.value) == ERR_WIRE.format(problems=(
        "labels ['toxic', 'nontoxic'], expected ['nontoxic', 'toxic']; group 'x': confusion matrix must be a "
        "square 2-D array of non-negative integer counts, got shape (1, 3)"))


# ------------------------------------------------------------------------------------------- Wilson


NEWCOMBE_1998 = [  # Newcombe, Stat. Med. 17 (1998) 857-872, Table I, method 3 (Wilson score), 95%
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)]


@pytest.mark.parametrize(("k", "n", "low", "high"), NEWCOMBE_1998)
def test_wilson_golden_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert (round(lo, 4), round(hi, 4)) == (low, high)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
       st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_wilson_equals_scipy(kn, confidence):
    k, n = kn
    ref = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    lo, hi = wilson_interval(k, n, confidence=confidence)
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)
    assert lo <= k / n <= hi


def test_report_intervals_use_the_confidence_level():
    y, p, g = [0, 1] * 50, [0, 1] * 40 + [1, 0] * 10, ["a"] * 100
    wide, narrow = _report(y, p, g, confidence=0.99), _report(y, p, g, confidence=0.8)
    assert wide["groups"]["a"]["accuracy"]["ci_low"] == wilson_interval(80, 100, confidence=0.99)[0]
    assert wide["groups"]["a"]["accuracy"]["ci_low"] < narrow["groups"]["a"]["accuracy"]["ci_low"]


# ------------------------------------------------------------------------------------------- thresholds


def test_thresholds():
    rep = _report([0, 1, 0, 1], [0, 1, 1, 0], ["a", "a", "b", "b"])
    assert check_thresholds(rep, {"max-equalized-odds-difference": 1.0, "min-worst-group-accuracy": 0.0}) == []
    assert check_thresholds(rep, {"max-equalized-odds-difference": 0.1, "min-worst-group-accuracy": 0.5}) == [
        {"metric": "equalized_odds_difference", "value": 1.0, "threshold": 0.1,
         "rule": "max-equalized-odds-difference"},
        {"metric": "worst_group_accuracy", "value": 0.0, "threshold": 0.5, "rule": "min-worst-group-accuracy"}]
    with pytest.raises(ValueError) as e:
        check_thresholds(rep, {"max-eo": 0.1, "max-equalized-odds-difference": 0.1})
    assert str(e.value) == ERR_THRESHOLD_KEY.format(keys="'max-eo'", valid=", ".join(THRESHOLDS))
    with pytest.raises(ValueError) as e:
        check_thresholds(rep, {"max-accuracy-difference": float("nan")})
    assert str(e.value) == ERR_THRESHOLD_VALUE.format(key="max-accuracy-difference", value=float("nan"))


def test_undefined_gap_is_not_a_violation():
    rep = _report([1, 0], [0, 0], ["a", "b"])  # all selection rates 0: parity ratio 0/0
    assert _value(rep, "demographic_parity_ratio") is None
    assert check_thresholds(rep, {"min-demographic-parity-ratio": 0.8}) == []


def test_threshold_keys_match_the_run_config():
    from common.config import FAIRNESS_THRESHOLD_KEYS

    assert set(THRESHOLDS) == set(FAIRNESS_THRESHOLD_KEYS)


def test_headline_gap_of_absent_report():
    assert headline_gap({}) == ("equalized_odds_difference", None)


# ------------------------------------------------------------------------------------------- DP noise

N_DRAWS = 200_000  # noise samples per epsilon
SIGMAS = 5.0  # statistical tolerance: estimates within 5 standard errors (false failure < 1e-6 per check)


@pytest.mark.parametrize("epsilon", [0.3, 1.0, 3.0])
def test_discrete_laplace_has_scale_one_over_epsilon(epsilon):
    noise = discrete_laplace((N_DRAWS,), epsilon=epsilon, rng=np.random.default_rng(7)).astype(float)
    q = math.exp(-epsilon)
    var = 2 * q / (1 - q) ** 2  # moments of P(k) = (1-q)/(1+q) q^|k|
    mu4 = 2 * q * (1 + 11 * q + 11 * q**2 + q**3) / ((1 + q) * (1 - q) ** 4)
    assert abs(noise.mean()) <= SIGMAS * math.sqrt(var / N_DRAWS)
    assert abs(noise.var() - var) <= SIGMAS * math.sqrt((mu4 - var**2) / N_DRAWS)
    for k in (-2, -1, 0, 1, 2):  # the pmf itself, whose ratio between neighbours is exactly e^-epsilon
        pk = (1 - q) / (1 + q) * q ** abs(k)
        assert abs((noise == k).mean() - pk) <= SIGMAS * math.sqrt(pk * (1 - pk) / N_DRAWS), k


def test_noisy_counts_unbiased_away_from_zero_and_clamped_at_zero():
    rng = np.random.default_rng(3)
    big = np.full((2, 2), 10_000, dtype=np.int64)
    draws = np.stack([noisy_counts(big, epsilon=0.5, rng=rng) for _ in range(20_000)]) - big
    q = math.exp(-0.5)
    assert abs(draws.mean()) <= SIGMAS * math.sqrt(2 * q / (1 - q) ** 2 / draws.size)
    zero = noisy_counts(np.zeros((3, 3), np.int64), epsilon=0.1, rng=rng)
    assert zero.dtype == np.int64 and (zero >= 0).all()


def test_noisy_counts_reproducible_with_a_seed():
    cms = group_confusions([0, 1, 1, 0], [0, 1, 0, 0], ["a", "a", "b", "c"], num_classes=2)
    one = noisy_group_confusions(cms, epsilon=1.0, rng=np.random.default_rng(11))
    two = noisy_group_confusions(cms, epsilon=1.0, rng=np.random.default_rng(11))
    assert one.keys() == two.keys() and all((one[k] == two[k]).all() for k in one)


def test_noisy_group_confusions_with_public_group_list():
    cms = group_confusions([0, 1], [0, 1], ["a", "a"], num_classes=2)
    out = noisy_group_confusions(cms, epsilon=1.0, rng=np.random.default_rng(0), all_groups=["a", "b"])
    assert list(out) == ["a", "b"] and out["b"].shape == (2, 2)
    empty = noisy_group_confusions({}, epsilon=1.0, rng=np.random.default_rng(0), all_groups=["a"], num_classes=3)
    assert empty["a"].shape == (3, 3)
    with pytest.raises(ValueError) as e:
        noisy_group_confusions(cms, epsilon=1.0, rng=np.random.default_rng(0), all_groups=["b"])
    assert str(e.value) == ERR_UNLISTED_GROUPS.format(groups=["a"])


@pytest.mark.parametrize("epsilon", [0, -1.0, float("nan"), float("inf"), True, "1"], ids=repr)
def test_epsilon_is_validated(epsilon):
    with pytest.raises(ValueError) as e:
        noisy_counts(np.zeros((2, 2), np.int64), epsilon=epsilon, rng=np.random.default_rng(0))
    assert str(e.value) == ERR_EPSILON.format(value=epsilon)


def test_rng_must_be_a_generator():
    with pytest.raises(TypeError) as e:
        noisy_counts(np.zeros((2, 2), np.int64), epsilon=1.0, rng=np.random)
    assert str(e.value) == ERR_RNG.format(type="module")
