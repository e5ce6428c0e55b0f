"""The node's replay store: the update it released for a (run, round), so that a repeated request re-sends it.

A resumed or replaying server may ask again for a round this node already trained. Training again would be a
second release of the same round and spend ε twice; instead the node re-sends exactly what it released, and
only if its signed ledger records that release. Each (run, round) is one ``.npz`` file written atomically (temp
file, fsync, rename, directory fsync): the arrays and their metadata land together or not at all. Older rounds
of the same run are dropped once a newer one is stored.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from common.fsutil import atomic_write_bytes

META_KEY = "__meta__"
_ROUND_FILE = re.compile(r"^round-(\d+)\.npz$")


def _safe(run: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in run) or "_"


class ReplayStore:
    """Released updates under ``<state_dir>/replay/<run>/round-<n>.npz``."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir) / "replay"

    def path(self, run: str, server_round: int) -> Path:
        return self.root / _safe(run) / f"round-{int(server_round)}.npz"

    def save(self, *, run: str, server_round: int, arrays: dict[str, np.ndarray], metrics: dict[str, Any],
             entry: dict[str, Any]) -> Path:
        """Store one released round (one atomic file); drop the run's earlier rounds."""
        keys = list(arrays)
        meta = {"run": run, "round": int(server_round), "keys": keys, "metrics": metrics, "entry": entry}
        blob = np.frombuffer(json.dumps(meta, allow_nan=False).encode("utf-8"), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **{f"a{i}": np.asarray(arrays[k]) for i, k in enumerate(keys)}, **{META_KEY: blob})
        path = self.path(run, server_round)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(path, buf.getvalue(), mode=0o600)
        for old in path.parent.iterdir():
            m = _ROUND_FILE.match(old.name)
            if m and int(m.group(1)) < int(server_round):
                old.unlink(missing_ok=True)
        return path

    def load(self, *, run: str, server_round: int, ledger_hashes: Iterable[str]
             ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]] | None:
        """The update released for (run, round) if stored and recorded in the ledger (``ledger_hashes``)."""
        path = self.path(run, server_round)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z[META_KEY]).decode("utf-8"))
            if meta.get("run") != run or int(meta.get("round", -1)) != int(server_round):
                return None
            if meta["entry"].get("hash") not in set(ledger_hashes):
                return None
            arrays = {k: z[f"a{i}"] for i, k in enumerate(meta["keys"])}
        return arrays, meta["metrics"], meta["entry"]
