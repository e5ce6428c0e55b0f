"""Resume and replay for real (issue 15): the round loop resumed in-process after a coordinator crash, the node's
replay of a round it already released (ReplayStore and the ClientApp train handler), every round once in every
ledger. No Ray: the scripted grid of test_selection drives the real ClientApp train handler."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import numpy as np
import pytest

from client.replay import ReplayStore
from tests.test_selection import DpTrainScriptedEval


def _entries(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class CrashAtEval(DpTrainScriptedEval):
    """Nodes train (and release) round ``crash_round``; the coordinator crashes before committing it."""

    def __init__(self, nodes_dir, *, crash_round: int | None = None) -> None:
        super().__init__(nodes_dir)
        self.crash_round = crash_round
        self.replies: list = []

    def send_and_receive(self, msgs, *, timeout=None):
        msgs = list(msgs)
        if (self.crash_round is not None and msgs and msgs[0].metadata.message_type != "train"
                and int(msgs[0].content["config"]["server-round"]) == self.crash_round):
            raise RuntimeError("coordinator crashed")
        out = super().send_and_receive(msgs, timeout=timeout)
        self.replies.extend(out)
        return out


def _cfg(out: Path, rounds: int = 4):
    from common.config import RunConfig

    return RunConfig(num_server_rounds=rounds, model="tiny", min_nodes=2, out=str(out),
                     accountant="rdp", batch_size=16, epsilon=0.0)


def test_resumed_run_replays_the_released_round_and_spends_each_round_once(tmp_path, server_task) -> None:
    from audit.run import audit_run
    from server.loop import run_federation
    from simulations.runner import SimOptions, prepare_nodes, sync_node_split

    run = tmp_path / "run"
    cfg, nodes_dir = prepare_nodes(_cfg(run), SimOptions(nodes=2, synthetic_size=120, epsilon=50.0,
                                                         delta=1e-3), run)
    sync_node_split(cfg, nodes_dir)  # the nodes account with RDP, as simulate writes it
    first = CrashAtEval(nodes_dir, crash_round=3)
    with pytest.raises(RuntimeError, match="coordinator crashed"):
        run_federation(first, cfg, wait_timeout=5)
    assert json.loads((run / "checkpoint" / "state.json").read_text())["round"] == 2
    released = {}
    for node in ("node-0", "node-1"):
        own = _entries(nodes_dir / node / "state" / "ledger.jsonl")
        assert [e["round"] for e in own if e["kind"] == "dp-sgd"] == [1, 2, 3]  # round 3 was released
        released[node] = own[-1]
    crashed_updates = {json.loads(str(r.content["info"]["json"]))["node"]: dict(r.content["arrays"])
                       for r in first.replies if r.metadata.message_type == "train"
                       and int(json.loads(str(r.content["info"]["json"])).get("ledger_entry", {}).get("round", 0)) == 3}
    assert set(crashed_updates) == {"node-0", "node-1"}

    again = CrashAtEval(nodes_dir)
    summary = run_federation(again, cfg, wait_timeout=5)
    assert summary.rounds_done == 4 and again.train_rounds == [3, 3, 4, 4]  # resumed at round 3
    rows = _entries(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and all(r["status"] == "ok" for r in rows)
    replays = [json.loads(str(r.content["info"]["json"])) for r in again.replies
               if r.metadata.message_type == "train"]
    round3 = [i for i in replays if i["ledger_entry"]["round"] == 3]
    assert len(round3) == 2 and all(i.get("replayed") for i in round3)
    for info in round3:  # the very release, not a second one: same ledger entry, same arrays
        assert info["ledger_entry"] == released[info["node"]]
    for r in again.replies:
        info = json.loads(str(r.content["info"]["json"]))
        if r.metadata.message_type == "train" and info["ledger_entry"]["round"] == 3:
            for k, arr in dict(r.content["arrays"]).items():
                np.testing.assert_array_equal(arr.numpy(), crashed_updates[info["node"]][k].numpy())
    for node in ("node-0", "node-1"):
        own = _entries(nodes_dir / node / "state" / "ledger.jsonl")
        assert [e["round"] for e in own if e["kind"] == "dp-sgd"] == [1, 2, 3, 4]  # each round once
        assert _entries(run / "ledgers" / f"{node}.jsonl") == own  # the server copy: each entry once
        assert rows[-1]["epsilon"][node] == pytest.approx(own[-1]["epsilon"])
    rep = audit_run(run)
    assert rep.passed, [str(f) for f in rep.failures]


# ------------------------------------------------------------------------------------------ ReplayStore


def _arrays(v: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), v, dtype=np.float32), "b": np.arange(3, dtype=np.float32) + v}


def test_replay_store_round_trip_only_for_ledgered_releases(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path)
    entry = {"hash": "h3", "round": 3}
    path = store.save(run="run-a", server_round=3, arrays=_arrays(1.5), metrics={"num-examples": 7}, entry=entry)
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    got = store.load(run="run-a", server_round=3, ledger_hashes=["h1", "h3"])
    assert got is not None
    arrays, metrics, got_entry = got
    assert list(arrays) == ["w", "b"] and metrics == {"num-examples": 7} and got_entry == entry
    for k, v in _arrays(1.5).items():
        np.testing.assert_array_equal(arrays[k], v)
    # a release the ledger does not record is never re-sent (the file alone proves nothing)
    assert store.load(run="run-a", server_round=3, ledger_hashes=["h1"]) is None
    assert store.load(run="run-b", server_round=3, ledger_hashes=["h3"]) is None
    assert store.load(run="run-a", server_round=4, ledger_hashes=["h3"]) is None


def test_replay_store_keeps_one_atomic_file_per_round_and_drops_older_rounds(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path)
    for rnd in (1, 2, 3):
        store.save(run="r", server_round=rnd, arrays=_arrays(rnd), metrics={}, entry={"hash": f"h{rnd}"})
    names = sorted(p.name for p in (tmp_path / "replay" / "r").iterdir())
    assert names == ["round-3.npz"]  # no temporary files, no older rounds, no separate metadata file
    store.save(run="other run/../x", server_round=1, arrays=_arrays(9), metrics={}, entry={"hash": "x"})
    assert sorted(p.name for p in (tmp_path / "replay").iterdir()) == ["other_run____x", "r"]  # no path escape
    assert store.load(run="r", server_round=3, ledger_hashes=["h3"]) is not None


def test_replay_store_file_from_another_round_is_not_taken(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path)
    store.save(run="r", server_round=2, arrays=_arrays(2), metrics={}, entry={"hash": "h2"})
    (tmp_path / "replay" / "r" / "round-2.npz").rename(tmp_path / "replay" / "r" / "round-5.npz")
    assert store.load(run="r", server_round=5, ledger_hashes=["h2"]) is None


# ------------------------------------------------------------------------------------------ the train handler


def test_train_handler_replays_a_released_round_without_training_or_spending(tmp_path, server_task, caplog) -> None:
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from client.app import handle_train
    from common.model import ModelSpec, build_model, resolve_pooling, to_array_record, trainable_state
    from simulations.runner import SimOptions, prepare_nodes, sync_node_split

    run = tmp_path / "run"
    cfg, nodes_dir = prepare_nodes(_cfg(run), SimOptions(nodes=1, synthetic_size=60, epsilon=50.0, delta=1e-3),
                                   run)
    sync_node_split(cfg, nodes_dir)
    cfg = cfg.resolved()  # as the server sends it
    arrays = to_array_record(trainable_state(build_model(ModelSpec("tiny", ("negative", "positive"),
                                                                   train_part=cfg.train_part,
                                                                   top_k_layers=cfg.top_k_layers,
                                                                   pooling=resolve_pooling(cfg.pooling, "tiny")))))

    def ask(server_round: int, run_id: str = "run-x"):
        config = {**cfg.to_mapping(), "server-round": server_round, "fedpriv-run": run_id,
                  "fedpriv-planned-rounds": 4}
        msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=1,
                      message_type=MessageType.TRAIN)
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        reply = handle_train(msg, ctx, sim_nodes_dir=str(nodes_dir))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        arrays_out = dict(reply.content["arrays"]) if "arrays" in reply.content else None
        return json.loads(str(reply.content["info"]["json"])), arrays_out

    ledger = nodes_dir / "node-0" / "state" / "ledger.jsonl"
    info1, arrays1 = ask(1)
    assert not info1.get("replayed") and len(_entries(ledger)) == 1
    fedpriv_log = logging.getLogger("fedpriv")  # in deployment it does not propagate to the root logger
    fedpriv_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="fedpriv"):
            info2, arrays2 = ask(1)  # a resumed or replaying coordinator asks for round 1 again
    finally:
        fedpriv_log.removeHandler(caplog.handler)
    assert info2.get("replayed") is True and info2["ledger_entry"] == info1["ledger_entry"]
    # the SuperNode's line that docs/deploy.md tells the coordinator to look for after a resume
    resent = "re-sent its stored update for this round (no new training, no new ε)"
    assert f"run=run-x round=1 node=node-0 {resent}" in caplog.text, caplog.text
    assert f"`{resent}`" in (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text()
    assert len(_entries(ledger)) == 1  # no second release, no ε spent
    for k in arrays1:
        np.testing.assert_array_equal(arrays1[k].numpy(), arrays2[k].numpy())
    info3, _ = ask(2)  # the next round trains and spends
    assert not info3.get("replayed") and [e["round"] for e in _entries(ledger)] == [1, 2]
    # the replay file of round 1 is gone once round 2 is stored: asking for round 1 again is refused, never a
    # second release of the same round
    assert not (nodes_dir / "node-0" / "state" / "replay" / "run-x" / "round-1.npz").exists()
    info4, none = ask(1)
    assert none is None and info4["status"] == "refused" and "round 1 of run run-x was already released" in info4["reason"]
    assert [e["round"] for e in _entries(ledger)] == [1, 2]
