"""The run directory: resolved config, per-round metrics, atomic checkpoints, ledgers, final model.

Layout::

    RUN_DIR/
      .fedpriv-run           marker: this directory was created by fedpriv (only such a directory may be
                             deleted by ``fedpriv simulate --fresh``)
      .fedpriv-lock          held (flock) by the one ServerApp writing the directory; names its pid and host
      config.json            resolved RunConfig (plus run id)
      metrics.jsonl          one JSON object per completed round
      checkpoint/state.json  the commit point: round, run id, arrays file, strategy/accountant state
      checkpoint/arrays-rNNNN.npz
      ledgers/<node>.jsonl   server copies of the node ledgers, ledgers/<node>.pub their public keys
      cleaning.json          with run-config ``clean``: what cleaning changed, per node and for eval-data
      model/                 final model (save_pretrained + tokenizer)
      report.md, report.html, plots/*.png

A round is committed in two steps: its metrics line is appended (fsync), then ``checkpoint/state.json`` is
replaced atomically. On resume, metrics lines after the checkpointed round are dropped, so a crash between
the two steps never leaves a half-recorded round.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from common.fsutil import atomic_write_bytes, atomic_write_text
from server.rows import RoundRow

RUN_MARKER = ".fedpriv-run"
MARKER_TEXT = "This directory is a fedpriv run directory; `fedpriv simulate --fresh` may delete it.\n"
LOCK_FILE = ".fedpriv-lock"
LOCK_WAIT_S = 60.0  # how long a ServerApp waits for the directory: a failed run's ServerApp takes seconds to exit
ERR_BUSY = ("{path} is in use by another fedpriv ServerApp ({holder}): two ServerApps would record the same rounds "
            "twice. After a SuperLink restart the failed run's ServerApp may still be running: `flwr ls` shows its "
            "Flower run `running`; let it finish (`flwr log FLOWER_RUN_ID`) or stop it (`flwr stop FLOWER_RUN_ID`), "
            "then start this run again.")


class RunDirBusy(RuntimeError):
    """Another process holds the run directory (:meth:`RunDir.exclusive`)."""


class RunDir:
    """Reads and writes one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------------------------------ marker
    @property
    def marker_path(self) -> Path:
        return self.path / RUN_MARKER

    def is_marked(self) -> bool:
        """Whether fedpriv created this directory (the marker file is present)."""
        return self.marker_path.is_file() and not self.marker_path.is_symlink()

    def mark(self) -> bool:
        """Create the directory if needed; mark it as fedpriv's if it is new or empty. Returns whether it is
        marked: a directory that already held other files is never claimed (nor, later, deleted)."""
        if not self.path.is_dir() or not any(self.path.iterdir()):
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.marker_path, MARKER_TEXT)
        return self.is_marked()

    # ------------------------------------------------------------------------------------ one writer
    @contextmanager
    def exclusive(self, *, wait: float = 0.0, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the directory for this process, waiting up to ``wait`` seconds for another holder to let go;
        then raise :class:`RunDirBusy` naming the holder. ``on_wait(holder)`` is called once if it waits.

        An advisory ``flock`` on ``.fedpriv-lock``: the kernel drops it when the holder exits, even on SIGKILL,
        so a crashed run never leaves a stale lock. It keeps a second ServerApp (say, the old one of a run whose
        SuperLink was killed and restarted, beside the resumed one) from appending the same rounds again. The
        wait covers the seconds a failed run's ServerApp takes to exit after its SuperLink died.
        """
        self.mark()  # before the lock file exists: a new directory is still claimed as fedpriv's
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "holder unknown"
                    if time.monotonic() >= deadline:
                        raise RunDirBusy(ERR_BUSY.format(path=self.path, holder=holder)) from None
                    if on_wait is not None:
                        on_wait(holder)
                        on_wait = None
                    time.sleep(0.5)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    # ------------------------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @property
    def ledgers_dir(self) -> Path:
        return self.path / "ledgers"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def cleaning_path(self) -> Path:
        return self.path / "cleaning.json"

    # ------------------------------------------------------------------------------------ config
    def write_config(self, mapping: dict[str, Any], *, run_id: str) -> None:
        self.mark()
        atomic_write_text(self.config_path, json.dumps({**mapping, "fedpriv-run": run_id}, indent=2, sort_keys=True))

    # ------------------------------------------------------------------------------------ metrics
    def read_rows(self) -> list[RoundRow]:
        """The rows of ``metrics.jsonl`` (the one reader); a line that is not JSON is named in the error."""
        if not self.metrics_path.exists():
            return []
        rows = []
        for i, line in enumerate(self.metrics_path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(RoundRow.from_json(json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{self.metrics_path}, line {i}: not valid JSON ({exc.msg})") from None
        return rows

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows as their JSON mappings (for the charts, which plot any key)."""
        return [r.to_json() for r in self.read_rows()]

    def append_metrics(self, row: RoundRow) -> None:
        """Append one row to ``metrics.jsonl`` (the one writer), fsynced; NaN/Inf are refused."""
        self.path.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row.to_json(), sort_keys=True, allow_nan=False, default=_json_default) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics_after(self, last_round: int) -> None:
        rows = [r for r in self.read_rows() if r.round <= last_round]
        atomic_write_text(self.metrics_path, "".join(
            json.dumps(r.to_json(), sort_keys=True, default=_json_default) + "\n" for r in rows))

    # ------------------------------------------------------------------------------------ checkpoint
    def load_checkpoint(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """(state, arrays) of the last committed round, or None for a fresh run."""
        state_path = self.checkpoint_dir / "state.json"
        if not state_path.exists():
            return None
        state = json.loads(state_path.read_text())
        with np.load(self.checkpoint_dir / state["arrays_file"], allow_pickle=False) as z:
            keys = state["array_keys"]
            arrays = {k: z[f"a{i}"] for i, k in enumerate(keys)}
        return state, arrays

    def save_checkpoint(self, *, round_: int, run_id: str, arrays: dict[str, np.ndarray],
                        extra: dict[str, Any] | None = None, name: str = "checkpoint") -> None:
        """Write arrays, then atomically replace state.json (the commit point), then drop older arrays."""
        ckpt = self.path / name
        ckpt.mkdir(parents=True, exist_ok=True)
        arrays_file = f"arrays-r{round_:04d}.npz"
        import io

        buf = io.BytesIO()
        keys = list(arrays)
        np.savez(buf, **{f"a{i}": np.asarray(arrays[k]) for i, k in enumerate(keys)})
        atomic_write_bytes(ckpt / arrays_file, buf.getvalue())
        state = {"round": round_, "run_id": run_id, "arrays_file": arrays_file, "array_keys": keys, **(extra or {})}
        atomic_write_text(ckpt / "state.json", json.dumps(state, indent=2, sort_keys=True, default=_json_default))
        for old in ckpt.glob("arrays-r*.npz"):
            if old.name != arrays_file:
                old.unlink(missing_ok=True)

    def load_named_checkpoint(self, name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        other = RunDir(self.path)
        state_path = self.path / name / "state.json"
        if not state_path.exists():
            return None
        state = json.loads(state_path.read_text())
        with np.load(self.path / name / state["arrays_file"], allow_pickle=False) as z:
            arrays = {k: z[f"a{i}"] for i, k in enumerate(state["array_keys"])}
        del other
        return state, arrays

    # ------------------------------------------------------------------------------------ ledgers
    def store_ledger_entry(self, node: str, entry: dict[str, Any], public_key_pem: str | None) -> None:
        """Append a node's ledger entry to the server copy (idempotent on the entry hash)."""
        self.ledgers_dir.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in node)
        path = self.ledgers_dir / f"{safe}.jsonl"
        existing = set()
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    existing.add(json.loads(line).get("hash"))
        if entry.get("hash") not in existing:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if public_key_pem:
            pub = self.ledgers_dir / f"{safe}.pub"
            if not pub.exists():
                atomic_write_text(pub, public_key_pem)

    # ------------------------------------------------------------------------------------ cleaning
    def read_cleaning(self) -> dict[str, Any]:
        """``{"nodes": {node: counts}, "eval_data": counts}`` (keys present once recorded), or ``{}``."""
        if not self.cleaning_path.exists():
            return {}
        return json.loads(self.cleaning_path.read_text())

    def record_cleaning(self, counts: dict[str, Any], *, node: str | None) -> bool:
        """Keep the first cleaning counts of ``node`` (``None``: the server-held eval-data) in cleaning.json.

        Counts of a dataset do not change from round to round, so later reports are not written again.
        Returns whether the file changed.
        """
        data = self.read_cleaning()
        if node is None:
            if "eval_data" in data:
                return False
            data["eval_data"] = counts
        else:
            nodes = data.setdefault("nodes", {})
            if node in nodes:
                return False
            nodes[node] = counts
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.cleaning_path, json.dumps(data, indent=2, sort_keys=True))
        return True


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
