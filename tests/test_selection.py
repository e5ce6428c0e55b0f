"""Model selection and early stopping: the rule on scripted metric sequences, and the real server round loop
(server.loop.run_federation) driven by scripted in-process nodes, so the round it stops at, the weights in
best/ and the training messages it stops sending are all checked without Ray.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.selection import Selection, resolve_metric


def _run(seq, **kw):
    sel = Selection(metric=kw.pop("metric", "accuracy"), **kw)
    for rnd, value in enumerate(seq, start=1):
        _, stop = sel.update(rnd, {"status": "ok", sel.metric: value})
        if stop:
            return rnd, sel
    return None, sel


def test_stops_after_patience_rounds_without_improvement() -> None:
    stop, sel = _run([0.5, 0.6, 0.6, 0.59, 0.7], patience=2)
    assert stop == 4 and sel.best_round == 2 and sel.best_value == 0.6
    assert "accuracy did not improve" in sel.stopped and "best 0.6000 at round 2" in sel.stopped


def test_min_delta_must_be_exceeded() -> None:
    stop, sel = _run([0.5, 0.505, 0.51, 0.52], patience=2, min_delta=0.01)
    assert stop == 3 and sel.best_round == 1
    stop, sel = _run([0.5, 0.52, 0.54, 0.56], patience=1, min_delta=0.01)
    assert stop is None and sel.best_round == 4


def test_loss_is_minimised() -> None:
    stop, sel = _run([1.0, 0.8, 0.9, 0.85], metric="loss", patience=2)
    assert stop == 4 and sel.best_round == 2 and sel.mode == "min"


def test_failed_or_missing_rounds_do_not_improve() -> None:
    sel = Selection(metric="accuracy", patience=2)
    sel.update(1, {"status": "ok", "accuracy": 0.5})
    assert sel.update(2, {"status": "failed", "accuracy": 0.9}) == (False, False)
    assert sel.update(3, {"status": "ok", "accuracy": None}) == (False, True)
    assert sel.best_round == 1


def test_patience_zero_selects_but_never_stops() -> None:
    stop, sel = _run([0.9, 0.1, 0.1, 0.1, 0.1], patience=0)
    assert stop is None and sel.best_round == 1


def test_state_survives_a_restart() -> None:
    _, sel = _run([0.5, 0.7, 0.6], patience=3)
    again = Selection.from_state(json.loads(json.dumps(sel.state_dict())), metric="accuracy", patience=3,
                                 min_delta=0.0)
    assert (again.best_round, again.best_value, again.bad_rounds) == (2, 0.7, 1)
    assert Selection.from_state(sel.state_dict(), metric="macro_f1", patience=3, min_delta=0.0).best_round == 0


def test_auto_metric() -> None:
    assert resolve_metric("auto", has_eval_data=True) == "eval_accuracy"
    assert resolve_metric("auto", has_eval_data=False) == "accuracy"
    assert resolve_metric("macro_f1", has_eval_data=True) == "macro_f1"


# ------------------------------------------------------------------ the round loop with scripted nodes

SCRIPT = [0.50, 0.70, 0.65, 0.69, 0.90, 0.95]  # federated accuracy per round; patience 2 stops after round 4


class ScriptedGrid:
    """A Grid whose nodes train by adding ``0.01 * round`` to every trainable tensor and report confusion
    counts whose accuracy follows SCRIPT. Messages are answered in-process."""

    def __init__(self, nodes: int = 2) -> None:
        self.ids = list(range(1, nodes + 1))
        self.train_rounds: list[int] = []

    def get_node_ids(self):
        return list(self.ids)

    def send_and_receive(self, msgs, *, timeout=None):
        from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

        out = []
        for msg in msgs:
            rnd = int(msg.content["config"]["server-round"])
            name = f"node-{msg.metadata.dst_node_id}"
            if msg.metadata.message_type == "train":
                self.train_rounds.append(rnd)
                arrays = {k: v.numpy() + 0.01 * rnd for k, v in msg.content["arrays"].items()}
                content = RecordDict({
                    "arrays": ArrayRecord({k: _array(v) for k, v in arrays.items()}),
                    "metrics": MetricRecord({"num-examples": 50, "train-loss": 0.5}),
                    "info": ConfigRecord({"json": json.dumps({"node": name, "status": "ok"})}),
                })
            else:
                right = round(100 * SCRIPT[rnd - 1])
                cm = [[right // 2, 50 - right // 2], [50 - (right - right // 2), right - right // 2]]
                info = {"node": name, "counts": json.dumps({"labels": ["negative", "positive"],
                                                           "groups": {"all": cm}})}
                content = RecordDict({"metrics": MetricRecord({"num-examples": 100, "loss-sum": 50.0}),
                                      "info": ConfigRecord({"json": json.dumps(info)})})
            out.append(Message(content, reply_to=msg))
        return out


def _array(v):
    from flwr.app import Array

    return Array(np.ascontiguousarray(v))


def test_round_loop_stops_early_and_keeps_the_best_round(tmp_path, server_task) -> None:
    from common.config import RunConfig
    from common.model import ModelSpec, build_model, trainable_state
    from server.loop import run_federation
    from serving.compress import load_classifier

    cfg = RunConfig(num_server_rounds=len(SCRIPT), model="tiny", labels="negative,positive", dp=False,
                    min_nodes=2, out=str(tmp_path / "run"), early_stopping_patience=2)
    grid = ScriptedGrid()
    summary = run_federation(grid, cfg, wait_timeout=5)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert [round(r["accuracy"], 2) for r in rows] == SCRIPT[:4]
    assert grid.train_rounds == [1, 1, 2, 2, 3, 3, 4, 4]  # nothing is sent to train after the stop
    assert "early stopping after round 4" in rows[-1]["stopped"] and summary.stopped_reason == rows[-1]["stopped"]
    assert rows[-1]["selection"]["best_round"] == 2

    # best/ holds round 2's weights (initial + 0.01 + 0.02); model/ holds round 4's (initial + 0.10)
    init = trainable_state(build_model(ModelSpec(source="tiny", labels=("negative", "positive"), top_k_layers=0)))
    best, _ = load_classifier(tmp_path / "run" / "best", device="cpu")
    final, _ = load_classifier(tmp_path / "run" / "model", device="cpu")
    best_sd, final_sd = best.state_dict(), final.state_dict()
    for k, v in init.items():
        np.testing.assert_allclose(best_sd[k].numpy(), v + 0.03, atol=1e-5)
        np.testing.assert_allclose(final_sd[k].numpy(), v + 0.10, atol=1e-5)
    sel = json.loads((tmp_path / "run" / "best" / "fedpriv-selection.json").read_text())
    assert sel["round"] == 2 and sel["metric"] == "accuracy" and sel["value"] == pytest.approx(0.70)
    assert "Stopped early" in (tmp_path / "run" / "report.md").read_text()

    # Started again on the same run directory, the stopped run stays stopped: no more training.
    again = ScriptedGrid()
    run_federation(again, cfg, wait_timeout=5)
    assert again.train_rounds == []
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4


def test_report_has_per_class_metrics_and_confusion_matrix(tmp_path, server_task) -> None:
    from common.config import RunConfig
    from server.loop import run_federation

    cfg = RunConfig(num_server_rounds=1, model="tiny", labels="negative,positive", dp=False, min_nodes=2,
                    out=str(tmp_path / "run"))
    run_federation(ScriptedGrid(), cfg, wait_timeout=5)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    cls = row["classification"]
    assert cls["confusion_matrix"] == [[50, 50], [50, 50]]  # two nodes x SCRIPT[0] = 0.5
    assert set(cls["per_class"]) == {"negative", "positive"} and cls["macro_f1"] == pytest.approx(0.5)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Classification, last round (federated validation)" in report
    assert "| negative | 0.5000 | 0.5000 | 0.5000 | 100 |" in report and "Confusion matrix" in report
    assert not (tmp_path / "run" / "best").exists()  # keep-best off and no early stopping


class DpTrainScriptedEval(ScriptedGrid):
    """Training by the real ClientApp handler (DP-SGD, accountant, signed ledger) on simulated node folders;
    evaluation scripted as above."""

    def __init__(self, nodes_dir, nodes: int = 2) -> None:
        super().__init__(nodes)
        self.nodes_dir = str(nodes_dir)

    def send_and_receive(self, msgs, *, timeout=None):
        from flwr.app import Context, RecordDict

        from client.app import handle_train

        out, rest = [], []
        for msg in msgs:
            if msg.metadata.message_type == "train":
                self.train_rounds.append(int(msg.content["config"]["server-round"]))
                nid = int(msg.metadata.dst_node_id)
                ctx = Context(run_id=1, node_id=nid, node_config={"partition-id": nid - 1}, state=RecordDict(),
                              run_config={})
                out.append(handle_train(msg, ctx, sim_nodes_dir=self.nodes_dir))
            else:
                rest.append(msg)
        return out + (super().send_and_receive(rest) if rest else [])


def test_early_stopping_under_dp_ends_the_ledgers(tmp_path, server_task) -> None:
    from audit.run import audit_run
    from common.config import RunConfig
    from server.loop import run_federation
    from simulations.runner import SimOptions, prepare_nodes, sync_node_split

    cfg = RunConfig(num_server_rounds=len(SCRIPT), model="tiny", min_nodes=2, out=str(tmp_path / "run"),
                    early_stopping_patience=2, accountant="rdp", batch_size=16)
    cfg, nodes_dir = prepare_nodes(cfg, SimOptions(nodes=2, synthetic_size=120), tmp_path / "run")
    sync_node_split(cfg, nodes_dir)  # the simulated nodes account with RDP (fast), as simulate would set it
    run_federation(DpTrainScriptedEval(nodes_dir), cfg, wait_timeout=5)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[-1]["stopped"]
    def entries(path):
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    for node in ("node-0", "node-1"):
        own = entries(nodes_dir / node / "state" / "ledger.jsonl")
        assert [e["round"] for e in own] == [1, 2, 3, 4]  # no ε spent after the stop
        assert entries(tmp_path / "run" / "ledgers" / f"{node}.jsonl") == own
    rep = audit_run(tmp_path / "run")
    assert rep.passed, rep.failures


def test_simulate_flags_set_the_selection_keys() -> None:
    from fedpriv.cli import build_parser
    from fedpriv.cmd_simulate import build_config

    args = build_parser().parse_args(["simulate", "--patience", "2", "--min-delta", "0.01", "--stop-metric",
                                      "macro_f1", "--keep-best", "--folds", "3"])
    cfg = build_config(args)
    assert (cfg.early_stopping_patience, cfg.early_stopping_min_delta, cfg.early_stopping_metric, cfg.keep_best) \
        == (2, 0.01, "macro_f1", True)
    assert args.folds == 3
    plain = build_config(build_parser().parse_args(["simulate"]))
    assert (plain.early_stopping_patience, plain.keep_best, plain.early_stopping_metric) == (0, False, "auto")


def test_a_stopped_run_stays_stopped_even_with_another_metric() -> None:
    _, sel = _run([0.5, 0.4, 0.4], patience=2)
    assert sel.stopped
    again = Selection.from_state(sel.state_dict(), metric="macro_f1", patience=5, min_delta=0.0)
    assert again.stopped == sel.stopped and again.best_round == 0


def test_unknown_or_unavailable_metric_is_refused_before_any_round() -> None:
    from common.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="early-stopping-metric.*eval_acc"):
        RunConfig(early_stopping_metric="eval_acc")
    with pytest.raises(ConfigError, match="unless eval-data is set"):
        RunConfig(early_stopping_metric="eval_accuracy")
    assert RunConfig(early_stopping_metric="eval_macro_f1", eval_data="dev.csv").early_stopping_metric == "eval_macro_f1"
    with pytest.raises(ValueError, match="one of accuracy"):
        resolve_metric("f1", has_eval_data=False)


def test_best_is_not_written_from_weights_of_an_uncommitted_round(tmp_path, server_task) -> None:
    import shutil

    from common.config import RunConfig
    from server.loop import run_federation
    from server.rundir import RunDir

    cfg = RunConfig(num_server_rounds=3, model="tiny", labels="negative,positive", dp=False, min_nodes=2,
                    out=str(tmp_path / "run"), keep_best=True)
    run_federation(ScriptedGrid(), cfg, wait_timeout=5)
    assert (tmp_path / "run" / "best").is_dir()
    # As after a crash between a candidate best and its commit: best_checkpoint holds another round's weights.
    rd = RunDir(tmp_path / "run")
    state, arrays = rd.load_named_checkpoint("best_checkpoint")
    rd.save_checkpoint(round_=99, run_id=state["run_id"], arrays=arrays, name="best_checkpoint")
    shutil.rmtree(tmp_path / "run" / "best")
    run_federation(ScriptedGrid(), cfg, wait_timeout=5)
    assert not (tmp_path / "run" / "best").exists()


def test_keep_best_fair_keeps_the_best_round_meeting_the_thresholds(tmp_path, server_task) -> None:
    from common.config import RunConfig
    from common.model import ModelSpec, build_model, trainable_state
    from server.loop import run_federation
    from server.rundir import RunDir
    from serving.compress import load_classifier

    # No threshold can be violated by a single group ("all"), so every ok round is eligible: best = round 2.
    cfg = RunConfig(num_server_rounds=3, model="tiny", labels="negative,positive", dp=False, min_nodes=2,
                    out=str(tmp_path / "run"), keep_best_fair=True,
                    fairness_thresholds={"max-equalized-odds-difference": 0.5})
    run_federation(ScriptedGrid(), cfg, wait_timeout=5)
    state, _ = RunDir(tmp_path / "run").load_checkpoint()
    assert state["best"] == {"round": 2, "metric": pytest.approx(0.70)}
    init = trainable_state(build_model(ModelSpec(source="tiny", labels=("negative", "positive"), top_k_layers=0)))
    best, _ = load_classifier(tmp_path / "run" / "best_fair", device="cpu")
    for k, v in init.items():
        np.testing.assert_allclose(best.state_dict()[k].numpy(), v + 0.03, atol=1e-5)
    assert not (tmp_path / "run" / "best").exists()
