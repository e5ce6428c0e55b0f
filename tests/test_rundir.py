"""The run directory: atomic checkpoints, resume bookkeeping, ledger copies, status summary."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from server.rows import RoundRow
from server.rundir import ERR_BUSY, RunDir, RunDirBusy
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


# ------------------------------------------------------------------------------------------- one writer

_HOLD = ("import sys, time\nfrom server.rundir import RunDir\n"
         "with RunDir(sys.argv[1]).exclusive():\n    print('held', flush=True)\n    time.sleep(120)\n")


def _holder(path: Path) -> subprocess.Popen:
    """Another process that holds ``path`` (as a second ServerApp would), once it printed ``held``."""
    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_process_cannot_hold_the_run_directory_until_the_first_dies(tmp_path: Path) -> None:
    p = _holder(tmp_path)
    try:
        with pytest.raises(RunDirBusy) as err, RunDir(tmp_path).exclusive():
            pass
        assert str(err.value) == ERR_BUSY.format(path=tmp_path, holder=f"pid {p.pid} on {socket.gethostname()}")
    finally:
        p.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock, nothing stale stays behind
        p.wait(timeout=30)
        p.stdout.close()
    with RunDir(tmp_path).exclusive():
        assert (tmp_path / ".fedpriv-lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    with RunDir(tmp_path).exclusive():  # released on leaving the block: the same process holds it again
        pass


def test_a_holder_that_exits_within_the_wait_lets_the_next_one_in(tmp_path: Path) -> None:
    """The failed run's ServerApp takes seconds to exit after its SuperLink died: the resumed one waits for it."""
    p = _holder(tmp_path)
    waited: list[str] = []
    timer = threading.Timer(1.0, p.kill)  # it exits while the next one waits
    timer.start()
    try:
        with RunDir(tmp_path).exclusive(wait=60, on_wait=waited.append):
            assert p.poll() is not None
    finally:
        timer.cancel()
        p.kill()
        p.wait(timeout=30)
        p.stdout.close()
    assert waited == [f"pid {p.pid} on {socket.gethostname()}"]  # said once whom it waited for


def test_a_holder_that_stays_is_named_after_the_wait(tmp_path: Path) -> None:
    p = _holder(tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(RunDirBusy, match=f"pid {p.pid} on "), RunDir(tmp_path).exclusive(wait=1.0):
            pass
        assert time.monotonic() - t0 >= 1.0
    finally:
        p.kill()
        p.wait(timeout=30)
        p.stdout.close()


def test_a_new_run_directory_is_still_marked_when_locked(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "new")
    with rd.exclusive():
        assert rd.is_marked()


def test_run_federation_refuses_a_run_directory_held_elsewhere_and_writes_nothing(tmp_path: Path) -> None:
    from common.config import RunConfig
    from server.loop import run_federation

    out = tmp_path / "run"
    rd = RunDir(out)
    rd.save_checkpoint(round_=1, run_id="abc", arrays=_arrays(0))
    rd.append_metrics(RoundRow(round=1, run="abc"))
    before = {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()}
    p = _holder(out)  # the failed run's ServerApp, still running after a SuperLink restart
    try:
        with pytest.raises(RunDirBusy, match="is in use by another fedpriv ServerApp"):
            run_federation(None, RunConfig(model="tiny", labels="negative,positive", out=str(out)), lock_wait=1.0)
    finally:
        p.kill()
        p.wait(timeout=30)
        p.stdout.close()
    after = {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()}
    assert after.pop(Path(".fedpriv-lock")) == f"pid {p.pid} on {socket.gethostname()}\n".encode()  # the holder's
    assert after == before  # no metrics truncated, no config rewritten
    quoted = ERR_BUSY.format(path="OUT", holder="pid N on HOST").split(":")[0]  # the deploy guide's troubleshooting
    assert f"`{quoted}`" in (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text()
