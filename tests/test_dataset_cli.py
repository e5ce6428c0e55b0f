"""`fedpriv dataset`: every error is one clear line and a non-zero exit; nothing partial is written."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedpriv.cli import main


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    plain = tmp_path / "notes.csv"
    plain.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(2000)))
    key = tmp_path / "site.key"
    assert main(["dataset", "keygen", str(key)]) == 0
    enc = tmp_path / "notes.fpenc"
    assert main(["dataset", "encrypt", str(plain), str(enc), "--key-file", str(key)]) == 0
    return {"plain": plain, "key": key, "enc": enc, "dir": tmp_path}


def _err(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_round_trip_to_stdout_and_file(files, capsys) -> None:
    capsys.readouterr()
    assert main(["dataset", "decrypt", str(files["enc"]), "-", "--key-file", str(files["key"])]) == 0
    assert capsys.readouterr().out == files["plain"].read_text()
    out = files["dir"] / "back.csv"
    assert main(["dataset", "decrypt", str(files["enc"]), str(out), "--key-file", str(files["key"])]) == 0
    assert out.read_bytes() == files["plain"].read_bytes() and stat.S_IMODE(out.stat().st_mode) == 0o600


def test_keygen_mode_and_refuses_overwrite(files, capsys) -> None:
    assert stat.S_IMODE(files["key"].stat().st_mode) == 0o600
    capsys.readouterr()
    assert main(["dataset", "keygen", str(files["key"])]) == 1
    assert _err(capsys) == [f"fedpriv dataset: {files['key']}: already exists; refusing to overwrite a key file"]


def test_wrong_key_wrong_passphrase(files, capsys, monkeypatch) -> None:
    other = files["dir"] / "other.key"
    main(["dataset", "keygen", str(other)])
    capsys.readouterr()
    assert main(["dataset", "decrypt", str(files["enc"]), "-", "--key-file", str(other)]) == 1
    assert _err(capsys) == [f"fedpriv dataset: {files['enc']}: wrong key (the key-check value does not match)"]
    monkeypatch.setenv("PW", "right")
    pw = files["dir"] / "pw.fpenc"
    assert main(["dataset", "rekey", str(files["enc"]), str(pw), "--key-file", str(files["key"]),
                 "--new-passphrase-env", "PW"]) == 0
    monkeypatch.setenv("PW", "wrong")
    capsys.readouterr()
    assert main(["dataset", "decrypt", str(pw), "-", "--passphrase-env", "PW"]) == 1
    assert _err(capsys) == [f"fedpriv dataset: {pw}: wrong passphrase (the key-check value does not match)"]


def test_corrupted_truncated_not_a_container_unsupported_version(files, capsys) -> None:
    blob = files["enc"].read_bytes()
    cases = {
        "flip.fpenc": (blob[:-40] + bytes([blob[-40] ^ 1]) + blob[-39:], "corrupted at chunk 0"),
        "cut.fpenc": (blob[:-100], "truncated"),
        "plain.fpenc": (b"text,label\nhello,1\n", "not a fedpriv container"),
        "v9.fpenc": (blob[:8] + (9).to_bytes(2, "big") + blob[10:], "unsupported container version 9"),
    }
    for name, (data, needle) in cases.items():
        path = files["dir"] / name
        path.write_bytes(data)
        out = files["dir"] / f"{name}.out"
        capsys.readouterr()
        assert main(["dataset", "decrypt", str(path), str(out), "--key-file", str(files["key"])]) == 1
        err = _err(capsys)
        assert len(err) == 1 and needle in err[0] and err[0].startswith("fedpriv dataset: "), err
        assert not out.exists()  # nothing partially decrypted is written


def test_inspect_needs_no_key(files, capsys) -> None:
    capsys.readouterr()
    assert main(["dataset", "inspect", str(files["enc"])]) == 0
    out = capsys.readouterr().out
    assert '"inner_name": "notes.csv"' in out and '"cipher": "AES-256-GCM"' in out
