"""Evaluation replies are validated like training replies: the real round loop (server.loop.run_federation)
driven in-process by two honest scripted nodes and one that sends a malformed evaluation reply. The bad reply
is rejected and recorded in the round's ``rejected`` list; the honest counts alone make the metrics; the run
goes on to its last round.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

LABELS = ["negative", "positive"]
HONEST = [[5, 1], [2, 7]]  # 15 examples
BAD_NODE = 3


def _counts(groups, labels=LABELS) -> str:
    return json.dumps({"labels": labels, "groups": groups})


# name -> (metrics of the bad node's evaluation reply, its info, text expected in the rejection reason)
BAD_REPLIES = {
    "broadcastable 1x1 matrix": ({"num-examples": 100}, {"counts": _counts({"all": [[100]]})}, "shape (1, 1)"),
    "negative count": ({"num-examples": 13}, {"counts": _counts({"all": [[5, -1], [2, 7]]})}, "negative count"),
    "no counts record": ({"num-examples": 15}, {}, "no 'counts'"),
    "counts not JSON": ({"num-examples": 15}, {"counts": "[[5, 1"}, "not JSON"),
    "fractional counts": ({"num-examples": 15}, {"counts": _counts({"all": [[4.5, 1.5], [2, 7]]})}, "dtype"),
    "text counts": ({"num-examples": 15}, {"counts": _counts({"all": [["5", "1"], ["2", "7"]]})}, "dtype"),
    "ragged matrix": ({"num-examples": 15}, {"counts": _counts({"all": [[5, 1], [2]]})}, "group 'all'"),
    "groups not a mapping": ({"num-examples": 15}, {"counts": json.dumps({"labels": LABELS, "groups": [1]})},
                             "'groups' must be an object"),
    "other labels": ({"num-examples": 15}, {"counts": _counts({"all": HONEST}, ["pos", "neg"])}, "labels"),
    "labels not a list": ({"num-examples": 15}, {"counts": _counts({"all": HONEST}, 5)}, "labels 5"),
    "sum differs from num-examples": ({"num-examples": 100}, {"counts": _counts({"all": HONEST})},
                                      "counts sum to 15, but num-examples is 100"),
    "negative num-examples": ({"num-examples": -15}, {"counts": _counts({"all": HONEST})}, "num-examples"),
    "no metrics record": (None, {"counts": _counts({"all": HONEST})}, "num-examples"),
    "nan loss-sum": ({"num-examples": 15, "loss-sum": float("nan")}, {"counts": _counts({"all": HONEST})},
                     "loss-sum"),
    "info not an object": ({"num-examples": 15}, "[1, 2]", "not a JSON object"),
    "ledger entry not an object": ({"num-examples": 15},
                                   {"counts": _counts({"all": HONEST}), "ledger_entry": "x"}, "ledger_entry"),
}


class EvalGrid:
    """Three nodes; training adds ``0.01 * round`` to every tensor (all honest). Evaluation: nodes 1 and 2
    send HONEST counts, node 3 sends ``bad`` (metrics, info) or, with ``bad=None``, HONEST too."""

    def __init__(self, bad=None) -> None:
        self.ids = [1, 2, 3]
        self.bad = bad
        self.eval_rounds: list[int] = []

    def get_node_ids(self):
        return list(self.ids)

    def send_and_receive(self, msgs, *, timeout=None):
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

        out = []
        for msg in msgs:
            rnd = int(msg.content["config"]["server-round"])
            nid = int(msg.metadata.dst_node_id)
            name = f"node-{nid}"
            if msg.metadata.message_type == "train":
                arrays = {k: np.ascontiguousarray(v.numpy() + 0.01 * rnd) for k, v in msg.content["arrays"].items()}
                content = RecordDict({
                    "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                    "metrics": MetricRecord({"num-examples": 50, "train-loss": 0.5}),
                    "info": ConfigRecord({"json": json.dumps({"node": name, "status": "ok"})}),
                })
            else:
                self.eval_rounds.append(rnd)
                metrics, info = {"num-examples": 15, "loss-sum": 3.0}, {"node": name, "counts": _counts({"all": HONEST})}
                if nid == BAD_NODE and self.bad is not None:
                    metrics, info = self.bad
                    if isinstance(info, dict):
                        info = {"node": name, **info}
                records = {"info": ConfigRecord({"json": info if isinstance(info, str) else json.dumps(info)})}
                if metrics is not None:
                    records["metrics"] = MetricRecord(metrics)
                content = RecordDict(records)
            out.append(Message(content, reply_to=msg))
        return out


def _run(tmp_path, grid, **kw):
    from common.config import RunConfig
    from server.loop import run_federation

    cfg = RunConfig(num_server_rounds=2, model="tiny", labels=",".join(LABELS), dp=False, min_nodes=2,
                    out=str(tmp_path / "run"), **kw)
    summary = run_federation(grid, cfg, wait_timeout=5)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_a_bad_evaluation_reply_is_rejected_and_the_run_continues(tmp_path, server_task, case) -> None:
    metrics, info, reason = BAD_REPLIES[case]
    grid = EvalGrid(bad=(metrics, info))
    summary, rows = _run(tmp_path, grid)
    assert summary.rounds_done == 2 and [r["round"] for r in rows] == [1, 2]
    assert grid.eval_rounds == [1, 1, 1, 2, 2, 2]
    for row in rows:
        assert row["status"] == "ok" and row["nodes_trained"] == 3
        assert [(x["node"], x["phase"]) for x in row["rejected"]] == [(f"node-{BAD_NODE}", "evaluate")]
        assert reason in row["rejected"][0]["reason"]
        # only the two honest nodes' counts are summed
        assert row["classification"]["confusion_matrix"] == [[10, 2], [4, 14]]
        assert row["num_examples_val"] == 30
        assert row["loss"] == pytest.approx(6.0 / 30)


def test_honest_and_noised_counts_are_accepted(tmp_path, server_task) -> None:
    # A node that noised its counts (count_noise_epsilon > 0) has a total that differs from num-examples.
    noised = ({"num-examples": 15, "loss-sum": 0.0},
              {"counts": _counts({"all": [[6, 0], [3, 9]]}), "count_noise_epsilon": 1.0})
    _, rows = _run(tmp_path, EvalGrid(bad=noised))
    assert all(r["rejected"] == [] for r in rows)
    assert rows[-1]["classification"]["confusion_matrix"] == [[16, 2], [7, 23]]
    assert rows[-1]["num_examples_val"] == 45


def test_parse_eval_reply_collects_every_counts_problem() -> None:
    from server.validate import ReplyRejected, parse_eval_reply

    info = {"counts": _counts({"a": [[1, -2], [3, 4]], "b": [[1]]}, ["x", "y"])}
    with pytest.raises(ReplyRejected) as exc:
        parse_eval_reply(info, {"num-examples": 6}, labels=LABELS)
    msg = str(exc.value)
    assert "labels ['x', 'y']" in msg and "group 'a'" in msg and "group 'b'" in msg
    ok = parse_eval_reply({"counts": _counts({"g": HONEST})}, {"num-examples": 15}, labels=LABELS)
    assert ok.num_examples == 15 and ok.loss_sum is None and ok.groups["g"].tolist() == HONEST  # no exact loss sent
    withheld = parse_eval_reply({"status": "withheld"}, {"num-examples": 15}, labels=LABELS)
    assert withheld.withheld and withheld.groups == {} and withheld.loss_sum is None  # not an error
