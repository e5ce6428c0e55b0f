"""The privacy ledger: append-only JSONL, one entry per release, SHA-256 hash chain, Ed25519 signatures.

Ledger schema v1
----------------
One JSON object per line, written canonically: ``json.dumps(entry, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)`` encoded as UTF-8, then ``"\\n"``. No NaN or Infinity.

Chain fields, set by :meth:`Ledger.append` (a caller must not pass them):

* ``index``: 0, 1, 2, ... (contiguous);
* ``prev_hash``: the previous entry's ``hash`` (64 zeros for the first entry);
* ``hash``: hex SHA-256 of the canonical bytes of the entry without ``hash`` and ``signature`` (so it covers
  ``index``, ``prev_hash`` and every content field);
* ``signature``: base64 of the Ed25519 signature, by the node's key, over the 32 raw bytes of ``hash``.

Content fields, set by the caller (``schema`` and ``kind`` always; the others as listed per kind):

* ``schema``: 1; ``kind``: ``"dp-sgd"`` (a DP-SGD training release), ``"count-noise"`` (pure ε-DP noised
  evaluation counts) or ``"central-dp"`` (the server's client-level Gaussian mechanism);
* ``run``, ``round``, ``node``, ``time`` (UTC ISO 8601);
* ``dataset``: fingerprint (SHA-256 hex) of the node's dataset, the unit the accountant composes over;
* dp-sgd: ``accountant`` (``"prv"`` | ``"rdp"``), ``delta``, ``noise_multiplier``, ``sample_rate``, ``steps``,
  ``clipping_norm``, ``epsilon`` (cumulative ε at ``delta`` after this entry), ``epsilon_round`` (the cost of
  this release), ``budget_epsilon``, ``noise_seed`` (null = OS entropy);
* count-noise: ``epsilon_release`` (its pure ε), ``mechanism`` (e.g. ``"discrete-laplace"``), ``delta``;
* central-dp: ``noise_multiplier``, ``delta``, ``epsilon``.

Fields in :data:`REQUIRED_FIELDS` must be present (values may be null where the list above says so); extra
fields are allowed and covered by the hash and signature.

Anchors and what is detectable
------------------------------
An edit anywhere breaks that entry's hash or signature; a deletion, insertion or reordering breaks ``index``
and ``prev_hash``; an entry made with another key fails its signature. Removing entries from the *end* leaves
a valid shorter chain: it is only visible against an anchor outside the file. The node keeps one next to the
ledger, ``ledger.head`` (for ``X.jsonl``: ``X.head``; the last entry's count and hash, signed), and
:func:`verify_ledger` checks it when present. Independent anchors are the server's copy of the ledger
(``RUN_DIR/ledgers/<node>.jsonl``) and the per-round ε in ``RUN_DIR/metrics.jsonl``; pass a trusted head
hash or entry count as ``expected_head`` / ``expected_count``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.fsutil import atomic_write_bytes
from common.fsutil import fsync_dir as _fsync_dir

SCHEMA = 1
GENESIS = "0" * 64
KEY_NAME = "node_ed25519.key"
PUB_NAME = "node_ed25519.pub"
HEAD_SUFFIX = ".head"
KINDS = ("dp-sgd", "count-noise", "central-dp")
CHAIN_FIELDS = ("index", "prev_hash", "hash", "signature")
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "dp-sgd": ("run", "round", "node", "time", "dataset", "accountant", "delta", "noise_multiplier",
               "sample_rate", "steps", "clipping_norm", "epsilon", "epsilon_round", "budget_epsilon",
               "noise_seed"),
    "count-noise": ("run", "round", "node", "time", "dataset", "epsilon_release", "mechanism", "delta"),
    "central-dp": ("round", "node", "time", "noise_multiplier", "delta", "epsilon"),
}
_HEAD_CONTEXT = "fedpriv-ledger-head-v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")

# ---- errors (user-facing texts, asserted verbatim in tests)
ERR_KEY_MODE = (
    "{file}: the private key is accessible to group/others (mode {mode:04o}); it must be 0600. "
    "Run: chmod 600 {file}"
)
ERR_KEY_NOT_FILE = "{file}: the private key path is not a regular file"
ERR_KEY_UNREADABLE = "{file}: not a PEM PKCS8 Ed25519 private key ({reason})"
ERR_PUB_UNREADABLE = "{file}: not a PEM Ed25519 public key ({reason})"
ERR_PUB_MISMATCH = (
    "{file}: this public key does not belong to the private key next to it ({key}); auditors would reject "
    "every entry. Restore the matching pair, or move the stale public key away to re-export it"
)
ERR_BROKEN = "{file}: refusing to append to a ledger that does not verify ({count} problem(s)); first: {problem}"
ERR_STALE = ("{file}: the ledger changed since this release was planned (head {have}..., expected {want}...); "
             "nothing was appended: plan again on the current spend")
ERR_FIELDS_TYPE = "ledger fields must be a dict of JSON values; got {type}"
ERR_RESERVED = "ledger fields {keys} are set by the ledger itself; do not pass them"
ERR_SCHEMA = "ledger entry schema must be {want}; got {value!r}"
ERR_KIND = "ledger entry kind must be one of {kinds}; got {value!r}"
ERR_MISSING = "a {kind!r} ledger entry needs the fields {keys} (use null for an unknown value)"
ERR_VALUE = "ledger entry values must be finite JSON numbers, strings, booleans, null, lists or objects: {keys}"
ERR_NOT_FOUND = "{file}: no such ledger file"

# ---- problems reported by verify_ledger
P_UTF8 = "not valid UTF-8: the bytes were altered"
P_EMPTY = "empty line inside the ledger: a line was removed or altered"
P_JSON = "not valid JSON ({detail}): the line was altered or cut"
P_OBJECT = "not a JSON object: the line was altered"
P_NUMBER = "holds a non-finite number (NaN or Infinity): the entry was edited"
P_CANONICAL = "not in canonical form (sorted keys, no spaces, UTF-8): the line was edited"
P_INDEX = "index is {got!r} where {want} was expected: an entry was deleted, inserted or moved before it"
P_PREV = ("prev_hash does not match the hash of the entry before it: the chain is broken (deletion, insertion "
          "or reordering)")
P_HASH = "hash does not match the entry's content: the entry was edited"
P_SIG_FORMAT = "signature is not the canonical base64 of a 64-byte Ed25519 signature: it was altered"
P_SIG = "Ed25519 signature does not verify under the given public key: a forged entry, or the wrong key"
P_NEWLINE = "the last line does not end with a newline: the file was cut short or edited"
P_COUNT = "the ledger has {have} entries where {want} were expected: entries were removed or added at the end"
P_HEAD_FILE = "{name}: the signed head does not verify ({reason}): it was edited or signed by another key"
P_HEAD_TRUNCATED = ("{name} records {want} entries but the ledger has {have}: entries were removed from the end "
                    "(truncation)")
P_HEAD_MISMATCH = ("{name} records hash {want} for entry {index}, the ledger has {have}: the ledger was "
                   "rewritten")
P_HEAD_MISSING = ("{name} is missing: the signed head that records how many entries the ledger holds was "
                  "deleted, so entries removed from the end would go unnoticed; restore it from a backup, or "
                  "verify against a trusted anchor (--expected-count / --expected-head)")
P_TRUSTED_HEAD_MISSING = ("no entry has the trusted head hash {want}: the ledger was truncated or rewritten "
                          "(its last hash is {have})")
P_TRUSTED_HEAD_EARLY = "the trusted head is entry {index}, but {extra} entr(y/ies) follow it"
NOTE_HEAD_BEHIND = ("{name} records {want} entries, the ledger has {have}: the node stopped between writing an "
                    "entry and its head (the extra entries are signed and verified)")


class LedgerError(ValueError):
    """A ledger cannot be appended to or read as asked; the message says why."""


# --------------------------------------------------------------------------------------------- framing


def canonical(obj: Mapping[str, Any]) -> bytes:
    """Canonical UTF-8 JSON bytes of ``obj`` (sorted keys, no spaces, no NaN/Infinity)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical bytes of ``entry`` without ``hash`` and ``signature``."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical(body)).hexdigest()


def head_path(ledger_path: str | Path) -> Path:
    """Where the node keeps the signed head of ``ledger_path`` (``ledger.jsonl`` -> ``ledger.head``)."""
    return Path(ledger_path).with_suffix(HEAD_SUFFIX)


def _head_message(count: int, hash_hex: str) -> bytes:
    return f"{_HEAD_CONTEXT}:{count}:{hash_hex}".encode("ascii")


def _b64(sig: bytes) -> str:
    return base64.b64encode(sig).decode("ascii")


def _sig_bytes(value: Any) -> bytes | None:
    """Decode a signature field; None unless it is the canonical base64 of exactly 64 bytes."""
    if not isinstance(value, str):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    # Non-canonical encodings (e.g. non-zero padding bits) decode to the same bytes: reject them, or a changed
    # character would go unnoticed.
    return raw if len(raw) == 64 and _b64(raw) == value else None


# --------------------------------------------------------------------------------------------- keys


def load_or_create_node_key(state_dir: str | Path):
    """The node's Ed25519 signing key, created on first use.

    Creates ``state_dir/node_ed25519.key`` (PEM PKCS8, unencrypted, mode 0600, ``O_EXCL``) and exports
    ``state_dir/node_ed25519.pub`` (PEM SubjectPublicKeyInfo), the file an institution hands to its auditors.

    Parameters
    ----------
    state_dir : str or Path
        The node's state directory (created with mode 0700 if missing).

    Returns
    -------
    cryptography.hazmat.primitives.asymmetric.ed25519.Ed25519PrivateKey

    Raises
    ------
    PermissionError
        The key file is readable or writable by group/others (:data:`ERR_KEY_MODE`).
    ValueError
        The key file is not an Ed25519 PEM key, or the public key file belongs to another key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path = state_dir / KEY_NAME
    key = None
    if not key_path.exists():
        new = Ed25519PrivateKey.generate()
        pem = new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:  # another process created it first: use theirs
            pass
        else:
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                key_path.unlink(missing_ok=True)
                raise
            _fsync_dir(state_dir)
            key = new
    if key is None:
        key = _load_private_key(key_path)
    _export_public_key(key, state_dir / PUB_NAME, key_path)
    return key


def _load_private_key(key_path: Path):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    st = key_path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(ERR_KEY_NOT_FILE.format(file=key_path))
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise PermissionError(ERR_KEY_MODE.format(file=key_path, mode=mode))
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(ERR_KEY_UNREADABLE.format(file=key_path, reason=exc)) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(ERR_KEY_UNREADABLE.format(file=key_path, reason=f"a {type(key).__name__}"))
    return key


def _export_public_key(key, pub_path: Path, key_path: Path) -> None:
    pem = public_pem(key.public_key())
    if pub_path.exists():
        if public_pem(load_public_key(pub_path)) != pem:
            raise ValueError(ERR_PUB_MISMATCH.format(file=pub_path, key=key_path))
        return
    atomic_write_bytes(pub_path, pem, mode=0o644)


def public_pem(public_key) -> bytes:
    """PEM SubjectPublicKeyInfo bytes of an Ed25519 public key."""
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: str | Path):
    """Read an Ed25519 public key (PEM SubjectPublicKeyInfo), e.g. a node's ``node_ed25519.pub``.

    Raises
    ------
    ValueError
        The file is not a PEM Ed25519 public key (:data:`ERR_PUB_UNREADABLE`).
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(ERR_PUB_UNREADABLE.format(file=path, reason=exc)) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(ERR_PUB_UNREADABLE.format(file=path, reason=f"a {type(key).__name__}"))
    return key


# --------------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a ledger.

    ``line`` is the 1-based line in the file (None for the ledger as a whole), ``index`` the entry it concerns
    (the entry's position in the chain, when known), ``code`` a stable short name, ``message`` what is wrong.
    """

    line: int | None
    index: int | None
    code: str
    message: str

    def __str__(self) -> str:
        if self.line is None:
            where = "ledger" if self.index is None else f"entry {self.index}"
        else:
            where = f"line {self.line}" + (f" (entry {self.index})" if self.index is not None else "")
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "index": self.index, "code": self.code, "message": self.message}


@dataclass
class VerifyResult:
    """Outcome of :func:`verify_ledger`: the parsed entries (in file order), problems and informative notes."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def count(self) -> int:
        return len(self.entries)

    @property
    def head(self) -> str:
        """The last entry's ``hash`` (64 zeros for an empty ledger)."""
        return str(self.entries[-1].get("hash")) if self.entries else GENESIS


def verify_ledger(path_or_lines: str | Path | Iterable[str | bytes], public_key, *,
                  expected_count: int | None = None, expected_head: str | None = None,
                  segment: bool = False, require_head: bool = True) -> VerifyResult:
    """Check a ledger: JSON, canonical form, hashes, the ``prev_hash`` chain, contiguous ``index``, signatures.

    Parameters
    ----------
    path_or_lines : str, Path or iterable of str/bytes
        A ledger file (a ``str`` is a path), or its lines (a trailing ``"\\n"`` on each line is allowed). For a
        file, the signed head file next to it (:func:`head_path`) is checked too when it exists.
    public_key : Ed25519PublicKey
        The node's public key, as obtained from the institution.
    expected_count, expected_head : optional
        Trusted anchors (number of entries; hash of the last entry) from outside the file, e.g. the server's
        copy or ``metrics.jsonl``; without an anchor, entries removed from the end cannot be noticed.
    segment : bool
        The lines are a contiguous part of a ledger (e.g. the server's copy of one run): the first entry may
        have any ``index`` and ``prev_hash`` (both still covered by its signature); the rest must chain to it.
    require_head : bool
        For a whole ledger file (not a segment) with entries and no trusted anchor: its signed head file must
        exist (:data:`P_HEAD_MISSING` otherwise), since without it a cut at the tail cannot be noticed.

    Returns
    -------
    VerifyResult
        ``ok`` is True when there is no problem; every problem names the line and entry.

    Raises
    ------
    FileNotFoundError
        ``path_or_lines`` is a path that does not exist.
    """
    head_record: tuple[Path, bytes] | None = None
    if isinstance(path_or_lines, str | Path):
        path = Path(path_or_lines)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(ERR_NOT_FOUND.format(file=path)) from None
        hp = head_path(path)
        if hp.exists():
            head_record = (hp, hp.read_bytes())
        return _verify(_split(data), public_key, head_record=head_record, expected_count=expected_count,
                       expected_head=expected_head, segment=segment,
                       missing_head=None if segment or not require_head else hp)
    lines: list[str | None] = []
    for raw in path_or_lines:
        if isinstance(raw, bytes):
            lines.append(_decode(raw[:-1] if raw.endswith(b"\n") else raw))
        else:
            lines.append(raw[:-1] if raw.endswith("\n") else raw)
    return _verify((lines, True), public_key, head_record=None, expected_count=expected_count,
                   expected_head=expected_head, segment=segment)


def _decode(b: bytes) -> str | None:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _split(data: bytes) -> tuple[list[str | None], bool]:
    """Lines of a ledger file (None for undecodable ones) and whether the file ends with a newline."""
    if not data:
        return [], True
    parts = data.split(b"\n")
    ends_with_newline = parts[-1] == b""
    if ends_with_newline:
        parts.pop()
    return [_decode(p) for p in parts], ends_with_newline


def _verify(split: tuple[list[str | None], bool], public_key, *, head_record: tuple[Path, bytes] | None,
            expected_count: int | None, expected_head: str | None, segment: bool,
            missing_head: Path | None = None) -> VerifyResult:
    from cryptography.exceptions import InvalidSignature

    lines, ends_with_newline = split
    res = VerifyResult()
    prev_hash: str | None = None if segment else GENESIS
    first_index: int | None = None if segment else 0

    def problem(lineno: int | None, index: int | None, code: str, message: str) -> None:
        res.problems.append(Problem(lineno, index, code, message))

    for lineno, line in enumerate(lines, start=1):
        position = len(res.entries)
        want_index = None if first_index is None else first_index + position
        if line is None:
            problem(lineno, want_index, "utf8", P_UTF8)
            continue
        if not line.strip():
            problem(lineno, want_index, "empty", P_EMPTY)
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            problem(lineno, want_index, "json", P_JSON.format(detail=exc.msg))
            continue
        if not isinstance(entry, dict):
            problem(lineno, want_index, "object", P_OBJECT)
            continue
        idx = entry.get("index")
        idx_ok = type(idx) is int and idx >= 0
        if first_index is None:  # segment: the first entry fixes where the segment starts
            first_index = idx if idx_ok else 0
            want_index = first_index
        shown = idx if idx_ok else want_index
        try:
            computed = entry_hash(entry)
            canonical_ok = canonical(entry) == line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape: no signer writes one
            problem(lineno, shown, "canonical", P_CANONICAL)
            res.entries.append(entry)
            prev_hash = str(entry.get("hash"))
            continue
        except ValueError:  # NaN / Infinity
            problem(lineno, shown, "number", P_NUMBER)
            res.entries.append(entry)
            prev_hash = str(entry.get("hash"))
            continue
        if not canonical_ok:
            problem(lineno, shown, "canonical", P_CANONICAL)
        if not (idx_ok and idx == want_index):
            problem(lineno, shown, "index", P_INDEX.format(got=idx, want=want_index))
        if prev_hash is not None and entry.get("prev_hash") != prev_hash:
            problem(lineno, shown, "prev_hash", P_PREV)
        claimed = entry.get("hash")
        if claimed != computed:
            problem(lineno, shown, "hash", P_HASH)
        # The signature vouches for the recorded hash (the check above ties the hash to the content), so an
        # edit is reported once as an edit and a re-computed hash as a signature failure.
        signed = claimed if isinstance(claimed, str) and _HEX64.fullmatch(claimed) else computed
        sig = _sig_bytes(entry.get("signature"))
        if sig is None:
            problem(lineno, shown, "signature", P_SIG_FORMAT)
        else:
            try:
                public_key.verify(sig, bytes.fromhex(signed))
            except InvalidSignature:
                problem(lineno, shown, "signature", P_SIG)
        res.entries.append(entry)
        prev_hash = str(entry.get("hash"))
    if lines and not ends_with_newline:
        problem(len(lines), None, "newline", P_NEWLINE)

    n = len(res.entries)
    last = (res.entries[-1].get("index") if res.entries else None)
    last = last if type(last) is int else None
    if head_record is not None:
        _check_head_file(res, public_key, *head_record)
    elif missing_head is not None and res.entries and expected_count is None and expected_head is None:
        problem(None, last, "head-missing", P_HEAD_MISSING.format(name=missing_head.name))
    if expected_count is not None and n != expected_count:
        problem(None, last, "count", P_COUNT.format(have=n, want=expected_count))
    if expected_head is not None:
        hashes = [e.get("hash") for e in res.entries]
        if expected_head not in hashes:
            problem(None, last, "head", P_TRUSTED_HEAD_MISSING.format(want=expected_head, have=res.head))
        elif hashes.index(expected_head) != n - 1:
            at = hashes.index(expected_head)
            problem(None, at, "head", P_TRUSTED_HEAD_EARLY.format(index=at, extra=n - 1 - at))
    return res


def _check_head_file(res: VerifyResult, public_key, path: Path, raw: bytes) -> None:
    from cryptography.exceptions import InvalidSignature

    name = path.name
    try:
        head = json.loads(raw.decode("utf-8"))
        if not isinstance(head, dict) or canonical(head) + b"\n" != raw:
            raise ValueError("not one canonical JSON object")
        count, hash_hex = head["count"], head["hash"]
        if type(count) is not int or count < 1:
            raise ValueError(f"count {count!r} is not a positive integer")
        if not (isinstance(hash_hex, str) and _HEX64.fullmatch(hash_hex)):
            raise ValueError("hash is not 64 lowercase hex digits")
        sig = _sig_bytes(head["signature"])
        if sig is None:
            raise ValueError("signature is not canonical base64 of 64 bytes")
        public_key.verify(sig, _head_message(count, hash_hex))
    except InvalidSignature:
        res.problems.append(Problem(None, None, "head-file", P_HEAD_FILE.format(name=name,
                                                                                reason="bad signature")))
        return
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        res.problems.append(Problem(None, None, "head-file", P_HEAD_FILE.format(name=name, reason=exc)))
        return
    n = len(res.entries)
    if count > n:
        last = n - 1 if n else None
        res.problems.append(Problem(None, last, "head", P_HEAD_TRUNCATED.format(name=name, want=count, have=n)))
        return
    have = res.entries[count - 1].get("hash")
    if have != hash_hex:
        res.problems.append(Problem(None, count - 1, "head", P_HEAD_MISMATCH.format(
            name=name, want=hash_hex, index=count - 1, have=have)))
    elif count < n:
        res.notes.append(NOTE_HEAD_BEHIND.format(name=name, want=count, have=n))


# --------------------------------------------------------------------------------------------- append


class Ledger:
    """A node's ledger file, appended to under an exclusive lock after verifying what is already there.

    Parameters
    ----------
    path : str or Path
        The ledger file (``state_dir/ledger.jsonl``); created on the first append. The signed head goes to
        :func:`head_path` (``state_dir/ledger.head``).
    signing_key : Ed25519PrivateKey
        The node's key (:func:`load_or_create_node_key`).

    Notes
    -----
    Each append writes the line and fsyncs it, then replaces the head file. A crash between the two leaves
    the head one entry behind, which verification accepts with a note (the extra entry is signed) and the next
    append repairs. A crash in the middle of a line leaves a partial last line: verification fails and the
    node refuses to append until an operator removes that line (the head file still names the last complete
    entry, so nothing else can be removed unnoticed).
    """

    def __init__(self, path: str | Path, signing_key) -> None:
        self.path = Path(path)
        self._key = signing_key
        self._public = signing_key.public_key()

    @property
    def head_path(self) -> Path:
        return head_path(self.path)

    def verify(self) -> VerifyResult:
        """Verify the file and its head (an absent file is an empty ledger, but the head must agree)."""
        data = self.path.read_bytes() if self.path.exists() else b""
        return self._verify_bytes(data)

    def entries(self) -> list[dict[str, Any]]:
        """The entries of the verified ledger; raises :class:`LedgerError` when it does not verify."""
        return self._checked(self.verify()).entries

    def head(self) -> str:
        """The last entry's hash (64 zeros when empty); raises :class:`LedgerError` when it does not verify."""
        return self._checked(self.verify()).head

    def append(self, fields: Mapping[str, Any], *, if_head: str | None = None) -> dict[str, Any]:
        """Chain, sign and durably append one entry; return it (with ``index``, ``prev_hash``, ``hash``,
        ``signature``).

        ``if_head``: append only if the ledger's last hash is still this one (the state the caller decided
        on); otherwise raise :class:`LedgerError` (:data:`ERR_STALE`) and write nothing. A node that planned
        a release on a spend another process has since changed must plan again.

        Raises
        ------
        LedgerError
            ``fields`` is not a valid schema-v1 entry (reserved, missing or non-finite fields), or the existing
            ledger does not verify (:data:`ERR_BROKEN`): the node never builds on a broken chain.
        """
        entry = _validated(fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked() as f:
            f.seek(0)
            res = self._checked(self._verify_bytes(f.read()))
            if if_head is not None and res.head != if_head:
                raise LedgerError(ERR_STALE.format(file=self.path, want=if_head[:16], have=res.head[:16]))
            entry["index"] = len(res.entries)
            entry["prev_hash"] = res.head
            digest = entry_hash(entry)
            entry["hash"] = digest
            entry["signature"] = _b64(self._key.sign(bytes.fromhex(digest)))
            f.seek(0, os.SEEK_END)
            f.write(canonical(entry) + b"\n")
            f.flush()
            os.fsync(f.fileno())
            self._write_head(entry["index"] + 1, digest)
        return dict(entry)

    # ---- internals
    def _verify_bytes(self, data: bytes) -> VerifyResult:
        hp = self.head_path
        head_record = (hp, hp.read_bytes()) if hp.exists() else None
        return _verify(_split(data), self._public, head_record=head_record, expected_count=None,
                       expected_head=None, segment=False, missing_head=hp)

    def _checked(self, res: VerifyResult) -> VerifyResult:
        if not res.ok:
            raise LedgerError(ERR_BROKEN.format(file=self.path, count=len(res.problems), problem=res.problems[0]))
        return res

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Any]:
        with open(self.path, "a+b") as f:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - not POSIX
                yield f
                return
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield f
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _write_head(self, count: int, digest: str) -> None:
        head = {"count": count, "hash": digest, "signature": _b64(self._key.sign(_head_message(count, digest)))}
        atomic_write_bytes(self.head_path, canonical(head) + b"\n", mode=0o644)


def _validated(fields: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(fields, Mapping):
        raise LedgerError(ERR_FIELDS_TYPE.format(type=type(fields).__name__))
    reserved = sorted(k for k in fields if k in CHAIN_FIELDS)
    if reserved:
        raise LedgerError(ERR_RESERVED.format(keys=", ".join(reserved)))
    if fields.get("schema") != SCHEMA or isinstance(fields.get("schema"), bool):
        raise LedgerError(ERR_SCHEMA.format(want=SCHEMA, value=fields.get("schema")))
    kind = fields.get("kind")
    if kind not in KINDS:
        raise LedgerError(ERR_KIND.format(kinds=", ".join(KINDS), value=kind))
    missing = [k for k in REQUIRED_FIELDS[kind] if k not in fields]
    if missing:
        raise LedgerError(ERR_MISSING.format(kind=kind, keys=", ".join(missing)))
    entry = dict(fields)
    try:
        canonical(entry)
    except (ValueError, TypeError) as exc:
        bad = [str(k) for k, v in entry.items() if not _json_ok(k, v)]
        raise LedgerError(ERR_VALUE.format(keys=", ".join(bad) or str(exc))) from exc
    return entry


def _json_ok(key: Any, value: Any) -> bool:
    if not isinstance(key, str):
        return False
    try:
        json.dumps(value, allow_nan=False, sort_keys=True)
    except (ValueError, TypeError):
        return False
    return not (isinstance(value, float) and not math.isfinite(value))
