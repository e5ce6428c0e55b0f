"""Atomic file output: write to a temporary file in the target directory, fsync, then rename over the target.

Readers see the old file or the complete new one, never a partial write; a failure leaves the old file.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


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


def atomic_write_text(path: str | Path, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably (see :func:`atomic_output`)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: str | Path, data: Any, *, mode: int | None = None) -> None:
    """Write ``data`` as one line of strict JSON (no NaN/Infinity) atomically and durably."""
    atomic_write_text(path, json.dumps(data, allow_nan=False) + "\n", mode=mode)


# ------------------------------------------------------------------------------------------ output checks

ERR_OUT_IS_INPUT = "{out}: is also {what} ({inp}); refusing to write over it"
ERR_OUT_SYMLINK = "{out}: is a symbolic link; refusing to write through or over it (remove it or choose another path)"
ERR_OUT_NOT_FILE = "{out}: exists and is {kind}, not a regular file; refusing to replace it"
ERR_OUT_NOT_DIR = "{out}: exists and is {kind}, not a directory; refusing to replace it"
ERR_OUT_NO_PARENT = "{out}: directory {parent} does not exist; create it first"
ERR_OUT_PARENT_NOT_DIR = "{out}: {parent} is not a directory"


class UnsafeOutputError(ValueError):
    """An output path would replace something the command did not create (an input, a device, a link...)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "of an unknown kind"


def _lstat_no_link(path: Path) -> os.stat_result | None:
    """``os.lstat(path)``, None when nothing is there; a symbolic link raises :class:`UnsafeOutputError`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeOutputError(ERR_OUT_SYMLINK.format(out=path))
    return st


def check_output_dir(path: str | Path) -> Path:
    """Refuse an output directory that is a symbolic link (writing through it, or replacing it, would touch
    what it points to) or that exists and is not a directory (a file, a device such as ``/dev/null``, a FIFO, a
    socket). Raises :class:`UnsafeOutputError` (one line naming the path); returns ``path`` as a :class:`Path`.
    Whether an existing directory may be replaced is the caller's decision (a marker file it wrote)."""
    path = Path(path)
    st = _lstat_no_link(path)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise UnsafeOutputError(ERR_OUT_NOT_DIR.format(out=path, kind=_kind(st.st_mode)))
    return path


def check_output_file(path: str | Path, *, inputs: Iterable[tuple[str, str | Path | None]] = (),
                      create_parent: bool = False) -> Path:
    """Refuse an output path that would replace anything but an ordinary file the command may overwrite.

    Raises :class:`UnsafeOutputError` (one line naming the path) when ``path`` is a symbolic link, exists and
    is not a regular file (a directory, a device such as ``/dev/null``, a FIFO, a socket), is the same file
    (also through a hard link) as one of ``inputs`` (pairs of a description such as ``"the input"`` and a
    path; ``None`` paths are skipped), or when its parent directory does not exist (unless
    ``create_parent``). Returns ``path`` as a :class:`Path`.
    """
    path = Path(path)
    st = _lstat_no_link(path)
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeOutputError(ERR_OUT_NOT_FILE.format(out=path, kind=_kind(st.st_mode)))
        for what, inp in inputs:
            if inp is None or str(inp) == "-":
                continue
            try:
                ist = os.stat(inp)
            except OSError:
                continue
            if (ist.st_dev, ist.st_ino) == (st.st_dev, st.st_ino):
                raise UnsafeOutputError(ERR_OUT_IS_INPUT.format(out=path, what=what, inp=inp))
    parent = path.parent
    if not parent.exists():
        if not create_parent:
            raise UnsafeOutputError(ERR_OUT_NO_PARENT.format(out=path, parent=parent))
    elif not parent.is_dir():
        raise UnsafeOutputError(ERR_OUT_PARENT_NOT_DIR.format(out=path, parent=parent))
    return path


# ------------------------------------------------------------------------------------------- input checks

ERR_IN_NOT_FILE = "{inp}: is {kind}, not a regular file; expected {expected}"


class UnsafeInputError(ValueError):
    """An input path is not a regular file: reading it could block forever (a FIFO), never end (a device such
    as ``/dev/zero``) or fail halfway (a directory)."""


def check_input_file(path: str | Path, *, expected: str) -> Path:
    """Refuse, without opening it, an input that is not a regular file (a symbolic link is followed).

    Raises :class:`UnsafeInputError` (one line naming the path, what it is and ``expected``, e.g. ``"a dataset
    file (CSV, TSV, JSONL or Parquet)"``); a missing path raises :class:`FileNotFoundError` as ``open`` would.
    Returns ``path`` as a :class:`Path`.
    """
    path = Path(path)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise UnsafeInputError(ERR_IN_NOT_FILE.format(inp=path, kind=_kind(mode), expected=expected))
    return path
