"""Typed metrics rows and fairness reports: reading what was written gives back the same JSON, key for key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.fairness import FairnessReport, fairness_report
from server.rows import Evaluation, RoundRow
from server.rundir import RunDir

CMS = {"a": np.array([[5, 1], [2, 7]]), "b": np.array([[3, 0], [0, 0]])}


@pytest.mark.parametrize("labels", [["neg", "pos"], ["x", "y", "z"]])
def test_fairness_report_round_trips(labels) -> None:
    cms = CMS if len(labels) == 2 else {"a": np.arange(9).reshape(3, 3), "b": np.eye(3, dtype=int)}
    rep = fairness_report(cms, labels=labels, min_group_size=5)
    typed = FairnessReport.from_json(json.loads(json.dumps(rep)))
    assert typed.to_json() == json.loads(json.dumps(rep))
    assert typed.headline() == rep["gaps"]["equalized_odds_difference"]["value"]
    assert typed.gap("no such gap") is None


def test_rate_reads_a_group_rate() -> None:
    typed = FairnessReport.from_json(fairness_report(CMS, labels=["neg", "pos"]))
    assert typed.rate("a", "tpr") == pytest.approx(7 / 9)
    assert typed.rate("b", "tpr") is None  # no positives: undefined
    assert typed.rate("missing", "tpr") is None


def _old_row() -> dict:
    """A row as the round loop wrote it before rows were typed (plus a key this version does not know)."""
    rep = fairness_report(CMS, labels=["neg", "pos"])
    return {"round": 3, "run": "r1", "status": "failed", "reason": "1 usable updates < min-nodes=2",
            "nodes_sampled": 2, "nodes_trained": 1, "bytes_down": 10, "bytes_up": 5,
            "refusals": [{"node": "n1", "reason": "budget"}], "rejected": [], "errors": [],
            "nodes": {"n0": {"status": "ok", "epsilon": 1.5}}, "epsilon": {"n0": 1.5}, "eval_nodes": 2,
            "num_examples_val": 18, "loss": 0.4, "accuracy": 0.8, "macro_f1": 0.7,
            "classification": {"accuracy": 0.8}, "fairness": rep, "eval_loss": 0.5, "eval_accuracy": None,
            "eval_macro_f1": None, "fairness_violations": [], "train_loss": None, "seconds": 1.5,
            "selection": {"metric": "accuracy", "best_round": 2}, "stopped": "early stopping", "future_key": 1}


def test_row_round_trips_through_metrics_jsonl(tmp_path) -> None:
    rd = RunDir(tmp_path)
    rd.append_metrics(RoundRow.from_json(_old_row()))
    (row,) = rd.read_rows()
    assert row.to_json() == json.loads(json.dumps(_old_row()))
    assert rd.read_metrics() == [json.loads(json.dumps(_old_row()))]
    assert row.held_out == Evaluation(loss=0.5)
    assert row.fairness is not None and row.metric("accuracy") == 0.8 and row.metric("eval_accuracy") is None


def test_optional_keys_stay_absent() -> None:
    out = RoundRow(round=1, run="r").to_json()
    for key in ("reason", "central_epsilon", "fairness_violations", "stopped", "selection", "classification",
                "fairness", "eval_accuracy", "eval_loss"):
        assert key not in out
    assert out["accuracy"] is None and out["loss"] is None
