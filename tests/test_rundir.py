"""The run directory: atomic checkpoints, resume bookkeeping, ledger copies, status summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.rows import RoundRow
from server.rundir import RunDir
from server.status import summarise


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"classifier.weight": rng.normal(size=(2, 8)).astype(np.float32),
            "classifier.bias": rng.normal(size=(2,)).astype(np.float32),
            "scalar": np.asarray(1.5, dtype=np.float32)}


def test_checkpoint_round_trips_exactly(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    a = _arrays(0)
    rd.save_checkpoint(round_=3, run_id="abc", arrays=a, extra={"best": {"round": 2}})
    state, back = rd.load_checkpoint()
    assert state["round"] == 3 and state["run_id"] == "abc" and state["best"] == {"round": 2}
    assert list(back) == list(a)
    for k in a:
        assert back[k].dtype == a[k].dtype and np.array_equal(back[k], a[k])


def test_new_checkpoint_replaces_old_arrays(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.save_checkpoint(round_=1, run_id="r", arrays=_arrays(1))
    rd.save_checkpoint(round_=2, run_id="r", arrays=_arrays(2))
    files = sorted(p.name for p in (tmp_path / "checkpoint").glob("arrays-*.npz"))
    assert files == ["arrays-r0002.npz"]
    _, back = rd.load_checkpoint()
    assert np.array_equal(back["classifier.weight"], _arrays(2)["classifier.weight"])


def test_failed_write_leaves_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rd = RunDir(tmp_path)
    rd.save_checkpoint(round_=1, run_id="r", arrays=_arrays(1))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("server.rundir.np.savez", boom)
    with pytest.raises(OSError, match="disk full"):
        rd.save_checkpoint(round_=2, run_id="r", arrays=_arrays(2))
    state, back = rd.load_checkpoint()
    assert state["round"] == 1
    assert np.array_equal(back["classifier.weight"], _arrays(1)["classifier.weight"])
    assert not [p for p in (tmp_path / "checkpoint").iterdir() if p.name.startswith(".")]


def test_metrics_after_checkpointed_round_are_dropped_on_resume(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    for r in (1, 2, 3):
        rd.append_metrics(RoundRow.from_json({"round": r, "accuracy": r / 10}))
    rd.truncate_metrics_after(2)
    assert [row["round"] for row in rd.read_metrics()] == [1, 2]


def test_metrics_refuse_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RunDir(tmp_path).append_metrics(RoundRow.from_json({"round": 1, "accuracy": float("nan")}))


def test_corrupt_metrics_line_is_named(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.append_metrics(RoundRow.from_json({"round": 1}))
    with open(rd.metrics_path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        rd.read_metrics()


def test_ledger_copy_is_idempotent(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    entry = {"index": 0, "hash": "aa" * 32, "epsilon": 1.0}
    rd.store_ledger_entry("node-0", entry, "PUBKEY")
    rd.store_ledger_entry("node-0", entry, "PUBKEY")
    lines = (tmp_path / "ledgers" / "node-0.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == entry
    assert (tmp_path / "ledgers" / "node-0.pub").read_text() == "PUBKEY"


def test_status_summarises_rounds_nodes_and_epsilon(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.write_config({"num-server-rounds": 3}, run_id="run1")
    rd.append_metrics(RoundRow.from_json({"round": 1, "status": "ok", "accuracy": 0.6,
                       "nodes": {"a": {"status": "ok", "epsilon": 1.0}, "b": {"status": "refused"}}}))
    rd.append_metrics(RoundRow.from_json({"round": 2, "status": "failed", "accuracy": 0.6,
                       "fairness": {"gaps": {"equalized_odds_difference": {"value": 0.25}}},
                       "nodes": {"a": {"status": "ok", "epsilon": 2.0}, "b": {"status": "rejected"}}}))
    s = summarise(tmp_path)
    assert s["run_id"] == "run1" and s["rounds_done"] == 2 and s["rounds_planned"] == 3
    assert s["nodes"]["a"] == {"rounds_trained": 2, "refusals": 0, "rejected": 0, "epsilon": 2.0}
    assert s["nodes"]["b"]["refusals"] == 1 and s["nodes"]["b"]["rejected"] == 1
    assert s["last_equalized_odds_difference"] == 0.25
    assert s["failed_rounds"] == [2]
    assert s["finished"] is False


def test_status_rejects_non_run_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a fedpriv run directory"):
        summarise(tmp_path)
