"""Issue 15: a driver killed with ``kill -9`` leaves no process behind (simulations/reaper.py), and the reaper
never touches a process that is not the run's: another run's, one that only reads the run's logs, or any
other. Real processes: a driver that starts a child writing its log under the run's directory, which starts a
detached grandchild doing the same (as Ray's raylet starts its agents), then is SIGKILLed. The same with
`fedpriv simulate` and Ray is in tests/test_interrupt.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from simulations.reaper import reap_on_death, run_processes

GONE_WITHIN_S = 10.0  # the reaper polls every 0.2 s; a loaded 2-core machine can take a few seconds more
ROOT = str(Path(__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": ROOT}

# Keeps its log under DIR open for appending (as every Ray process does) and sleeps; with a third argument, first
# starts that code in a new session that outlives it (re-parented to init once this one dies, as Ray's agents
# are) and prints its pid.
WRITER = textwrap.dedent("""
    import subprocess, sys, time
    log_dir, name = sys.argv[1], sys.argv[2]
    log = open(f"{log_dir}/{name}.log", "a")
    if len(sys.argv) > 3:
        p = subprocess.Popen([sys.executable, "-c", sys.argv[3], log_dir, "grandchild"], start_new_session=True)
        print(p.pid, flush=True)
    time.sleep(600)
""")

# The driver: inside reap_on_death (in PARENT), a child writing under the run's directory that starts a
# detached grandchild; prints the directory and both pids, then waits to be killed.
DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    from simulations.reaper import reap_on_death
    writer = sys.argv[2]
    with reap_on_death(parent=sys.argv[1]) as run_dir:
        child = subprocess.Popen([sys.executable, "-c", writer, str(run_dir), "child", writer],
                                 stdout=subprocess.PIPE, text=True)
        grandchild = int(child.stdout.readline())
        print(run_dir, child.pid, grandchild, flush=True)
        time.sleep(600)
""")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: list[int], within: float) -> list[int]:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not any(_alive(p) for p in pids):
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _start(code: str, *args: str, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "a") if log else subprocess.DEVNULL  # closed right after the start
    try:
        return subprocess.Popen([sys.executable, "-c", code, *args], env=ENV, stdout=out)
    finally:
        if log:
            out.close()


def _wait_open(pid: int, name: str) -> None:
    """Wait until process ``pid`` has a file called ``name`` open (a process opens its log once started)."""
    import psutil

    end = time.monotonic() + GONE_WITHIN_S
    while time.monotonic() < end:
        if any(Path(f.path).name == name for f in psutil.Process(pid).open_files()):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not open {name}")


SLEEP = "import time; time.sleep(600)"
READ = "import sys, time; f = open(sys.argv[1]); time.sleep(600)"  # `tail -f` on a log of the run


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_kill_9_of_the_driver_ends_its_processes_and_only_those(tmp_path: Path) -> None:
    (tmp_path / "other-run").mkdir()
    other_run = _start(SLEEP, log=tmp_path / "other-run" / "worker.log")  # another run's Ray: must survive
    untagged = _start(SLEEP)  # any other process of this user: must survive
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), WRITER], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    reader, started = None, []
    try:
        run_dir, *pids = driver.stdout.readline().split()
        child, grandchild = started = [int(x) for x in pids]
        reader = _start(READ, f"{run_dir}/child.log")
        for pid, name in ((grandchild, "grandchild.log"), (reader.pid, "child.log")):
            _wait_open(pid, name)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        assert _wait_gone([child, grandchild], GONE_WITHIN_S) == []
        assert other_run.poll() is None and untagged.poll() is None and reader.poll() is None
    finally:
        _stop(driver, other_run, untagged, *([reader] if reader else []))
        for pid in started:  # leave nothing behind even when the test fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_leaving_the_block_ends_the_reaper_and_what_the_run_left(tmp_path: Path) -> None:
    import psutil

    with reap_on_death(parent=tmp_path) as run_dir:
        assert run_dir.parent == tmp_path and run_dir.name.startswith("fedpriv-ray-")
        straggler = _start(SLEEP, log=run_dir / "worker.log")  # what Ray's own shutdown might leave behind
        reaper = [p for p in psutil.Process().children() if p.pid != straggler.pid]
        assert len(reaper) == 1 and "simulations.reaper" in reaper[0].cmdline()
        own_log = open(run_dir / "driver.log", "w")  # the driver writes there too, as Ray's does
    try:
        assert straggler.wait(timeout=GONE_WITHIN_S) == -signal.SIGKILL
        assert _wait_gone([reaper[0].pid], GONE_WITHIN_S) == []  # and this process was spared
    finally:
        own_log.close()
        _stop(straggler)


def test_run_processes_are_the_writers_under_the_directory(tmp_path: Path) -> None:
    run_dir, other = tmp_path / "run", tmp_path / "run-2"  # a sibling whose name starts the same
    run_dir.mkdir()
    other.mkdir()
    (run_dir / "a.log").write_text("")
    writer = _start(SLEEP, log=run_dir / "a.log")
    reader = _start(READ, str(run_dir / "a.log"))
    elsewhere = _start(SLEEP, log=other / "b.log")
    try:
        _wait_open(reader.pid, "a.log")
        assert [p.pid for p in run_processes(run_dir)] == [writer.pid]
        assert run_processes(run_dir, exclude=frozenset({writer.pid})) == []
    finally:
        _stop(writer, reader, elsewhere)


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_the_reaper_does_not_outlive_a_driver_that_started_nothing(tmp_path: Path, how: str) -> None:
    code = ("import sys, time, psutil\nfrom simulations.reaper import reap_on_death\n"
            "with reap_on_death(parent=sys.argv[2]):\n"
            "    print(*[p.pid for p in psutil.Process().children()], flush=True)\n"
            "    time.sleep(0 if sys.argv[1] == 'exit' else 600)\n")
    driver = subprocess.Popen([sys.executable, "-c", code, how, str(tmp_path)], env=ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        reapers = [int(x) for x in driver.stdout.readline().split()]
        assert len(reapers) == 1
        if how == "kill":
            driver.kill()
        driver.wait(timeout=20)
        assert _wait_gone(reapers, GONE_WITHIN_S) == []
    finally:
        _stop(driver)


def test_the_drivers_own_cleanup_spares_the_reaper(tmp_path: Path) -> None:
    """Ctrl-C's cleanup (``kill_descendants``) ends the run's processes but not its reaper, which must outlive
    the driver to end what lost its parent before the cleanup reached it (a second Ctrl-C exits at once)."""
    import psutil

    from simulations.stop import kill_descendants

    with reap_on_death(parent=tmp_path) as run_dir:
        worker = _start(SLEEP, log=run_dir / "worker.log")
        reaper = [p for p in psutil.Process().children() if p.pid != worker.pid]
        assert len(reaper) == 1 and "simulations.reaper" in reaper[0].cmdline()
        try:
            kill_descendants()
            assert worker.wait(timeout=GONE_WITHIN_S) == -signal.SIGKILL
            gone, alive = psutil.wait_procs([reaper[0]], timeout=1.0)  # a SIGKILL lands within that
            assert alive == [reaper[0]] and reaper[0].status() != psutil.STATUS_ZOMBIE
        finally:
            _stop(worker)
    assert _wait_gone([reaper[0].pid], GONE_WITHIN_S) == []
