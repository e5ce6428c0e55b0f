"""The fedpriv encrypted dataset container (format version 1). Byte-level spec: docs/container-format.md.

Summary: a header (magic, version, KDF and its parameters, a random 16-byte salt that is also the file id,
chunk size, plaintext size, the inner file name, a key-check value), then the plaintext in fixed-size chunks,
each sealed with AES-256-GCM under a per-file key derived with HKDF-SHA256 from the master key (a 256-bit key
file, or scrypt of a passphrase). Nonce of chunk i = 4 zero bytes || i as u64 big-endian. Associated data of
chunk i = the whole header || i as u64 || final flag (1 for the last chunk, else 0). So:

* a wrong key or passphrase fails the key-check value and is reported as such, not as corruption;
* any edit of the header fails the key check or every chunk's tag;
* reordering, removing or duplicating chunks changes their index or the final flag -> tag failure;
* truncation is caught by the size the header states and by the final flag;
* a chunk from another file (even under the same master key) fails: the per-file key differs.

Only ``cryptography`` primitives are used (AESGCM, HKDF, HMAC, Scrypt). Decryption verifies every chunk
before anything is returned or written; plaintext goes to memory, never to disk, except where the user asks
for it (``decrypt_file``).
"""

from __future__ import annotations

import base64
import hmac
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from common.fsutil import atomic_output, atomic_write_bytes

MAGIC = b"FPRIVDS\x00"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB
KDF_RAW = 1  # master key = the 32 bytes of a key file
KDF_SCRYPT = 2  # master key = scrypt(passphrase, salt, n=2**log2_n, r, p, 32)
SCRYPT_DEFAULT = (15, 8, 1)  # log2(n), r, p
KEY_FILE_LABEL = "fedpriv-dataset-key-v1"
TAG_SIZE = 16
CHECK_SIZE = 32
# Fixed part: magic 8 | version u16 | kdf u8 | log2_n u8 | r u32 | p u32 | salt 16 | chunk u32 | size u64 | name_len u16
_FIXED = struct.Struct(">8sHBBII16sIQH")

ERR_NOT_CONTAINER = "{file}: not a fedpriv container (bad magic bytes)"
ERR_VERSION = "{file}: unsupported container version {version}; this fedpriv reads version 1"
ERR_WRONG_KEY = "{file}: wrong key (the key-check value does not match)"
ERR_WRONG_PASSPHRASE = "{file}: wrong passphrase (the key-check value does not match)"
ERR_CORRUPT = "{file}: corrupted at chunk {index} (authentication failed)"
ERR_TRUNCATED = "{file}: truncated: {got} bytes of encrypted data, the header promises {expected}"
ERR_TRAILING = "{file}: corrupted: {extra} unexpected bytes after the last chunk"
ERR_HEADER = "{file}: corrupted header ({reason})"
ERR_KEY_FILE = "{file}: not a fedpriv key file (expected a '{label}' line and 32 base64-encoded bytes)"
ERR_KEY_EXISTS = "{file}: already exists; refusing to overwrite a key file"
ERR_PASSPHRASE_ENV = "environment variable {var} is not set or empty; it must hold the passphrase"
ERR_KDF_MISMATCH = "{file}: was encrypted with a {need}, but a {got} was given"


class ContainerError(ValueError):
    """Base class: the container cannot be opened. Messages never contain key material."""


class NotAContainerError(ContainerError):
    pass


class UnsupportedVersionError(ContainerError):
    pass


class WrongKeyError(ContainerError):
    pass


class TruncatedError(ContainerError):
    pass


class CorruptedChunkError(ContainerError):
    def __init__(self, message: str, chunk_index: int | None = None) -> None:
        super().__init__(message)
        self.chunk_index = chunk_index


class KeyFileError(ValueError):
    pass


# --------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class KeySource:
    """Where the master key comes from: a key file's 32 bytes, or a passphrase (through scrypt)."""

    key: bytes | None = field(default=None, repr=False)
    passphrase: bytes | None = field(default=None, repr=False)
    scrypt_params: tuple[int, int, int] = SCRYPT_DEFAULT  # used when encrypting with a passphrase

    def __post_init__(self) -> None:
        if (self.key is None) == (self.passphrase is None):
            raise ValueError("give exactly one of a key or a passphrase")
        if self.key is not None and len(self.key) != 32:
            raise ValueError("a dataset key must be 32 bytes (256 bits)")

    @classmethod
    def from_key_file(cls, path: str | Path) -> KeySource:
        return cls(key=read_key_file(path))

    @classmethod
    def from_passphrase_env(cls, var: str, *, scrypt_params: tuple[int, int, int] = SCRYPT_DEFAULT) -> KeySource:
        value = os.environ.get(var, "")
        if not value:
            raise KeyFileError(ERR_PASSPHRASE_ENV.format(var=var))
        return cls(passphrase=value.encode("utf-8"), scrypt_params=scrypt_params)

    @property
    def kind(self) -> str:
        return "key file" if self.key is not None else "passphrase"


def generate_key() -> bytes:
    """32 bytes from the OS CSPRNG."""
    return os.urandom(32)


def write_key_file(path: str | Path, key: bytes) -> Path:
    """Write a key file with mode 0600; refuse to overwrite (O_EXCL)."""
    path = Path(path)
    if len(key) != 32:
        raise ValueError("a dataset key must be 32 bytes")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(ERR_KEY_EXISTS.format(file=path)) from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{KEY_FILE_LABEL}\n{base64.b64encode(key).decode('ascii')}\n")
    os.chmod(path, 0o600)
    return path


def read_key_file(path: str | Path) -> bytes:
    path = Path(path)
    try:
        lines = path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read key file ({getattr(exc, 'strerror', None) or 'not text'})") from None
    if len(lines) != 2 or lines[0] != KEY_FILE_LABEL:
        raise KeyFileError(ERR_KEY_FILE.format(file=path, label=KEY_FILE_LABEL))
    try:
        key = base64.b64decode(lines[1], validate=True)
    except ValueError:
        raise KeyFileError(ERR_KEY_FILE.format(file=path, label=KEY_FILE_LABEL)) from None
    if len(key) != 32:
        raise KeyFileError(ERR_KEY_FILE.format(file=path, label=KEY_FILE_LABEL))
    return key


# --------------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class Header:
    version: int
    kdf: int
    log2_n: int
    r: int
    p: int
    salt: bytes
    chunk_size: int
    plaintext_size: int
    inner_name: str
    key_check: bytes

    def body(self) -> bytes:
        """Header bytes up to (excluding) the key-check value."""
        name = self.inner_name.encode("utf-8")
        return _FIXED.pack(MAGIC, self.version, self.kdf, self.log2_n, self.r, self.p, self.salt,
                           self.chunk_size, self.plaintext_size, len(name)) + name

    def to_bytes(self) -> bytes:
        return self.body() + self.key_check

    @property
    def num_chunks(self) -> int:
        return max(1, math.ceil(self.plaintext_size / self.chunk_size))

    def ciphertext_size(self) -> int:
        return self.plaintext_size + self.num_chunks * TAG_SIZE


def _parse_header(f: BinaryIO, file: str) -> Header:
    fixed = f.read(_FIXED.size)
    if len(fixed) < 8 or fixed[:8] != MAGIC:
        raise NotAContainerError(ERR_NOT_CONTAINER.format(file=file))
    if len(fixed) < _FIXED.size:
        raise TruncatedError(ERR_HEADER.format(file=file, reason="header is cut short"))
    _, version, kdf, log2_n, r, p, salt, chunk, size, name_len = _FIXED.unpack(fixed)
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(ERR_VERSION.format(file=file, version=version))
    name = f.read(name_len)
    check = f.read(CHECK_SIZE)
    if len(name) != name_len or len(check) != CHECK_SIZE:
        raise TruncatedError(ERR_HEADER.format(file=file, reason="header is cut short"))
    if kdf not in (KDF_RAW, KDF_SCRYPT) or chunk <= 0 or (kdf == KDF_SCRYPT and not (1 <= log2_n <= 30)):
        raise CorruptedChunkError(ERR_HEADER.format(file=file, reason="invalid KDF or chunk size field"))
    try:
        inner = name.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptedChunkError(ERR_HEADER.format(file=file, reason="inner name is not UTF-8")) from None
    return Header(version, kdf, log2_n, r, p, salt, chunk, size, inner, check)


def _master_key(src: KeySource, h: Header, file: str) -> bytes:
    if h.kdf == KDF_RAW:
        if src.key is None:
            raise WrongKeyError(ERR_KDF_MISMATCH.format(file=file, need="key file", got="passphrase"))
        return src.key
    if src.passphrase is None:
        raise WrongKeyError(ERR_KDF_MISMATCH.format(file=file, need="passphrase", got="key file"))
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=h.salt, length=32, n=1 << h.log2_n, r=h.r, p=h.p).derive(src.passphrase)


def _subkeys(master: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """(chunk encryption key, key-check key) = HKDF-SHA256(master, salt, info=...)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=b"fedpriv container v1").derive(master)
    return okm[:32], okm[32:]


def _key_check(check_key: bytes, body: bytes) -> bytes:
    return hmac.new(check_key, b"fedpriv key check\x00" + body, "sha256").digest()


def _nonce(index: int) -> bytes:
    return b"\x00\x00\x00\x00" + index.to_bytes(8, "big")


def _aad(header_bytes: bytes, index: int, final: bool) -> bytes:
    return header_bytes + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")


# --------------------------------------------------------------------------------------------- encrypt


def _new_header(key_source: KeySource, *, chunk_size: int, size: int, inner_name: str) -> tuple[Header, bytes]:
    if chunk_size <= 0 or chunk_size > 0xFFFFFFFF:
        raise ValueError(f"chunk_size must be in [1, 2**32), got {chunk_size}")
    salt = os.urandom(16)
    if key_source.key is not None:
        kdf, (log2_n, r, p) = KDF_RAW, (0, 0, 0)
    else:
        kdf, (log2_n, r, p) = KDF_SCRYPT, key_source.scrypt_params
    draft = Header(FORMAT_VERSION, kdf, log2_n, r, p, salt, chunk_size, size, inner_name, b"")
    enc_key, check_key = _subkeys(_master_key(key_source, draft, "<new>"), salt)
    h = Header(FORMAT_VERSION, kdf, log2_n, r, p, salt, chunk_size, size, inner_name,
               _key_check(check_key, draft.body()))
    return h, enc_key


def _encrypt_stream(read_chunk, write, *, key_source: KeySource, size: int, chunk_size: int, inner_name: str) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    h, enc_key = _new_header(key_source, chunk_size=chunk_size, size=size, inner_name=inner_name)
    hb = h.to_bytes()
    write(hb)
    aead = AESGCM(enc_key)
    n = h.num_chunks
    out_buf = bytearray(min(chunk_size, size) + TAG_SIZE)
    for i in range(n):
        want = min(chunk_size, size - i * chunk_size)
        pt = read_chunk(want)
        if len(pt) != want:
            raise OSError("input changed size while being encrypted")
        ct = memoryview(out_buf)[: want + TAG_SIZE]
        aead.encrypt_into(_nonce(i), pt, _aad(hb, i, i == n - 1), ct)
        write(ct)


def encrypt_bytes(plaintext: bytes, *, key_source: KeySource, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  inner_name: str = "") -> bytes:
    """Encrypt in memory; ``inner_name`` (e.g. ``data.csv``) tells readers the inner format."""
    view = memoryview(plaintext)
    parts: list[bytes] = []
    pos = 0

    def read_chunk(k: int) -> memoryview:
        nonlocal pos
        chunk = view[pos: pos + k]  # no copy
        pos += k
        return chunk

    _encrypt_stream(read_chunk, lambda b: parts.append(bytes(b)), key_source=key_source, size=len(plaintext),
                    chunk_size=chunk_size, inner_name=inner_name)
    return b"".join(parts)


def encrypt_file(in_path: str | Path, out_path: str | Path, *, key_source: KeySource,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> Path:
    """Stream-encrypt a file; the output appears atomically (temp file in the same directory + rename)."""
    in_path, out_path = Path(in_path), Path(out_path)
    size = in_path.stat().st_size
    with open(in_path, "rb") as src, atomic_output(out_path) as dst:
        _encrypt_stream(src.read, dst.write, key_source=key_source, size=size, chunk_size=chunk_size,
                        inner_name=in_path.name)
    return out_path


# --------------------------------------------------------------------------------------------- decrypt


def _open(src: str | Path | bytes | bytearray) -> tuple[BinaryIO, str, int]:
    import io

    if isinstance(src, bytes | bytearray):
        return io.BytesIO(src), "<memory>", len(src)
    path = Path(src)
    return open(path, "rb"), str(path), path.stat().st_size


def decrypt_to_memory(src: str | Path | bytes | bytearray, *, key_source: KeySource) -> bytearray:
    """Verify and decrypt a whole container into one preallocated ``bytearray``.

    Reads one chunk at a time, so peak memory is the plaintext plus one chunk. Raises a ContainerError
    subclass (never returns partial plaintext): on failure the buffer is zeroed and dropped.
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    f, file, total = _open(src)
    with f:
        h = _parse_header(f, file)
        hb = h.to_bytes()
        body = total - len(hb)
        if body < h.ciphertext_size():
            raise TruncatedError(ERR_TRUNCATED.format(file=file, got=body, expected=h.ciphertext_size()))
        if body > h.ciphertext_size():
            raise CorruptedChunkError(ERR_TRAILING.format(file=file, extra=body - h.ciphertext_size()))
        enc_key, check_key = _subkeys(_master_key(key_source, h, file), h.salt)
        if not hmac.compare_digest(_key_check(check_key, h.body()), h.key_check):
            msg = ERR_WRONG_KEY if key_source.key is not None else ERR_WRONG_PASSPHRASE
            raise WrongKeyError(msg.format(file=file))
        aead = AESGCM(enc_key)
        out = bytearray(h.plaintext_size)
        view = memoryview(out)
        ct_buf = bytearray(min(h.chunk_size, max(h.plaintext_size, 0)) + TAG_SIZE)
        n = h.num_chunks
        try:
            for i in range(n):
                pt_len = min(h.chunk_size, h.plaintext_size - i * h.chunk_size)
                ct = memoryview(ct_buf)[: pt_len + TAG_SIZE]
                if f.readinto(ct) != len(ct):
                    raise TruncatedError(ERR_TRUNCATED.format(file=file, got=body, expected=h.ciphertext_size()))
                try:
                    # Decrypt straight into the result buffer (no per-chunk copies); a failed tag leaves
                    # garbage there, which is zeroed below before the error propagates.
                    aead.decrypt_into(_nonce(i), ct, _aad(hb, i, i == n - 1),
                                      view[i * h.chunk_size: i * h.chunk_size + pt_len])
                except InvalidTag:
                    raise CorruptedChunkError(ERR_CORRUPT.format(file=file, index=i), i) from None
        except BaseException:
            view[:] = bytes(len(out))
            raise
        finally:
            view.release()
    return out


def decrypt_file(in_path: str | Path, out: str | Path, *, key_source: KeySource) -> None:
    """Decrypt fully (verifying every chunk) before writing anything; ``out='-'`` writes to stdout."""
    import sys

    data = decrypt_to_memory(in_path, key_source=key_source)
    if str(out) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    atomic_write_bytes(out, data, mode=0o600)


def rekey_file(in_path: str | Path, out_path: str | Path, *, old_key_source: KeySource,
               new_key_source: KeySource) -> Path:
    """Re-encrypt under a new key or passphrase; the plaintext exists only in memory."""
    info = inspect(in_path)
    data = decrypt_to_memory(in_path, key_source=old_key_source)
    blob = encrypt_bytes(bytes(data), key_source=new_key_source, chunk_size=int(info["chunk_size"]),
                         inner_name=str(info["inner_name"]))
    data[:] = bytes(len(data))
    atomic_write_bytes(out_path, blob)
    return Path(out_path)


def inspect(path: str | Path | bytes) -> dict[str, object]:
    """Header facts, readable without the key."""
    f, file, total = _open(path)
    with f:
        h = _parse_header(f, file)
    return {
        "file": file,
        "format": "fedpriv encrypted dataset",
        "version": h.version,
        "kdf": "raw-key+hkdf-sha256" if h.kdf == KDF_RAW else "scrypt+hkdf-sha256",
        "kdf_params": {} if h.kdf == KDF_RAW else {"n": 1 << h.log2_n, "r": h.r, "p": h.p},
        "cipher": "AES-256-GCM",
        "file_id": h.salt.hex(),
        "chunk_size": h.chunk_size,
        "chunks": h.num_chunks,
        "plaintext_size": h.plaintext_size,
        "inner_name": h.inner_name,
        "file_size": total,
        "size_matches_header": total == len(h.to_bytes()) + h.ciphertext_size(),
    }


def is_container(path: str | Path) -> bool:
    """True when the file starts with the fedpriv magic bytes (no key needed)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False
