"""The encrypted container: round trips, tamper detection, wrong keys, an independent decryptor from the spec."""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import crypto
from common.crypto import (
    CorruptedChunkError,
    KeySource,
    NotAContainerError,
    TruncatedError,
    UnsupportedVersionError,
    WrongKeyError,
)

CHUNK = 64
KEY = KeySource(key=bytes(range(32)))
FAST_SCRYPT = (4, 8, 1)  # cheap parameters for tests only


def enc(data: bytes, *, key: KeySource = KEY, chunk: int = CHUNK) -> bytes:
    return crypto.encrypt_bytes(data, key_source=key, chunk_size=chunk, inner_name="data.csv")


def header_len(blob: bytes) -> int:
    name_len = struct.unpack(">H", blob[48:50])[0]
    return 50 + name_len + 32


def chunks_of(blob: bytes, plaintext_size: int, chunk: int = CHUNK) -> tuple[bytes, list[bytes]]:
    h = header_len(blob)
    n = max(1, math.ceil(plaintext_size / chunk))
    parts, pos = [], h
    for i in range(n):
        size = min(chunk, plaintext_size - i * chunk) + 16
        parts.append(blob[pos: pos + size])
        pos += size
    return blob[:h], parts


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 7])
def test_round_trip_at_chunk_boundaries(size: int) -> None:
    data = os.urandom(size)
    assert bytes(crypto.decrypt_to_memory(enc(data), key_source=KEY)) == data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=0, max_size=700), chunk=st.integers(min_value=1, max_value=200))
def test_round_trip_property(data: bytes, chunk: int) -> None:
    assert bytes(crypto.decrypt_to_memory(enc(data, chunk=chunk), key_source=KEY)) == data


def test_passphrase_round_trip_and_wrong_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FP_PASS", "correct horse")
    src = KeySource.from_passphrase_env("FP_PASS", scrypt_params=FAST_SCRYPT)
    blob = enc(b"secret rows", key=src)
    assert bytes(crypto.decrypt_to_memory(blob, key_source=src)) == b"secret rows"
    monkeypatch.setenv("FP_PASS", "wrong")
    with pytest.raises(WrongKeyError, match="wrong passphrase"):
        crypto.decrypt_to_memory(blob, key_source=KeySource.from_passphrase_env("FP_PASS"))


def test_wrong_key_is_reported_as_wrong_key_not_corruption() -> None:
    blob = enc(b"x" * 200)
    with pytest.raises(WrongKeyError, match="wrong key"):
        crypto.decrypt_to_memory(blob, key_source=KeySource(key=b"\x01" * 32))


def test_every_single_byte_flip_is_rejected() -> None:
    data = os.urandom(150)
    blob = enc(data)
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= bit
            with pytest.raises(crypto.ContainerError):
                crypto.decrypt_to_memory(bytes(bad), key_source=KEY)


def test_truncation_at_every_chunk_boundary_and_inside_is_rejected() -> None:
    data = os.urandom(4 * CHUNK)
    blob = enc(data)
    head, parts = chunks_of(blob, len(data))
    cut_points = [len(head) + sum(len(p) for p in parts[:k]) for k in range(len(parts))] + [len(blob) - 1, 3]
    for cut in cut_points:
        with pytest.raises((TruncatedError, NotAContainerError)):
            crypto.decrypt_to_memory(blob[:cut], key_source=KEY)


def test_removed_duplicated_swapped_chunks_are_rejected() -> None:
    data = os.urandom(4 * CHUNK)
    head, parts = chunks_of(enc(data), len(data))
    variants = {
        "removed": [parts[0], parts[2], parts[3]],
        "duplicated": [parts[0], parts[0], parts[1], parts[2], parts[3]],
        "swapped": [parts[1], parts[0], parts[2], parts[3]],
        "last-two-swapped": [parts[0], parts[1], parts[3], parts[2]],
    }
    for name, seq in variants.items():
        with pytest.raises(crypto.ContainerError):
            crypto.decrypt_to_memory(head + b"".join(seq), key_source=KEY)
        assert name


def test_chunk_spliced_from_another_file_with_same_key_is_rejected() -> None:
    data_a, data_b = os.urandom(3 * CHUNK), os.urandom(3 * CHUNK)
    head_a, parts_a = chunks_of(enc(data_a), len(data_a))
    _, parts_b = chunks_of(enc(data_b), len(data_b))
    with pytest.raises(CorruptedChunkError) as info:
        crypto.decrypt_to_memory(head_a + parts_a[0] + parts_b[1] + parts_a[2], key_source=KEY)
    assert info.value.chunk_index == 1
    assert "corrupted at chunk 1" in str(info.value)


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(CorruptedChunkError, match="unexpected bytes"):
        crypto.decrypt_to_memory(enc(b"abc") + b"\x00", key_source=KEY)


def test_not_a_container_and_unsupported_version() -> None:
    with pytest.raises(NotAContainerError, match="not a fedpriv container"):
        crypto.decrypt_to_memory(b"text,label\nhello,1\n", key_source=KEY)
    blob = bytearray(enc(b"abc"))
    blob[8:10] = (2).to_bytes(2, "big")
    with pytest.raises(UnsupportedVersionError, match="unsupported container version 2"):
        crypto.decrypt_to_memory(bytes(blob), key_source=KEY)


def test_key_file_is_0600_refuses_overwrite_and_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "k"
    crypto.write_key_file(path, crypto.generate_key())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(crypto.KeyFileError, match="refusing to overwrite"):
        crypto.write_key_file(path, crypto.generate_key())
    bad = tmp_path / "bad"
    bad.write_text("hello\n")
    with pytest.raises(crypto.KeyFileError, match="not a fedpriv key file"):
        crypto.read_key_file(bad)


def test_file_encrypt_decrypt_and_inspect_without_key(tmp_path: Path) -> None:
    src = tmp_path / "data.jsonl"
    src.write_bytes(os.urandom(5000))
    out = tmp_path / "data.fpenc"
    crypto.encrypt_file(src, out, key_source=KEY, chunk_size=1024)
    info = crypto.inspect(out)
    assert info["inner_name"] == "data.jsonl" and info["chunks"] == 5 and info["plaintext_size"] == 5000
    assert info["size_matches_header"] is True
    crypto.decrypt_file(out, tmp_path / "back", key_source=KEY)
    assert (tmp_path / "back").read_bytes() == src.read_bytes()


def test_failed_decrypt_writes_nothing(tmp_path: Path) -> None:
    blob = bytearray(enc(os.urandom(300)))
    blob[-1] ^= 1
    bad = tmp_path / "bad.fpenc"
    bad.write_bytes(bytes(blob))
    with pytest.raises(CorruptedChunkError):
        crypto.decrypt_file(bad, tmp_path / "out.csv", key_source=KEY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fpenc"]


def test_rekey_keeps_plaintext_and_old_key_no_longer_works(tmp_path: Path) -> None:
    src = tmp_path / "a.enc"
    src.write_bytes(enc(b"rows" * 50))
    new = KeySource(key=b"\x07" * 32)
    crypto.rekey_file(src, tmp_path / "b.enc", old_key_source=KEY, new_key_source=new)
    assert bytes(crypto.decrypt_to_memory(tmp_path / "b.enc", key_source=new)) == b"rows" * 50
    with pytest.raises(WrongKeyError):
        crypto.decrypt_to_memory(tmp_path / "b.enc", key_source=KEY)


def independent_decrypt(blob: bytes, *, key: bytes | None = None, passphrase: bytes | None = None) -> bytes:
    """A decryptor written from docs/container-format.md using only cryptography's primitives."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    assert blob[:8] == b"FPRIVDS\x00"
    version, kdf, log2_n, r, p = struct.unpack(">HBBII", blob[8:20])
    salt = blob[20:36]
    chunk_size, size, name_len = struct.unpack(">IQH", blob[36:50])
    body_end = 50 + name_len
    header = blob[: body_end + 32]
    assert version == 1
    master = key if kdf == 1 else Scrypt(salt=salt, length=32, n=2**log2_n, r=r, p=p).derive(passphrase)
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=b"fedpriv container v1").derive(master)
    check = hmac.new(okm[32:], b"fedpriv key check\x00" + blob[:body_end], hashlib.sha256).digest()
    assert hmac.compare_digest(check, blob[body_end: body_end + 32]), "wrong key"
    n = max(1, -(-size // chunk_size))
    out, pos = b"", len(header)
    for i in range(n):
        length = min(chunk_size, size - i * chunk_size) + 16
        aad = header + i.to_bytes(8, "big") + (b"\x01" if i == n - 1 else b"\x00")
        out += AESGCM(okm[:32]).decrypt(b"\x00" * 4 + i.to_bytes(8, "big"), blob[pos: pos + length], aad)
        pos += length
    assert pos == len(blob)
    return out


def test_independent_decryptor_reads_a_cli_made_file(tmp_path: Path) -> None:
    from fedpriv.cli import main

    data = os.urandom(3 * 1024 * 1024 + 17)  # several default-size chunks
    (tmp_path / "in.csv").write_bytes(data)
    assert main(["dataset", "keygen", str(tmp_path / "k")]) == 0
    assert main(["dataset", "encrypt", str(tmp_path / "in.csv"), str(tmp_path / "out.enc"),
                 "--key-file", str(tmp_path / "k")]) == 0
    key = crypto.read_key_file(tmp_path / "k")
    assert independent_decrypt((tmp_path / "out.enc").read_bytes(), key=key) == data


def test_independent_decryptor_reads_a_passphrase_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FP_PASS", "pw")
    src = KeySource.from_passphrase_env("FP_PASS", scrypt_params=FAST_SCRYPT)
    assert independent_decrypt(enc(b"hello" * 40, key=src), passphrase=b"pw") == b"hello" * 40


def test_key_material_never_in_error_messages() -> None:
    key = b"\xaa" * 32
    blob = enc(b"abc", key=KeySource(key=key))
    with pytest.raises(WrongKeyError) as info:
        crypto.decrypt_to_memory(blob, key_source=KEY)
    text = str(info.value) + repr(KEY)
    assert key.hex() not in text and bytes(range(32)).hex() not in text and "key=" not in repr(KEY).split("(")[1][:4]
