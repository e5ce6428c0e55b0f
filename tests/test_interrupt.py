"""Issue 15: Ctrl-C (SIGINT) or SIGTERM on `fedpriv simulate` stops it within seconds with one line, keeps the
last committed round, leaves no process behind (Ray shut down), and the same command then resumes the run with
every round once in metrics.jsonl and in every ledger; `kill -9` of it leaves no process of its Ray session
behind. A real subprocess on the tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations.stop import MSG_INTERRUPTED

pytestmark = pytest.mark.slow

STOP_WITHIN_S = 15.0  # measured ~5 s on a loaded 2-core machine (0.5 s grace + Flower's 3 s wait + Ray)
REAPED_WITHIN_S = 20.0  # after kill -9: the reaper polls every 0.2 s; measured ~1 s on a loaded 2-core machine


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "RAY_USAGE_STATS_ENABLED": "0",
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
            "FEDPRIV_SIM_KEY_DIR": str(tmp_path / "sim-keys"),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _cmd(out: Path, rounds: int) -> list[str]:
    return [sys.executable, "-m", "fedpriv", "simulate", "--model", "tiny", "--nodes", "2", "--rounds", str(rounds),
            "--synthetic-size", "400", "--epsilon", "50", "--delta", "1e-4", "--out", str(out), "--quiet"]


def _committed(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint" / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_within_seconds_and_the_run_resumes(tmp_path: Path, sig: signal.Signals) -> None:
    import psutil

    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out, rounds=50), env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 400
        while _committed(out) < 1:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no round committed in time"
            time.sleep(0.2)
        ours = psutil.Process(proc.pid).children(recursive=True)
        assert any("ray::" in " ".join(p.cmdline()) for p in ours)  # the workers we expect to be gone after
        sent = time.monotonic()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, stderr
    assert took < STOP_WITHIN_S, took
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert lines[-1] == "fedpriv simulate: " + MSG_INTERRUPTED.format(signal=sig.name, out=out)
    time.sleep(1.0)
    alive = [p for p in ours if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [" ".join(p.cmdline()) for p in alive]

    # the last committed round is intact: its metrics line and checkpoint agree (a round in flight is dropped)
    done = _committed(out)
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert rounds[: done] == list(range(1, done + 1)) and len(rounds) in (done, done + 1)

    # the same command resumes: every round once in metrics.jsonl and in each ledger
    target = done + 1
    again = subprocess.run(_cmd(out, rounds=target), env=_env(tmp_path), capture_output=True, text=True,
                           timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["round"] for r in rows] == list(range(1, target + 1))
    assert all(r["status"] == "ok" for r in rows)
    for node in ("node-0", "node-1"):
        entries = [json.loads(x) for x in (out / "ledgers" / f"{node}.jsonl").read_text().splitlines() if x.strip()]
        train = [e["round"] for e in entries if e["kind"] == "dp-sgd"]
        assert train == list(range(1, target + 1)), train  # the dropped round was replayed, not spent twice



def _of_session(session_dir: str) -> list:
    """Every live process of a Ray session: it names the session directory on its command line or holds a file
    in it open (agents and workers retitle themselves ``ray::...`` and keep their logs there open)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if session_dir in " ".join(proc.cmdline()) or any(
                    f.path.startswith(session_dir) for f in proc.open_files()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _alive(procs: list) -> list:
    import psutil

    alive = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


def test_kill_9_leaves_no_process_of_the_run(tmp_path: Path) -> None:
    import psutil

    proc = subprocess.Popen(_cmd(tmp_path / "run", rounds=50), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ours: list = []
    try:
        deadline = time.monotonic() + 300
        lines: set[str] = set()
        while not ({"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= lines and any(
                x.startswith("ray::") and "Agent" not in x for x in lines)):  # the agents and a worker: Ray is up
            assert proc.poll() is None, f"fedpriv simulate exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"Ray did not start in time: {sorted(lines)}"
            time.sleep(0.2)
            ours = psutil.Process(proc.pid).children(recursive=True)
            lines = set()
            for p in ours:
                with contextlib.suppress(psutil.Error):
                    lines.add(" ".join(p.cmdline()).strip())
        session = next(arg.split("=", 1)[1] for line in lines for arg in line.split()
                       if arg.startswith(("--session_dir=", "--session-dir=")))
        before = _of_session(session)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        end = time.monotonic() + REAPED_WITHIN_S
        while (left := {*_of_session(session), *_alive(ours)}) and time.monotonic() < end:  # the reaper too
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(before) >= 5, before  # the driver, GCS, raylet, the two agents, workers
    shown = []
    for p in left:
        with contextlib.suppress(psutil.Error):
            shown.append(" ".join(p.cmdline()).strip())
            p.kill()  # leave the machine clean even when the assertion fails
    assert not shown, shown
