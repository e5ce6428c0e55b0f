"""The node owns its privacy (issue 13): nothing in the run config, a replay or a re-key weakens its guarantee.

Each test drives the real ClientApp handlers (``client.app.handle_train`` / ``handle_evaluate``) on a simulated
node folder with a tiny BERT, as a curious coordinator would: it chooses the run config, the run id and the
round numbers. The node must refuse, or account everything, and say why.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from audit.accounting import recompute_epsilon
from client.app import (
    ERR_NO_IDENTITY,
    REFUSE_FIXED_SEED,
    REFUSE_NO_DP,
    handle_evaluate,
    handle_train,
)
from client.budget import REFUSE_MIN_ROUND
from common.config import RunConfig
from common.ledger import head_path, load_public_key, verify_ledger
from common.model import ModelSpec, build_model, resolve_pooling, to_array_record, trainable_state
from common.seeds import derived_seed
from server.rounds import config_record as _config_record
from simulations.runner import SimOptions, prepare_nodes

BUDGET = 3.0
ROWS = 60  # one node: 48 training rows, 12 validation rows


@pytest.fixture
def node(tmp_path, server_task):
    cfg = RunConfig(model="tiny", out=str(tmp_path / "run"), batch_size=16, num_server_rounds=2)
    cfg, nodes_dir = prepare_nodes(cfg, SimOptions(nodes=1, synthetic_size=ROWS, epsilon=BUDGET), tmp_path / "run")
    cfg = cfg.resolved()  # as the server sends it: train part, recipe and pooling concrete
    cfg = cfg.replace(pooling=resolve_pooling(cfg.pooling, cfg.model))
    arrays = trainable_state(build_model(ModelSpec(source="tiny", labels=tuple(cfg.label_names),
                                                   train_part=cfg.train_part, top_k_layers=cfg.top_k_layers,
                                                   pooling=cfg.pooling)))
    n = Node(cfg, nodes_dir, arrays)
    n.configure(accountant="rdp")  # fast; PRV (the default) is exercised where the accountant changes
    return n


class Node:
    """One simulated institution, driven through the real ClientApp handlers."""

    def __init__(self, cfg: RunConfig, nodes_dir: Path, arrays) -> None:
        self.cfg, self.nodes_dir, self.arrays = cfg, nodes_dir, arrays
        self.state = nodes_dir / "node-0" / "state"

    def configure(self, **values) -> None:
        path = self.nodes_dir / "node-0" / "node.json"
        node_cfg = json.loads(path.read_text())
        node_cfg.update({k.replace("_", "-"): v for k, v in values.items()})
        path.write_text(json.dumps(node_cfg))

    def _send(self, handler, kind: str, *, run: str, rnd: int, **cfg_changes):
        from flwr.app import Context, Message, MessageType, RecordDict

        cfg = self.cfg.replace(**cfg_changes)
        msg = Message(RecordDict({"arrays": to_array_record(self.arrays),
                                  "config": _config_record(cfg, run_id=run, server_round=rnd)}),
                      dst_node_id=1, message_type=getattr(MessageType, kind))
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        reply = handler(msg, ctx, sim_nodes_dir=str(self.nodes_dir))
        if reply.has_error():
            return None, {"error": str(reply.error.reason)}
        return dict(reply.content["metrics"]), json.loads(reply.content["info"]["json"])

    def train(self, *, run: str = "run-a", rnd: int = 1, **cfg_changes):
        return self._send(handle_train, "TRAIN", run=run, rnd=rnd, **cfg_changes)

    def evaluate(self, *, run: str = "run-a", rnd: int = 1, **cfg_changes):
        return self._send(handle_evaluate, "EVALUATE", run=run, rnd=rnd, **cfg_changes)

    def ledger(self) -> list[dict]:
        res = verify_ledger(self.state / "ledger.jsonl", load_public_key(self.state / "node_ed25519.pub"))
        assert res.ok, res.problems
        return res.entries


def _pld(entries: list[dict], delta: float = 1e-5) -> float:
    """Independent recomputation (dp-accounting PLD) of a whole ledger: DP-SGD composed, counts added."""
    hist = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries if e["kind"] == "dp-sgd"]
    pure = sum(e["epsilon_release"] for e in entries if e["kind"] == "count-noise")
    return recompute_epsilon(hist, delta=delta)["dp_accounting_pld"] + pure


# ----------------------------------------------------------------------------------------- node-owned inputs


def test_a_fixed_noise_seed_is_refused_unless_the_node_allows_it(node) -> None:
    metrics, info = node.train(noise_seed=5)
    assert info["status"] == "refused" and info["reason"] == REFUSE_FIXED_SEED.format(seed=5)
    assert metrics == {"num-examples": 0} and not (node.state / "ledger.jsonl").exists()


def test_an_allowed_fixed_seed_is_recorded_and_differs_per_run(node) -> None:
    node.configure(allow_fixed_noise_seed=True)
    _, a = node.train(run="run-a", noise_seed=5)
    _, b = node.train(run="run-b", noise_seed=5)
    seeds = [e["noise_seed"] for e in node.ledger()]
    assert seeds == [derived_seed(5, "run-a", "node-0", 1, "noise"), derived_seed(5, "run-b", "node-0", 1, "noise")]
    assert seeds[0] != seeds[1]  # the run id is mixed in: two runs never reuse the same noise
    assert a["ledger_entry"]["noise_seed"] == seeds[0]


def test_noise_comes_from_os_entropy_by_default(node) -> None:
    node.train(run="run-a")
    node.train(run="run-b")
    assert [e["noise_seed"] for e in node.ledger()] == [None, None]


def test_training_without_dp_is_refused_unless_the_node_allows_it(node) -> None:
    metrics, info = node.train(dp=False)
    assert info["status"] == "refused" and info["reason"] == REFUSE_NO_DP
    node.configure(require_dp=False)
    metrics, info = node.train(dp=False)
    assert info["status"] == "ok" and metrics["num-examples"] == 48


def test_a_deployed_node_needs_a_name_or_a_state_dir(node) -> None:
    from flwr.app import Context, Message, MessageType, RecordDict

    data = json.loads((node.nodes_dir / "node-0" / "node.json").read_text())["data-path"]
    msg = Message(RecordDict({"arrays": to_array_record(node.arrays),
                              "config": _config_record(node.cfg, run_id="r", server_round=1)}),
                  dst_node_id=7, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=7, node_config={"data-path": data}, state=RecordDict(), run_config={})
    reply = handle_train(msg, ctx, sim_nodes_dir=None)
    assert reply.has_error() and ERR_NO_IDENTITY in str(reply.error.reason)


# ----------------------------------------------------------------------------------------- one budget


def _spend_the_budget(node) -> list[dict]:
    for rnd in (1, 2):
        _, info = node.train(rnd=rnd)
        assert info["status"] == "ok", info
    entries = node.ledger()
    assert entries[-1]["epsilon"] <= BUDGET and _pld(entries) <= BUDGET
    return entries


@pytest.mark.parametrize("change", ["accountant", "labels", "added-row", "state-files"])
def test_nothing_reopens_a_spent_budget(node, change) -> None:
    """2 rounds at ε=3, then the run is resumed to 4 rounds after a change that used to open a fresh budget."""
    before = _spend_the_budget(node)
    cfg_changes: dict = {"num_server_rounds": 4}
    if change == "accountant":
        node.configure(accountant="prv")
        cfg_changes["accountant"] = "prv"
    elif change == "labels":
        cfg_changes["labels"] = ",".join(reversed(node.cfg.label_names))
    elif change == "added-row":
        data = Path(json.loads((node.nodes_dir / "node-0" / "node.json").read_text())["data-path"])
        lines = data.read_text().splitlines()
        data.write_text("\n".join([*lines, lines[-1]]) + "\n")
    elif change == "state-files":  # everything but the ledger, its head and the key
        for p in node.state.iterdir():
            if p.name not in ("ledger.jsonl", "ledger.head", "node_ed25519.key", "node_ed25519.pub") and p.is_file():
                p.unlink()
    _, info = node.train(rnd=3, **cfg_changes)
    after = node.ledger()
    assert after[:len(before)] == before
    if info["status"] == "ok":  # only what was left (the unused reserve for evaluation counts) was spent
        assert after[-1]["epsilon"] > before[-1]["epsilon"] and after[-1]["epsilon_round"] < 0.5
    else:
        assert "budget 3" in info["reason"] and after == before
    # the whole ledger, recomputed independently, stays within the budget (it reached 3.5 when a change
    # opened a fresh accountant)
    assert after[-1]["epsilon"] <= BUDGET and _pld(after) <= BUDGET


def test_a_broken_ledger_stops_the_node(node) -> None:
    node.train(rnd=1)
    node.train(rnd=2)
    ledger = node.state / "ledger.jsonl"
    ledger.write_text("".join(ledger.read_text().splitlines(keepends=True)[:1]))  # the last release cut off
    head_path(ledger).unlink()  # ... and its signed head with it
    _, info = node.train(run="run-b", rnd=1)
    assert info["status"] == "refused" and info["reason"].startswith("refusing to release anything: this node's "
                                                                     "ledger")
    assert "ledger.head is missing" in info["reason"]
    assert node.evaluate(run="run-b")[1]["error"].startswith("evaluation counts not released: refusing")


def test_a_floor_on_the_round_epsilon_refuses_noise_rounds(node) -> None:
    node.configure(min_epsilon_per_round=100.0)
    _, info = node.train()
    assert info["status"] == "refused" and info["reason"].startswith(REFUSE_MIN_ROUND.split("{")[0])


# ----------------------------------------------------------------------------------------- what leaves a node


PUBLIC_TRAIN_METRICS = {"num-examples", "bytes-up", "epsilon", "epsilon-round", "noise-multiplier",
                        "epsilon-budget"}


def test_train_replies_carry_no_exact_statistics_by_default(node) -> None:
    metrics, info = node.train()
    assert set(metrics) <= PUBLIC_TRAIN_METRICS
    node.configure(share_exact_metrics=True)
    metrics, _ = node.train(rnd=2)
    assert {"train-loss", "train-accuracy", "train-seconds"} <= set(metrics)


def test_evaluation_counts_are_noised_and_ledgered_by_default(node) -> None:
    node.train()
    metrics, info = node.evaluate()
    default = min(0.1, BUDGET / 80)  # count-noise-epsilon "auto": 1/80 of the budget a round, at most 0.1
    assert "loss-sum" not in metrics and info["count_noise_epsilon"] == pytest.approx(default)
    assert node.ledger()[-1]["kind"] == "count-noise"
    assert node.ledger()[-1]["epsilon_release"] == pytest.approx(default)
    assert info["ledger_entry"]["hash"] == node.ledger()[-1]["hash"]
    # the coordinator may ask for more noise (a smaller ε), never for less
    assert node.evaluate(rnd=2, count_noise_epsilon=default / 2)[1]["count_noise_epsilon"] == default / 2
    assert node.evaluate(rnd=3, count_noise_epsilon=5.0)[1]["count_noise_epsilon"] == pytest.approx(default)
    node.configure(count_noise_epsilon=0.2)  # the institution's own choice is honoured as it is
    assert node.evaluate(rnd=4)[1]["count_noise_epsilon"] == 0.2


def test_without_noise_or_opt_in_counts_are_withheld(node) -> None:
    node.configure(count_noise_epsilon=0.0)
    metrics, info = node.evaluate()
    assert "counts" not in info and info["status"] == "withheld" and "loss-sum" not in metrics
    node.configure(share_exact_metrics=True)
    metrics, info = node.evaluate()
    assert "counts" in info and "loss-sum" in metrics and info["count_noise_epsilon"] == 0.0


def test_the_validation_split_is_the_nodes_own(node) -> None:
    metrics, _ = node.evaluate(val_fraction=0.9)  # the coordinator asks for 54 records to answer queries
    assert metrics["num-examples"] == 12  # the node's own val-fraction 0.2 of 60
    node.configure(val_fraction=0.5)
    assert node.evaluate(rnd=2)[0]["num-examples"] == 30


def test_training_budget_leaves_room_for_every_rounds_counts(node) -> None:
    for rnd in (1, 2):
        assert node.train(rnd=rnd)[1]["status"] == "ok"
        assert "error" not in node.evaluate(rnd=rnd)[1]
    entries = node.ledger()
    assert [e["kind"] for e in entries] == ["dp-sgd", "count-noise", "dp-sgd", "count-noise"]
    assert entries[-1]["epsilon"] <= BUDGET and _pld(entries) <= BUDGET


def test_the_ledger_records_what_ran(node) -> None:
    _, info = node.train()
    e = info["ledger_entry"]
    epochs = node.cfg.local_epochs  # the recipe's, as the server resolved it
    assert e["num_examples"] == 48 and e["batch_size"] == 16 and e["epochs"] == epochs >= 1
    assert e["sample_rate"] == pytest.approx(1 / 3) and e["steps"] == e["steps_executed"] == 3 * epochs


def test_two_processes_cannot_both_spend_the_same_room(node) -> None:
    """Two handlers that planned on the same spend: the second commit is refused, nothing double-spent."""
    from client.budget import NodePrivacy
    from client.node import load_node_config, load_node_data
    from common.ledger import LedgerError

    cfg = node.cfg.replace(accountant="rdp")
    conf = load_node_config({"partition-id": 0}, str(node.nodes_dir))
    data = load_node_data(conf, cfg, model_source="tiny")
    a = NodePrivacy(conf, cfg, name="node-0", data=data)
    b = NodePrivacy(conf, cfg, name="node-0", data=data)
    plan_a, _ = a.plan(run="r", server_round=1, planned_rounds=2)
    plan_b, _ = b.plan(run="r", server_round=1, planned_rounds=2)
    a.commit(plan_a, run="r", server_round=1, noise_seed=None, steps_executed=plan_a.steps)
    with pytest.raises(LedgerError, match="changed since this release was planned"):
        b.commit(plan_b, run="r", server_round=2, noise_seed=None, steps_executed=plan_b.steps)
    assert len(node.ledger()) == 1


def test_a_round_already_released_is_resent_or_refused_never_trained_twice(node) -> None:
    _, first = node.train(rnd=1)
    _, again = node.train(rnd=1)  # a replaying coordinator
    assert again["replayed"] and again["ledger_entry"] == first["ledger_entry"]
    node.train(rnd=2)  # the store keeps the newest round only
    _, old = node.train(rnd=1)
    assert old["status"] == "refused" and "round 1 of run run-a was already released" in old["reason"]
    assert [e["round"] for e in node.ledger()] == [1, 2]


def test_a_refused_run_gets_no_evaluation_either(node) -> None:
    """A node that refuses the run config answers none of its queries: no counts, no ε spent on them."""
    _, info = node.evaluate(noise_seed=5)
    assert info["error"] == "evaluation refused: " + REFUSE_FIXED_SEED.format(seed=5)
    assert not (node.state / "ledger.jsonl").exists()


# ------------------------------------------------------------------- what a hostile run config cannot extract


def test_group_names_come_from_the_nodes_list_not_from_the_data(node) -> None:
    """A coordinator naming the text column as the group column must not get the texts back as group names."""
    texts = [json.loads(x)["text"] for x in Path(json.loads((node.nodes_dir / "node-0" / "node.json")
                                                            .read_text())["data-path"]).read_text().splitlines()]
    allowed = json.loads((node.nodes_dir / "node-0" / "node.json").read_text())["groups"].split(",")
    _, info = node.evaluate(group_col="text")
    released = set(json.loads(info["counts"])["groups"])
    assert released == set(allowed)  # every listed name (noised zeros too) and nothing else
    assert not any(t in json.dumps(info) for t in texts)
    node.configure(groups="")  # no public list: one group
    assert set(json.loads(node.evaluate(rnd=2)[1]["counts"])["groups"]) == {"all"}


def test_a_data_error_reply_quotes_no_record(node) -> None:
    from client.app import WITHHELD_DATA_ERROR

    texts = [json.loads(x)["text"] for x in Path(json.loads((node.nodes_dir / "node-0" / "node.json")
                                                            .read_text())["data-path"]).read_text().splitlines()]
    for kind in ("train", "evaluate"):
        _, info = getattr(node, kind)(label_col="text")  # every text is now an "unknown label"
        assert info["error"] == "dataset cannot be used: " + WITHHELD_DATA_ERROR
        assert not any(t in info["error"] for t in texts)


def test_the_ledger_names_the_dataset_by_a_keyed_hash(node) -> None:
    from common.data import Schema, dataset_fingerprint, load_dataset

    _, info = node.train()
    data = json.loads((node.nodes_dir / "node-0" / "node.json").read_text())["data-path"]
    plain = dataset_fingerprint(load_dataset(data, schema=Schema("text", "label", "group"),
                                             labels=node.cfg.label_names))
    recorded = info["ledger_entry"]["dataset"]
    assert len(recorded) == 64 and recorded != plain  # nobody without the node's key can test a candidate
    _, again = node.train(run="run-b")
    assert again["ledger_entry"]["dataset"] == recorded  # stable: the audit still sees data that changed


def test_a_hostile_learning_rate_cannot_lose_a_paid_round(node) -> None:
    node.configure(share_exact_metrics=True)
    metrics, info = node.train(learning_rate=1e15, clipping_norm=1e30)
    assert info["status"] == "ok" and all(v == v and abs(v) != float("inf") for v in metrics.values())
    _, again = node.train()  # the same round asked again: re-sent from the store, not lost
    assert again.get("replayed") is True
