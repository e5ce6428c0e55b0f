"""Atomic file output: write to a temporary file in the target directory, fsync, then rename over the target.

Readers see the old file or the complete new one, never a partial write; a failure leaves the old file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_output(path: str | Path, *, mode: int | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it replaces ``path`` atomically (with ``mode`` if given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)  # make the rename itself durable
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None) -> None:
    with atomic_output(path, mode=mode) as f:
        f.write(data)


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
