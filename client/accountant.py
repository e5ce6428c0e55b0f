"""The node's persistent accountant: every release it made on its data, in its state directory.

The math (ε of a history, calibration, budget checks) is in :mod:`common.privacy`; this module holds the
state. Only the node uses it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from common.fsutil import atomic_write_json
from common.privacy import (
    ERR_RELEASE,
    ERR_STATE_CHANGED,
    ERR_STATE_CORRUPT,
    ERR_STATE_MISMATCH,
    STATE_SCHEMA,
    CountRelease,
    DpSgdRelease,
    _as_release,
    _check_accountant,
    _check_delta,
    total_epsilon,
)


class NodeAccountant:
    """Everything one node released on one dataset, persisted as one JSON file (atomic, fsynced writes).

    File format (``schema`` 1)::

        {"schema": 1, "accountant": "prv", "delta": 1e-05,
         "history": [[noise_multiplier, sample_rate, steps], ...],   # DP-SGD releases, in commit order
         "pure": [[epsilon, mechanism], ...]}                         # pure ε-DP releases

    Use :meth:`load`; one file per (node, dataset, accountant, δ). A file recorded with another accountant
    or δ is refused rather than silently mixed.
    """

    def __init__(self, path: str | Path, *, accountant: str, delta: float,
                 history: Sequence[DpSgdRelease] = (), count_releases: Sequence[CountRelease] = ()) -> None:
        self.path = Path(path)
        self.accountant = _check_accountant(accountant)
        self.delta = _check_delta(delta)
        self._history: tuple[DpSgdRelease, ...] = tuple(map(_as_release, history))
        self._counts: tuple[CountRelease, ...] = tuple(count_releases)

    # ---- construction
    @classmethod
    def load(cls, path: str | Path, *, accountant: str, delta: float) -> NodeAccountant:
        """Open the state at ``path`` (an empty accountant when the file does not exist yet).

        Raises
        ------
        ValueError
            The file was recorded with a different accountant or δ (:data:`ERR_STATE_MISMATCH`), or cannot be
            read (:data:`ERR_STATE_CORRUPT`).
        """
        accountant = _check_accountant(accountant)
        delta = _check_delta(delta)
        path = Path(path)
        state = _read_state(path)
        if state is None:
            return cls(path, accountant=accountant, delta=delta)
        have_acc, have_delta, history, counts = state
        if have_acc != accountant or have_delta != delta:
            raise ValueError(ERR_STATE_MISMATCH.format(file=path, have_acc=have_acc, have_delta=have_delta,
                                                       want_acc=accountant, want_delta=delta))
        return cls(path, accountant=accountant, delta=delta, history=history, count_releases=counts)

    # ---- reading
    @property
    def history(self) -> tuple[DpSgdRelease, ...]:
        """The committed DP-SGD releases, in commit order."""
        return self._history

    @property
    def count_releases(self) -> tuple[CountRelease, ...]:
        """The committed pure ε-DP releases, in commit order."""
        return self._counts

    def epsilon(self) -> float:
        """Total ε spent at ``delta`` (DP-SGD via the accountant + Σ pure ε)."""
        return total_epsilon(self._history, self._counts, delta=self.delta, accountant=self.accountant)

    def epsilon_if(self, release: DpSgdRelease | CountRelease) -> float:
        """Total ε after ``release``, without recording it."""
        history, counts = self._with(release)
        return total_epsilon(history, counts, delta=self.delta, accountant=self.accountant)

    # ---- writing
    def commit(self, release: DpSgdRelease | CountRelease) -> None:
        """Record ``release`` durably (temp file + fsync + ``os.replace`` + directory fsync).

        Raises
        ------
        ValueError
            The file on disk no longer holds what this object loaded (:data:`ERR_STATE_CHANGED`); nothing is
            written then.
        """
        history, counts = self._with(release)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            on_disk = _read_state(self.path)
            expected = (self.accountant, self.delta, list(self._history), list(self._counts))
            if (on_disk if on_disk is not None else (self.accountant, self.delta, [], [])) != expected:
                raise ValueError(ERR_STATE_CHANGED.format(file=self.path))
            atomic_write_json(self.path, {
                "schema": STATE_SCHEMA,
                "accountant": self.accountant,
                "delta": self.delta,
                "history": [[r.noise_multiplier, r.sample_rate, r.steps] for r in history],
                "pure": [[c.epsilon, c.mechanism] for c in counts],
            })
        self._history, self._counts = history, counts

    def _with(self, release: Any) -> tuple[tuple[DpSgdRelease, ...], tuple[CountRelease, ...]]:
        if isinstance(release, CountRelease):
            return self._history, (*self._counts, release)
        if isinstance(release, DpSgdRelease):
            return (*self._history, release), self._counts
        raise ValueError(ERR_RELEASE.format(value=release))


def _read_state(path: Path) -> tuple[str, float, list[DpSgdRelease], list[CountRelease]] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(ERR_STATE_CORRUPT.format(file=path, reason=exc)) from exc
    try:
        data = json.loads(text)
        if data.get("schema", STATE_SCHEMA) != STATE_SCHEMA:
            raise ValueError(f"unknown schema {data.get('schema')!r}")
        history = [DpSgdRelease(s, q, n) for s, q, n in data["history"]]
        counts = [CountRelease(e, m) for e, m in data.get("pure", [])]
        return str(data["accountant"]), float(data["delta"]), history, counts
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(ERR_STATE_CORRUPT.format(file=path, reason=exc)) from exc


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``<path>.lock`` (POSIX); a no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
