"""The encrypted container: round trips, tamper detection, wrong keys, key files, and an independent decryptor
written from docs/container-format.md with only the standard library and cryptography's AESGCM and Scrypt."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import crypto
from common.crypto import (
    ContainerError,
    CorruptedChunkError,
    CorruptedHeaderError,
    KeySource,
    KeySourceError,
    NotAContainerError,
    TruncatedError,
    UnsupportedVersionError,
    WrongKeyError,
)

CHUNK = 64
RAW_KEY = bytes(range(32))
KEY = KeySource(key=RAW_KEY)
OTHER_KEY = KeySource(key=b"\x01" * 32)
FAST_SCRYPT = (4, 8, 1)  # N = 16: cheap parameters, for tests only
PASSPHRASE = b"correct horse battery staple"
PW = KeySource(passphrase=PASSPHRASE, scrypt_params=FAST_SCRYPT)
MEM = "<memory>"


def enc(data: bytes, *, key: KeySource = KEY, chunk: int = CHUNK, name: str = "data.csv") -> bytes:
    return crypto.encrypt_bytes(data, key_source=key, chunk_size=chunk, inner_name=name)


def dec(blob: bytes, *, key: KeySource = KEY) -> bytes:
    return bytes(crypto.decrypt_to_memory(blob, key_source=key))


def split(blob: bytes) -> tuple[bytes, list[bytes]]:
    """(header, chunks) of a container, from the header's own fields (spec layout)."""
    chunk_size, size = struct.unpack(">IQ", blob[36:48])
    head = 128
    n = max(1, -(-size // chunk_size))
    parts, pos = [], head
    for i in range(n):
        length = min(chunk_size, size - i * chunk_size) + 16
        parts.append(blob[pos: pos + length])
        pos += length
    assert pos == len(blob)
    return blob[:head], parts


def redigest(header: bytes) -> bytes:
    """A header with its digest recomputed after a deliberate edit (what an attacker can do without a key)."""
    return header[:-8] + hashlib.sha256(header[:-8]).digest()[:8]


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 7])
def test_round_trip_at_chunk_boundaries(size: int) -> None:
    data = os.urandom(size)
    blob = enc(data)
    assert dec(blob) == data
    assert len(blob) == 128 + size + 16 * max(1, -(-size // CHUNK))


@settings(max_examples=60, deadline=None)
@given(chunk=st.integers(min_value=1, max_value=48), pick=st.data())
def test_round_trip_property(chunk: int, pick: st.DataObject) -> None:
    size = pick.draw(st.one_of(st.sampled_from([0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk]),
                               st.integers(min_value=0, max_value=6 * chunk)), label="size")
    data = pick.draw(st.binary(min_size=size, max_size=size), label="data")
    blob = enc(data, chunk=chunk)
    assert dec(blob) == data
    assert crypto.inspect(blob)["chunk_count"] == max(1, -(-size // chunk))


@settings(max_examples=15, deadline=None)
@given(data=st.binary(max_size=300), chunk=st.sampled_from([1, 7, CHUNK, 1 << 20]))
def test_passphrase_round_trip_property(data: bytes, chunk: int) -> None:
    assert dec(enc(data, key=PW, chunk=chunk), key=PW) == data


def test_accepts_bytearray_memoryview_and_paths(tmp_path: Path) -> None:
    data = os.urandom(500)
    for buf in (bytearray(data), memoryview(data)):
        blob = crypto.encrypt_bytes(buf, key_source=KEY, chunk_size=CHUNK)
        assert dec(blob) == data
        assert bytes(crypto.decrypt_to_memory(memoryview(bytearray(blob)), key_source=KEY)) == data
    (tmp_path / "c.fpenc").write_bytes(blob)
    for path in (tmp_path / "c.fpenc", str(tmp_path / "c.fpenc")):
        assert bytes(crypto.decrypt_to_memory(path, key_source=KEY)) == data


def test_each_encryption_has_its_own_file_id_and_ciphertext() -> None:
    a, b = enc(b"same rows"), enc(b"same rows")
    assert a != b and crypto.inspect(a)["file_id"] != crypto.inspect(b)["file_id"]


# ------------------------------------------------------------------------------------------ tampering


def expected_error(blob: bytes, i: int) -> type[ContainerError]:
    """Which error a flip of byte i must raise: the header is checked field by field, chunks by their tag."""
    head, _ = split(blob)
    if i < 8:
        return NotAContainerError
    if i < 10:
        return UnsupportedVersionError
    if i < len(head):
        return CorruptedHeaderError
    return CorruptedChunkError


@pytest.mark.parametrize("key", [KEY, PW], ids=["key-file", "passphrase"])
def test_every_single_byte_flip_is_rejected_with_the_right_error(key: KeySource) -> None:
    data = os.urandom(2 * CHUNK + 22)  # three chunks, the last one short
    blob = enc(data, key=key)
    head, parts = split(blob)
    starts = [len(head) + sum(len(p) for p in parts[:k]) for k in range(len(parts))]
    for i in range(len(blob)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(blob)
            bad[i] ^= mask
            with pytest.raises(ContainerError) as info:
                dec(bytes(bad), key=key)
            assert type(info.value) is expected_error(blob, i), (i, mask, info.value)
            if i >= len(head):
                chunk = max(k for k, s in enumerate(starts) if s <= i)
                assert info.value.chunk_index == chunk
                assert str(info.value) == crypto.ERR_CORRUPT.format(file=MEM, index=chunk)


def test_every_deliberate_header_edit_is_rejected_even_with_the_digest_recomputed() -> None:
    blob = enc(os.urandom(3 * CHUNK + 5))
    head, _ = split(blob)
    for i in range(10, len(head) - 8):  # past magic and version; the digest itself is recomputed
        for mask in (0x01, 0x80):
            bad = bytearray(head)
            bad[i] ^= mask
            with pytest.raises(ContainerError):
                dec(redigest(bytes(bad)) + blob[len(head):])


def test_dropping_the_last_chunk_and_rewriting_the_size_is_rejected() -> None:
    """An attacker shortens the file at a chunk boundary and edits plaintext_size to match: the key check
    (which covers the header body) fails; without it the final flag on the new last chunk would."""
    data = os.urandom(3 * CHUNK)
    head, parts = split(enc(data))
    edited = bytearray(head)
    edited[40:48] = (2 * CHUNK).to_bytes(8, "big")
    with pytest.raises(WrongKeyError):
        dec(redigest(bytes(edited)) + parts[0] + parts[1])


def test_truncation_anywhere_is_rejected_as_truncated() -> None:
    data = os.urandom(3 * CHUNK + 10)
    blob = enc(data)
    head, parts = split(blob)
    boundaries = {len(head) + sum(len(p) for p in parts[:k]) for k in range(len(parts))}
    assert len(boundaries) == 4
    with pytest.raises(NotAContainerError):
        dec(b"")
    for cut in range(1, len(blob)):
        with pytest.raises(TruncatedError) as info:
            dec(blob[:cut])
        if cut in boundaries:
            body = cut - len(head)
            assert str(info.value) == crypto.ERR_TRUNCATED.format(file=MEM, got=body, expected=len(blob) - len(head))
        elif cut < len(head):
            assert str(info.value) == crypto.ERR_HEADER_TRUNCATED.format(file=MEM, got=cut)


def test_removed_duplicated_swapped_chunks_are_rejected() -> None:
    data = os.urandom(3 * CHUNK + 10)  # chunks of 64, 64, 64, 10 bytes
    head, p = split(enc(data))
    cases: dict[str, tuple[list[bytes], type[ContainerError], int | None]] = {
        "first removed": ([p[1], p[2], p[3]], TruncatedError, None),
        "middle removed": ([p[0], p[2], p[3]], TruncatedError, None),
        "last removed": ([p[0], p[1], p[2]], TruncatedError, None),
        "duplicated": ([p[0], p[0], p[1], p[2], p[3]], CorruptedChunkError, None),
        "duplicated over": ([p[0], p[0], p[2], p[3]], CorruptedChunkError, 1),
        "swapped": ([p[1], p[0], p[2], p[3]], CorruptedChunkError, 0),
        "last two swapped": ([p[0], p[1], p[3], p[2]], CorruptedChunkError, 2),
        "reversed": (p[::-1], CorruptedChunkError, 0),
    }
    for name, (seq, error, index) in cases.items():
        with pytest.raises(error) as info:
            dec(head + b"".join(seq))
        if error is CorruptedChunkError:
            assert info.value.chunk_index == index, name


def test_chunk_spliced_from_another_file_with_the_same_key_is_rejected() -> None:
    head_a, a = split(enc(os.urandom(3 * CHUNK)))
    head_b, b = split(enc(os.urandom(3 * CHUNK)))
    for k in range(3):
        spliced = [*a[:k], b[k], *a[k + 1:]]
        with pytest.raises(CorruptedChunkError) as info:
            dec(head_a + b"".join(spliced))
        assert info.value.chunk_index == k
        assert str(info.value) == crypto.ERR_CORRUPT.format(file=MEM, index=k)
    with pytest.raises(CorruptedChunkError):  # B's header on A's chunks
        dec(head_b + b"".join(a))


def test_trailing_bytes_are_rejected() -> None:
    blob = enc(b"abc")
    with pytest.raises(CorruptedChunkError) as info:
        dec(blob + b"\x00")
    assert str(info.value) == crypto.ERR_TRAILING.format(file=MEM, extra=1)
    assert info.value.chunk_index is None


def test_not_a_container_and_unsupported_version_messages() -> None:
    with pytest.raises(NotAContainerError) as info:
        dec(b"text,label\nhello,1\n")
    assert str(info.value) == crypto.ERR_NOT_CONTAINER.format(file=MEM)
    blob = bytearray(enc(b"abc"))
    blob[8:10] = (2).to_bytes(2, "big")
    with pytest.raises(UnsupportedVersionError) as info:
        dec(bytes(blob))
    assert str(info.value) == crypto.ERR_VERSION.format(file=MEM, version=2, supported=1)
    with pytest.raises(UnsupportedVersionError):  # even when cut short right after the version
        dec(bytes(blob[:12]))


def test_header_field_checks_name_the_problem() -> None:
    head, parts = split(enc(b"abc"))
    bad = bytearray(head)
    bad[10] = 7  # unknown KDF id
    with pytest.raises(CorruptedHeaderError) as info:
        dec(redigest(bytes(bad)) + b"".join(parts))
    assert str(info.value) == crypto.ERR_HEADER_FIELD.format(file=MEM, reason="unknown KDF id 7")
    bad = bytearray(enc(b"abc", key=PW)[: len(head)])
    bad[11] = 31  # scrypt N = 2**31: a header must not make readers allocate terabytes
    with pytest.raises(CorruptedHeaderError, match="scrypt parameters out of range"):
        dec(redigest(bytes(bad)) + b"".join(parts), key=PW)
    with pytest.raises(CorruptedHeaderError) as info:
        dec(head[:-1] + bytes([head[-1] ^ 1]) + b"".join(parts))
    assert str(info.value) == crypto.ERR_HEADER_DIGEST.format(file=MEM)


# ------------------------------------------------------------------------------------------ keys


def test_wrong_key_and_wrong_passphrase_are_reported_as_such() -> None:
    with pytest.raises(WrongKeyError) as info:
        dec(enc(b"x" * 200), key=OTHER_KEY)
    assert str(info.value) == crypto.ERR_WRONG_KEY.format(file=MEM)
    wrong_pw = KeySource(passphrase=b"Tr0ub4dor&3", scrypt_params=FAST_SCRYPT)
    with pytest.raises(WrongKeyError) as info:
        dec(enc(b"x" * 200, key=PW), key=wrong_pw)
    assert str(info.value) == crypto.ERR_WRONG_PASSPHRASE.format(file=MEM)


def test_wrong_kind_of_key_is_a_wrong_key_error() -> None:
    with pytest.raises(WrongKeyError) as info:
        dec(enc(b"abc"), key=PW)
    assert str(info.value) == crypto.ERR_KDF_MISMATCH.format(file=MEM, need="key file", got="passphrase")
    with pytest.raises(WrongKeyError) as info:
        dec(enc(b"abc", key=PW), key=KEY)
    assert str(info.value) == crypto.ERR_KDF_MISMATCH.format(file=MEM, need="passphrase", got="key file")


def test_decryption_uses_the_scrypt_parameters_in_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FP_PASS", PASSPHRASE.decode())
    blob = enc(b"rows", key=KeySource.from_passphrase_env("FP_PASS", scrypt_params=(5, 4, 2)))
    assert crypto.inspect(blob)["kdf_params"] == {"n": 32, "r": 4, "p": 2}
    assert dec(blob, key=KeySource.from_passphrase_env("FP_PASS")) == b"rows"  # default params ignored


def test_passphrase_env_unset_or_empty_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FP_NOPE", raising=False)
    monkeypatch.setenv("FP_EMPTY", "")
    for var in ("FP_NOPE", "FP_EMPTY"):
        with pytest.raises(KeySourceError) as info:
            KeySource.from_passphrase_env(var)
        assert str(info.value) == crypto.ERR_PASSPHRASE_ENV.format(var=var)


def test_key_source_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        KeySource()
    with pytest.raises(ValueError, match="exactly one"):
        KeySource(key=RAW_KEY, passphrase=b"x")
    with pytest.raises(ValueError, match="32 bytes"):
        KeySource(key=b"short")
    with pytest.raises(ValueError, match=r"scrypt_params .* got \(31, 8, 1\)"):
        KeySource(passphrase=b"x", scrypt_params=(31, 8, 1))
    with pytest.raises(ValueError, match="chunk_size must be in"):
        crypto.encrypt_bytes(b"x", key_source=KEY, chunk_size=0)


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_key_file_is_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old_umask = os.umask(umask)
    try:
        crypto.write_key_file(tmp_path / "site.key", crypto.generate_key())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "site.key").stat().st_mode) == 0o600


def test_key_file_refuses_overwrite_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    key = crypto.generate_key()
    crypto.write_key_file(path, key)
    assert len(key) == 32 and crypto.read_key_file(path) == key
    assert path.read_text().splitlines() == [crypto.KEY_FILE_LABEL, base64.b64encode(key).decode()]
    before = path.read_bytes()
    with pytest.raises(KeySourceError) as info:
        crypto.write_key_file(path, crypto.generate_key())
    assert str(info.value) == crypto.ERR_KEY_EXISTS.format(file=path)
    assert path.read_bytes() == before
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "elsewhere.key")  # dangling: O_EXCL must not follow it
    with pytest.raises(KeySourceError):
        crypto.write_key_file(link, key)
    assert not (tmp_path / "elsewhere.key").exists()


@pytest.mark.parametrize("content", [
    b"hello\n",
    b"",
    f"{crypto.KEY_FILE_LABEL}\n{base64.b64encode(b'x' * 31).decode()}\n".encode(),
    f"{crypto.KEY_FILE_LABEL}\nnot base64!\n".encode(),
    f"other-label\n{base64.b64encode(b'x' * 32).decode()}\n".encode(),
    b"\xff\xfe binary",
])
def test_read_key_file_rejects_anything_but_a_key_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeySourceError) as info:
        crypto.read_key_file(path)
    assert str(info.value) == crypto.ERR_KEY_FILE.format(file=path, label=crypto.KEY_FILE_LABEL)


@pytest.mark.parametrize("mode", [0o644, 0o666, 0o640, 0o604, 0o620])
def test_key_file_accessible_to_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = crypto.write_key_file(tmp_path / "site.key", crypto.generate_key())
    path.chmod(mode)
    with pytest.raises(KeySourceError) as info:
        KeySource.from_key_file(path)
    assert str(info.value) == crypto.ERR_KEY_FILE_MODE.format(file=path, mode=mode)
    assert f"chmod 600 {path}" in str(info.value)
    path.chmod(0o600)
    assert KeySource.from_key_file(path).key_file == path
    path.chmod(0o400)  # read-only for the owner is fine
    assert len(crypto.read_key_file(path)) == 32


def test_missing_key_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(KeySourceError) as info:
        KeySource.from_key_file(tmp_path / "nope.key")
    assert str(info.value) == crypto.ERR_KEY_FILE_UNREADABLE.format(file=tmp_path / "nope.key",
                                                                    reason="No such file or directory")


def test_key_material_never_in_messages_or_reprs(tmp_path: Path) -> None:
    secrets = [RAW_KEY, PASSPHRASE, b"\x01" * 32]
    forms = {s.hex() for s in secrets} | {base64.b64encode(s).decode() for s in secrets} | {PASSPHRASE.decode()}
    blob, pw_blob = enc(b"abc"), enc(b"abc", key=PW)
    texts = [repr(KEY), repr(PW), str(KEY), str(PW)]
    for source, data in ((OTHER_KEY, blob), (PW, blob), (KEY, pw_blob),
                         (KeySource(passphrase=b"nope", scrypt_params=FAST_SCRYPT), pw_blob),
                         (KEY, blob[:-1]), (KEY, blob[:-1] + b"\x00")):
        with pytest.raises(ContainerError) as info:
            dec(data, key=source)
        texts += [str(info.value), repr(info.value)]
    key_file = tmp_path / "k"
    crypto.write_key_file(key_file, RAW_KEY)
    with pytest.raises(KeySourceError) as info:
        crypto.write_key_file(key_file, RAW_KEY)
    texts.append(str(info.value))
    assert not any(f in t for f in forms for t in texts), texts


# ------------------------------------------------------------------------------------------ files


def test_encrypt_file_records_only_the_suffix_and_inspect_needs_no_key(tmp_path: Path) -> None:
    src = tmp_path / "hiv_patients_2024.jsonl"
    src.write_bytes(os.urandom(5000))
    out = tmp_path / "data.fpenc"
    crypto.encrypt_file(src, out, key_source=KEY, chunk_size=1024)
    assert b"hiv_patients" not in out.read_bytes()
    info = crypto.inspect(out)
    assert info["inner_name"] == "data.jsonl" and info["chunk_count"] == 5 and info["plaintext_size"] == 5000
    assert info["kdf"] == "key-file" and info["version"] == crypto.FORMAT_VERSION and info["chunk_size"] == 1024
    assert info["size_matches_header"] is True and info["file_size"] == out.stat().st_size
    assert len(bytes.fromhex(str(info["file_id"]))) == 16
    assert crypto.is_container(out) and not crypto.is_container(src) and not crypto.is_container(tmp_path / "x")
    assert bytes(crypto.decrypt_to_memory(out, key_source=KEY)) == src.read_bytes()
    crypto.encrypt_file(src, out, key_source=PW, inner_name="")  # explicit hint; replaces atomically
    assert crypto.inspect(out)["inner_name"] == "" and crypto.inspect(out)["kdf_params"] == {"n": 16, "r": 8, "p": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.fpenc", src.name]  # no temp files left


def test_encrypt_file_refuses_inputs_of_unknown_size(tmp_path: Path) -> None:
    with pytest.raises(crypto.InputChangedError) as info:
        crypto.encrypt_file("/dev/null", tmp_path / "out", key_source=KEY)
    assert str(info.value) == crypto.ERR_IN_NOT_FILE.format(inp="/dev/null", kind="a character device",
                                                            expected=crypto.EXPECT_PLAINTEXT)
    status = Path("/proc/self/status")  # a regular file whose stat size (0) is not its length
    if status.exists():
        with pytest.raises(crypto.InputChangedError) as info:
            crypto.encrypt_file(status, tmp_path / "out", key_source=KEY)
        assert str(info.value) == crypto.ERR_INPUT_CHANGED.format(file=status)
    assert list(tmp_path.iterdir()) == []


def test_decrypt_file_writes_0600_or_stdout(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    data = os.urandom(3000)
    (tmp_path / "c").write_bytes(enc(data))
    crypto.decrypt_file(tmp_path / "c", tmp_path / "back.csv", key_source=KEY)
    assert (tmp_path / "back.csv").read_bytes() == data
    assert stat.S_IMODE((tmp_path / "back.csv").stat().st_mode) == 0o600
    crypto.decrypt_file(tmp_path / "c", "-", key_source=KEY)
    assert capsysbinary.readouterr().out == data


@pytest.mark.parametrize("damage", ["flip-last-byte", "truncate", "wrong-key"])
def test_failed_decrypt_writes_nothing(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes],
                                       damage: str) -> None:
    blob = bytearray(enc(os.urandom(300)))
    key = KEY
    if damage == "flip-last-byte":
        blob[-1] ^= 1
    elif damage == "truncate":
        del blob[-20:]
    else:
        key = OTHER_KEY
    bad = tmp_path / "bad.fpenc"
    bad.write_bytes(bytes(blob))
    for out in (tmp_path / "out.csv", "-"):
        with pytest.raises(ContainerError):
            crypto.decrypt_file(bad, out, key_source=key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fpenc"]
    assert capsysbinary.readouterr().out == b""


def test_failed_decrypt_zeroes_what_it_had_decrypted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks 0-2 verify and chunk 3 fails: the buffer that held their plaintext is wiped, not just dropped."""
    buffers: list[bytearray] = []

    class Recorded(bytearray):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)
            buffers.append(self)

    data = b"\xab" * (4 * CHUNK)
    blob = bytearray(enc(data))
    blob[-1] ^= 1
    monkeypatch.setattr(crypto, "bytearray", Recorded, raising=False)
    with pytest.raises(CorruptedChunkError):
        dec(bytes(blob))
    result = [b for b in buffers if len(b) == len(data)]
    assert len(result) == 1 and result[0] == bytes(len(data))


def test_rekey_keeps_plaintext_chunking_and_name_changes_file_id(tmp_path: Path) -> None:
    src = tmp_path / "a.fpenc"
    src.write_bytes(enc(b"rows" * 50, chunk=32, name="data.tsv"))
    crypto.rekey_file(src, tmp_path / "b.fpenc", old_key_source=KEY, new_key_source=PW)
    a, b = crypto.inspect(src), crypto.inspect(tmp_path / "b.fpenc")
    assert (b["chunk_size"], b["inner_name"], b["kdf"]) == (32, "data.tsv", "scrypt")
    assert b["file_id"] != a["file_id"]
    assert bytes(crypto.decrypt_to_memory(tmp_path / "b.fpenc", key_source=PW)) == b"rows" * 50
    with pytest.raises(WrongKeyError):
        crypto.decrypt_to_memory(tmp_path / "b.fpenc", key_source=KEY)
    crypto.rekey_file(tmp_path / "b.fpenc", tmp_path / "b.fpenc", old_key_source=PW, new_key_source=OTHER_KEY)
    assert bytes(crypto.decrypt_to_memory(tmp_path / "b.fpenc", key_source=OTHER_KEY)) == b"rows" * 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.fpenc", "b.fpenc"]  # no plaintext, no temp files
    with pytest.raises(WrongKeyError):  # a failed rekey writes nothing
        crypto.rekey_file(src, tmp_path / "c.fpenc", old_key_source=OTHER_KEY, new_key_source=KEY)
    assert not (tmp_path / "c.fpenc").exists()


def test_decrypt_to_memory_peak_is_plaintext_plus_a_chunk(tmp_path: Path) -> None:
    size, chunk = 4 << 20, 64 << 10
    path = tmp_path / "big.fpenc"
    crypto.encrypt_file(_write(tmp_path / "big.csv", os.urandom(size)), path, key_source=KEY, chunk_size=chunk)
    tracemalloc.start()
    try:
        out = crypto.decrypt_to_memory(path, key_source=KEY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(out, bytearray) and len(out) == size
    assert peak <= 1.5 * size, peak / size
    assert peak <= size + 4 * chunk, peak / size  # tighter: the design is plaintext + O(chunk)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------ independent decryptor


def independent_decrypt(blob: bytes, *, key: bytes | None = None,
                        passphrase: bytes | None = None) -> tuple[str, bytes]:
    """(inner name, plaintext), by a decryptor written from docs/container-format.md alone: stdlib hashlib and
    hmac, cryptography's AESGCM and Scrypt; HKDF is spelled out from RFC 5869 rather than imported."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    def mac(k: bytes, m: bytes) -> bytes:
        return hmac.new(k, m, hashlib.sha256).digest()

    if blob[:8] != b"FPRIVDS\x00":
        raise ValueError("not a container")
    (version,) = struct.unpack(">H", blob[8:10])
    if version != 1:
        raise ValueError("version")
    kdf, log2_n, r, p = struct.unpack(">BBII", blob[10:20])
    salt = blob[20:36]
    chunk_size, size = struct.unpack(">IQ", blob[36:48])
    inner_name = blob[48:88].rstrip(b"\x00").decode("utf-8")
    body, header = blob[:88], blob[:128]
    if len(header) != 128 or hashlib.sha256(header[:120]).digest()[:8] != header[120:]:
        raise ValueError("header digest")
    if kdf == 1:
        master = key
    elif kdf == 2:
        master = Scrypt(salt=salt, length=32, n=2**log2_n, r=r, p=p).derive(passphrase)
    else:
        raise ValueError("kdf")
    info = b"fedpriv container v1"
    prk = mac(salt, master)
    t1 = mac(prk, info + b"\x01")
    t2 = mac(prk, t1 + info + b"\x02")
    enc_key, check_key = t1, t2
    if not hmac.compare_digest(mac(check_key, b"fedpriv key check\x00" + body), blob[88:120]):
        raise ValueError("wrong key")
    n = max(1, -(-size // chunk_size))
    if len(blob) != len(header) + size + 16 * n:
        raise ValueError("size")
    aead, out, pos = AESGCM(enc_key), bytearray(), len(header)
    for i in range(n):
        length = min(chunk_size, size - i * chunk_size) + 16
        aad = header + struct.pack(">Q", i) + (b"\x01" if i == n - 1 else b"\x00")
        out += aead.decrypt(bytes(4) + struct.pack(">Q", i), blob[pos: pos + length], aad)
        pos += length
    return inner_name, bytes(out)


def test_independent_decryptor_reads_cli_made_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpriv.cli import main

    data = os.urandom(2 * (1 << 20) + 17)  # three default-size chunks, the last one short
    (tmp_path / "in.csv").write_bytes(data)
    assert main(["dataset", "keygen", str(tmp_path / "k")]) == 0
    assert main(["dataset", "encrypt", str(tmp_path / "in.csv"), str(tmp_path / "k.fpenc"),
                 "--key-file", str(tmp_path / "k")]) == 0
    key = crypto.read_key_file(tmp_path / "k")
    assert independent_decrypt((tmp_path / "k.fpenc").read_bytes(), key=key) == ("data.csv", data)
    monkeypatch.setenv("FP_PASS", "pässwörd")  # non-ASCII: the spec says UTF-8 bytes
    assert main(["dataset", "encrypt", str(tmp_path / "in.csv"), str(tmp_path / "p.fpenc"),
                 "--passphrase-env", "FP_PASS", "--chunk-size", "1000000"]) == 0
    blob = (tmp_path / "p.fpenc").read_bytes()
    assert crypto.inspect(blob)["kdf_params"] == {"n": 2**15, "r": 8, "p": 1}  # the documented default
    assert independent_decrypt(blob, passphrase="pässwörd".encode()) == ("data.csv", data)
    with pytest.raises(ValueError, match="wrong key"):
        independent_decrypt(blob, passphrase=b"other")


def test_independent_decryptor_agrees_on_edge_sizes_and_rejects_tampering() -> None:
    from cryptography.exceptions import InvalidTag

    for size in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK):
        data = os.urandom(size)
        assert independent_decrypt(enc(data), key=RAW_KEY) == ("data.csv", data)
        assert independent_decrypt(enc(data, key=PW, name="data.parquet"), passphrase=PASSPHRASE) == (
            "data.parquet", data)
    assert independent_decrypt(enc(b"x", name=""), key=RAW_KEY) == ("", b"x")
    head, parts = split(enc(os.urandom(3 * CHUNK)))
    with pytest.raises(InvalidTag):
        independent_decrypt(head + parts[1] + parts[0] + parts[2], key=RAW_KEY)
