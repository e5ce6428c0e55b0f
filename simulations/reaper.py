"""No process of a simulation outlives its driver, even when the driver is killed with ``kill -9``.

A SIGKILLed driver runs no handler and no ``finally``. Ray ties the GCS, raylet and log monitor it starts to
the driver (``PR_SET_PDEATHSIG``), but not the processes those start: the raylet's dashboard and runtime-env
agents were left running after ``kill -9`` of ``fedpriv simulate``.

So :func:`reap_on_death` gives each run a Ray temporary directory of its own (``ray.init(_temp_dir=...)``:
``fedpriv-ray-XXXXXXXX`` in the directory Ray would use, ``$RAY_TMPDIR``, ``$TMPDIR`` or ``/tmp``), made before
Ray starts, and starts a small separate process, the reaper (``python -m simulations.reaper DIR DRIVER_PID``).
Every process Ray starts for the run writes its logs under that directory and keeps them open for writing
(stdout, stderr, its ``.log``); no process of another run or another user does. The reaper waits for the driver
to go away: its end of a pipe from the driver reaches end-of-file when the driver exits or dies, and its parent
process id stops being the driver's. It then SIGKILLs every process of this user that holds a file under the
run's directory open for writing (a ``tail -f`` or ``less`` on a log only reads it and is never touched), and
scans again until none is left.

The reaper runs in its own session (a Ctrl-C or a signal to the driver's process group does not reach it) and
ignores SIGINT and SIGHUP. When the driver leaves the block normally it closes the pipe too: the reaper then
ends whatever of the run Ray's own shutdown left behind, and exits. Ray's logs stay in the directory, as they
stay in ``/tmp/ray`` by default.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

POLL_S = 0.2  # how often the reaper checks that its driver is still there, and rescans while reaping
QUIET_S = 1.0  # after the driver is gone: stop once no process of the run was seen for this long
REAP_FOR_S = 30.0  # and give up after this long in any case
STAND_DOWN_S = 10.0  # how long a driver that finished normally waits for its reaper to finish
WRITE_MODES = frozenset({"w", "a", "r+", "a+"})
REAPER_MODULE = "simulations.reaper"  # ``python -m`` name of the reaper; the driver's own cleanup spares it


def ray_tmp_parent() -> str:
    """Where Ray puts its temporary directory by default on Linux and macOS: ``$RAY_TMPDIR``, ``$TMPDIR`` or
    ``/tmp`` (kept short: Ray's Unix socket paths live under it)."""
    return os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"


def _writes_under(proc: Any, prefix: str) -> bool:
    return any(f.path.startswith(prefix) and f.mode in WRITE_MODES for f in proc.open_files())


def run_processes(run_dir: str | Path, *, exclude: frozenset[int] = frozenset()) -> list[Any]:
    """The live processes of this user (not zombies, not ``exclude``) that hold a file under ``run_dir`` open
    for writing."""
    import psutil

    uid = os.getuid()
    prefix = os.path.join(os.path.realpath(run_dir), "")
    found = []
    for proc in psutil.process_iter(["uids", "status"]):
        try:
            if proc.pid in exclude or proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
            if proc.info["status"] != psutil.STATUS_ZOMBIE and _writes_under(proc, prefix):
                found.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


def reap(run_dir: str | Path, *, exclude: frozenset[int] = frozenset(), quiet_s: float = QUIET_S,
         give_up_s: float = REAP_FOR_S) -> int:
    """SIGKILL every process of the run (:func:`run_processes`), scanning again until none was seen for
    ``quiet_s`` seconds (a raylet may start a worker between two scans) or ``give_up_s`` passed; a first scan
    that finds nothing ends at once. Returns how many kills were sent."""
    import psutil

    killed = 0
    end = time.monotonic() + give_up_s
    last_seen = -math.inf
    while True:
        procs = run_processes(run_dir, exclude=exclude)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed += 1
        now = time.monotonic()
        if procs:
            last_seen = now
        if now - last_seen >= quiet_s or now >= end:
            return killed
        time.sleep(POLL_S)


def _wait_for_driver(driver_pid: int) -> None:
    """Return once the driver closed its end of stdin (it exited or died) or we were re-parented."""
    fd = sys.stdin.fileno()
    while os.getppid() == driver_pid:
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if ready and not os.read(fd, 4096):
            return


def main(argv: list[str]) -> int:
    """The reaper process: ``RUN_DIR DRIVER_PID``."""
    run_dir, driver_pid = argv[0], int(argv[1])
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _wait_for_driver(driver_pid)
    reap(run_dir, exclude=frozenset({driver_pid}))  # a driver that finished normally is alive: never kill it
    return 0


@contextlib.contextmanager
def reap_on_death(*, parent: str | Path | None = None) -> Iterator[Path]:
    """Yield a new directory (in ``parent``, default :func:`ray_tmp_parent`) for the run's Ray temporary files;
    once this process ends, however it ends, or leaves the block, a reaper kills every process that writes
    under it."""
    run_dir = Path(tempfile.mkdtemp(prefix="fedpriv-ray-", dir=parent or ray_tmp_parent()))
    read_end, write_end = os.pipe()  # both close-on-exec: Ray's processes never hold the write end
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        reaper = subprocess.Popen([sys.executable, "-m", REAPER_MODULE, str(run_dir), str(os.getpid())],
                                  stdin=read_end, stdout=subprocess.DEVNULL, env=env, start_new_session=True)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    try:
        yield run_dir
    finally:
        os.close(write_end)
        with contextlib.suppress(subprocess.TimeoutExpired):
            reaper.wait(timeout=STAND_DOWN_S)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
