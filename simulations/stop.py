"""Stopping a simulation on Ctrl-C or SIGTERM: within seconds, one line, no process left behind.

Flower's ``run_simulation`` runs the ServerApp in a (non-daemon) thread and the simulation runtime in the
main thread, which waits for Ray actors that may be halfway through a round of training. A plain
``KeyboardInterrupt`` there leaves the ServerApp thread waiting for replies that never come (the process
hangs) and Ray actors printing ``ActorDiedError`` tracebacks. Instead, while a simulation runs:

1. SIGINT and SIGTERM set a stop event (the handler does nothing else) and silence Flower's logger;
2. the ServerApp sees the grid through :class:`StoppableGrid`, which raises :class:`SimulationInterrupted`
   at its next poll (every 0.1 s while it waits for replies). Nothing is committed after that: the round in
   progress is dropped, the last committed round (``checkpoint/state.json``) stays as it was, and rerunning
   the same command resumes from it;
3. a watchdog kills the Ray worker processes still busy with that round after :data:`GRACE_S` seconds, so
   the runtime returns (Flower then waits 3 s for a result that will not come); ``simulations.runner.run``
   shuts Ray down and kills any process of this run that is still alive (:func:`kill_descendants`, also
   those Ray re-parented while shutting down), and ``fedpriv simulate`` prints one line and exits at once
   (:func:`exit_now`: tearing down Ray's core worker at interpreter exit takes seconds more; every file
   fedpriv writes is already durable);
4. if the process is somehow still not done after :data:`HARD_STOP_S` seconds, or on a second signal, the
   watchdog kills every descendant and exits the process itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from simulations.reaper import REAPER_MODULE

GRACE_S = 0.5  # let the ServerApp thread and idle actors stop by themselves first
HARD_STOP_S = 6.0  # then exit the process whatever is still running
POLL_S = 0.1
MSG_INTERRUPTED = ("interrupted ({signal}): stopped; every committed round is kept in {out} (rerun the same "
                   "command to resume)")


class SimulationInterrupted(Exception):
    """Raised in the ServerApp thread (and then by ``run``) after SIGINT or SIGTERM."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name = signal_name


class StopSignal:
    """The stop event, the name of the signal that set it, and the hard-exit code (128 + signal number)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""
        self.exit_code = 130

    def check(self) -> None:
        if self.event.is_set():
            raise SimulationInterrupted(self.signal_name)


class StoppableGrid:
    """A Flower ``Grid`` whose waits end with :class:`SimulationInterrupted` once ``stop`` is set.

    ``send_and_receive`` is Flower's own loop (push, then pull until every reply arrived or the timeout
    passed) with a stop check at each poll; every other attribute is the wrapped grid's.
    """

    def __init__(self, grid: Any, stop: StopSignal) -> None:
        self._grid = grid
        self._stop = stop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> Iterable[int]:
        self._stop.check()
        return self._grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        self._stop.check()
        ids = set(self._grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Any] = []
        while timeout is None or time.time() < end:
            self._stop.check()
            got = list(self._grid.pull_messages(ids))
            replies.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if not ids:
                break
            time.sleep(POLL_S)
        self._stop.check()
        return replies


def descendants() -> list[Any]:
    """Every live descendant process of this one (Ray's GCS, raylet, dashboard and workers)."""
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def kill_descendants(*, only_workers: bool = False, also: Iterable[Any] = ()) -> None:
    """SIGKILL every descendant (with ``only_workers``, just Ray worker processes: ``ray::`` titles), and the
    processes in ``also`` (a snapshot taken before Ray shut down: its workers may have been re-parented).

    The run's reaper (:mod:`simulations.reaper`) is spared: it must outlive this process to end whatever of the
    run lost its parent before it could be killed here (e.g. after a second Ctrl-C's immediate exit)."""
    import psutil

    for proc in [*descendants(), *also]:
        try:
            cmdline = proc.cmdline()
            if only_workers and not " ".join(cmdline).startswith("ray::"):
                continue
            if REAPER_MODULE in cmdline:
                continue
            proc.kill()
        except psutil.Error:
            pass


@contextlib.contextmanager
def keep_our_sigterm_handler() -> Iterator[None]:
    """``ray.init`` replaces the driver's SIGTERM handler with ``sys.exit``; keep :func:`stop_on_signals`'
    handler instead while a simulation runs (Ray calls ``ray._private.utils.set_sigterm_handler``)."""
    try:
        import ray._private.utils as ray_utils
    except ImportError:  # pragma: no cover - Ray is a dependency of flwr[simulation]
        yield
        return
    original = getattr(ray_utils, "set_sigterm_handler", None)
    if original is None:  # pragma: no cover - another Ray version: SIGINT still works, SIGTERM exits Ray's way
        yield
        return
    ray_utils.set_sigterm_handler = lambda _handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original


def exit_now(code: int, message: str) -> None:
    """Print ``message`` (one line) and end the process with ``code`` without the interpreter's teardown."""
    with contextlib.suppress(Exception):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def stop_on_signals(stop: StopSignal, *, out: str) -> Iterator[StopSignal]:
    """Within the block, SIGINT/SIGTERM set ``stop`` and start the watchdog; handlers are restored after.

    Only in the main thread (signal handlers cannot be set elsewhere); in another thread it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def watchdog() -> None:
        stop.event.wait()
        if finished.wait(GRACE_S):
            return
        kill_descendants(only_workers=True)  # actors busy with the dropped round: the runtime can return now
        if finished.wait(HARD_STOP_S - GRACE_S):
            return
        hard_exit()

    def hard_exit() -> None:
        kill_descendants()
        exit_now(stop.exit_code, "fedpriv: " + MSG_INTERRUPTED.format(signal=stop.signal_name, out=out))

    def handler(signum: int, _frame: Any) -> None:
        if stop.event.is_set():  # a second signal: stop now
            hard_exit()
        stop.signal_name = signal.Signals(signum).name
        stop.exit_code = 128 + signum
        logging.getLogger("flwr").setLevel(logging.CRITICAL + 1)  # no tracebacks from dying actors
        stop.event.set()

    finished = threading.Event()
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    dog = threading.Thread(target=watchdog, name="fedpriv-stop-watchdog", daemon=True)
    dog.start()
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        finished.set()
        wake = not stop.event.is_set()
        stop.event.set()  # wakes the watchdog, which sees ``finished`` and returns
        if wake:
            stop.event.clear()
