"""The privacy ledger: append-only JSONL, one entry per release, SHA-256 hash chain, Ed25519 signatures.

Schema v1, one JSON object per line, written canonically (``sort_keys``, no spaces, UTF-8):

* chain fields: ``index`` (0, 1, ...), ``prev_hash`` (the previous entry's ``hash``; 64 zeros first),
  ``hash`` = SHA-256 of the canonical JSON of the entry without ``hash`` and ``signature``,
  ``signature`` = base64 Ed25519 signature over the 32 raw hash bytes, by the node's key;
* content (set by the caller): ``schema`` (1), ``kind`` (``dp-sgd`` | ``count-noise`` | ``central-dp``), ``run``,
  ``round``, ``node``, ``dataset`` (SHA-256 fingerprint), ``accountant``, ``delta``, ``noise_multiplier``,
  ``sample_rate``, ``steps``, ``clipping_norm``, ``epsilon`` (cumulative ε after this entry), ``epsilon_round``,
  ``budget_epsilon``, ``noise_seed`` (null = OS entropy), ``time``; count releases carry ``epsilon_release``
  and ``mechanism``.

Next to ``ledger.jsonl`` the node keeps ``ledger.jsonl.head``: the last entry's index and hash, signed.
An edit, insertion, deletion or reordering anywhere breaks the chain or a signature; removing entries from
the *end* is only visible against an anchor (the head file, the server's copy, or ``metrics.jsonl``), which
``verify_ledger`` accepts as ``expected_head`` / ``expected_count``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
KEY_NAME = "node_ed25519.key"
PUB_NAME = "node_ed25519.pub"

ERR_KEY_MODE = "{file}: private key is readable by group/others (mode {mode:o}); run chmod 600 {file}"
ERR_BROKEN = "{file}: refusing to append to a ledger that does not verify: {problem}"


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical(body)).hexdigest()


# --------------------------------------------------------------------------------------------- keys


def load_or_create_node_key(state_dir: str | Path):
    """The node's Ed25519 signing key: created on first use (PKCS8 PEM, mode 0600) with its public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path = state_dir / KEY_NAME
    if key_path.exists():
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise PermissionError(ERR_KEY_MODE.format(file=key_path, mode=mode))
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{key_path}: not an Ed25519 private key")
    else:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    pub_path = state_dir / PUB_NAME
    if not pub_path.exists():
        pub_path.write_bytes(public_pem(key.public_key()))
    return key


def public_pem(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


# --------------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based line in the file (0 = the file as a whole)
    index: int | None  # the entry's index field when readable
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (entry {self.index})" if self.index is not None else "") if self.line else "ledger"
        return f"{where}: {self.message}"


@dataclass
class VerifyResult:
    entries: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def head(self) -> str:
        return self.entries[-1]["hash"] if self.entries else GENESIS


def _decode(b: bytes) -> str | None:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def verify_ledger(source: str | Path | Iterable[str], public_key, *, expected_count: int | None = None,
                  expected_head: str | None = None) -> VerifyResult:
    """Check every line: canonical JSON, hash, chain, contiguous index, signature; then the anchors."""
    from cryptography.exceptions import InvalidSignature

    head_file: Path | None = None
    if isinstance(source, str | Path):
        path = Path(source)
        raw_lines = [_decode(b) for b in path.read_bytes().split(b"\n")] if path.exists() else []
        if raw_lines and raw_lines[-1] == "":
            raw_lines.pop()  # the newline after the last entry
        head_file = path.with_name(path.name + ".head")
    else:
        raw_lines = list(source)
    res = VerifyResult()
    prev = GENESIS
    for lineno, line in enumerate(raw_lines, start=1):
        if line is None:
            res.problems.append(Problem(lineno, None, "not valid UTF-8: edited or corrupted"))
            continue
        if not line.strip():
            res.problems.append(Problem(lineno, None, "empty line inside the ledger"))
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            res.problems.append(Problem(lineno, None, f"not valid JSON ({exc.msg}): edited or truncated"))
            continue
        if not isinstance(entry, dict):
            res.problems.append(Problem(lineno, None, "not a JSON object"))
            continue
        idx = entry.get("index")
        expected_index = len(res.entries)
        try:
            if canonical(entry) != line.encode("utf-8"):
                res.problems.append(Problem(lineno, idx, "not in canonical form: the line was edited"))
        except ValueError:
            res.problems.append(Problem(lineno, idx, "holds a non-finite number: edited"))
        if idx != expected_index:
            res.problems.append(Problem(lineno, idx, f"index {idx!r} where {expected_index} was expected: "
                                                     "an entry was deleted, inserted or reordered"))
        if entry.get("prev_hash") != prev:
            res.problems.append(Problem(lineno, idx, "prev_hash does not match the previous entry: the chain is "
                                                     "broken (deletion, insertion or reordering)"))
        h = entry_hash(entry)
        if entry.get("hash") != h:
            res.problems.append(Problem(lineno, idx, "hash does not match the entry's content: the entry was edited"))
        try:
            public_key.verify(base64.b64decode(str(entry.get("signature", "")), validate=True), bytes.fromhex(h))
        except (InvalidSignature, ValueError):
            res.problems.append(Problem(lineno, idx, "signature does not verify under the given public key "
                                                     "(forged entry or wrong key)"))
        res.entries.append(entry)
        prev = str(entry.get("hash"))
    if expected_count is not None and len(res.entries) != expected_count:
        res.problems.append(Problem(0, None, f"{len(res.entries)} entries, expected {expected_count}: entries "
                                             "were removed or added at the end"))
    if expected_head is None and head_file is not None and head_file.exists():
        try:
            head = json.loads(head_file.read_text())
            public_key.verify(base64.b64decode(head["signature"]), bytes.fromhex(head["hash"]) + str(head["count"]).encode())
            expected_head = head["hash"]
            if int(head["count"]) != len(res.entries):
                res.problems.append(Problem(0, None, f"the signed head records {head['count']} entries, the ledger "
                                                     f"has {len(res.entries)}: truncated or extended"))
        except (InvalidSignature, ValueError, KeyError, json.JSONDecodeError):
            res.problems.append(Problem(0, None, f"{head_file.name}: head file does not verify"))
    if expected_head is not None and res.head != expected_head:
        res.problems.append(Problem(0, None, "the last entry's hash differs from the trusted head: the ledger was "
                                             "truncated, extended or rewritten"))
    return res


# --------------------------------------------------------------------------------------------- append


class Ledger:
    """A node's ledger file; ``append`` signs and chains a new entry after verifying the existing ones."""

    def __init__(self, path: str | Path, signing_key) -> None:
        self.path = Path(path)
        self.key = signing_key

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    def entries(self) -> list[dict[str, Any]]:
        return verify_ledger(self.path, self.key.public_key()).entries

    def head(self) -> str:
        return verify_ledger(self.path, self.key.public_key()).head

    def append(self, fields: dict[str, Any]) -> dict[str, Any]:
        check = verify_ledger(self.path, self.key.public_key())
        if not check.ok:
            raise ValueError(ERR_BROKEN.format(file=self.path, problem=check.problems[0]))
        entry = {k: v for k, v in fields.items() if k not in ("index", "prev_hash", "hash", "signature")}
        entry["index"] = len(check.entries)
        entry["prev_hash"] = check.head
        h = entry_hash(entry)
        entry["hash"] = h
        entry["signature"] = base64.b64encode(self.key.sign(bytes.fromhex(h))).decode("ascii")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(canonical(entry) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        count = entry["index"] + 1
        head = {"hash": h, "count": count,
                "signature": base64.b64encode(self.key.sign(bytes.fromhex(h) + str(count).encode())).decode("ascii")}
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        tmp.write_text(json.dumps(head))
        os.replace(tmp, self.head_path)
        return entry
