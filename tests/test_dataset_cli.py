"""`fedpriv dataset`: round trips, key handling, and every error as exactly one line (asserted verbatim from
the message constants), a non-zero exit, and nothing written."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from common import crypto
from fedpriv import cmd_dataset
from fedpriv.cli import main

PASSWORD = "open sesame, twice"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    plain = tmp_path / "notes.csv"
    plain.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(2000)))
    key = tmp_path / "site.key"
    assert main(["dataset", "keygen", str(key)]) == 0
    enc = tmp_path / "notes.fpenc"
    assert main(["dataset", "encrypt", str(plain), str(enc), "--key-file", str(key), "--chunk-size", "4096"]) == 0
    return {"plain": plain, "key": key, "enc": enc, "dir": tmp_path}


def one_error(capsys: pytest.CaptureFixture[str], message: str) -> None:
    """Exactly one stderr line, the prefix plus ``message``; nothing on stdout."""
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [cmd_dataset.PREFIX + message]
    assert captured.out == ""


def test_round_trip_to_stdout_and_to_a_0600_file(files, capsysbinary) -> None:
    capsysbinary.readouterr()
    assert main(["dataset", "decrypt", str(files["enc"]), "-", "--key-file", str(files["key"])]) == 0
    assert capsysbinary.readouterr().out == files["plain"].read_bytes()
    out = files["dir"] / "back.csv"
    assert main(["dataset", "decrypt", str(files["enc"]), str(out), "--key-file", str(files["key"])]) == 0
    assert out.read_bytes() == files["plain"].read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert cmd_dataset.MSG_DECRYPTED.format(src=files["enc"], dst=out) in capsysbinary.readouterr().err.decode()


def test_passphrase_round_trip(files, capsysbinary, monkeypatch) -> None:
    monkeypatch.setenv("FP_PW", PASSWORD)
    enc = files["dir"] / "pw.fpenc"
    assert main(["dataset", "encrypt", str(files["plain"]), str(enc), "--passphrase-env", "FP_PW"]) == 0
    capsysbinary.readouterr()
    assert main(["dataset", "decrypt", str(enc), "-", "--passphrase-env", "FP_PW"]) == 0
    assert capsysbinary.readouterr().out == files["plain"].read_bytes()


def test_keygen_mode_0600_and_refuses_to_overwrite(files, capsys) -> None:
    key = files["key"]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(crypto.read_key_file(key)) == 32
    before = key.read_bytes()
    capsys.readouterr()
    assert main(["dataset", "keygen", str(key)]) == 1
    one_error(capsys, crypto.ERR_KEY_EXISTS.format(file=key))
    assert key.read_bytes() == before


def test_inspect_needs_no_key(files, capsys) -> None:
    capsys.readouterr()
    assert main(["dataset", "inspect", str(files["enc"])]) == 0
    info = json.loads(capsys.readouterr().out)
    size = files["plain"].stat().st_size
    assert info["inner_name"] == "data.csv" and info["cipher"] == "AES-256-GCM" and info["kdf"] == "key-file"
    assert info["chunk_size"] == 4096 and info["chunk_count"] == -(-size // 4096) and info["plaintext_size"] == size
    assert info["version"] == crypto.FORMAT_VERSION and info["size_matches_header"] is True


def test_rekey_key_to_passphrase_to_key_writes_no_plaintext(files, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FP_PW", PASSWORD)
    new_key = files["dir"] / "new.key"
    assert main(["dataset", "keygen", str(new_key)]) == 0
    pw = files["dir"] / "pw.fpenc"
    again = files["dir"] / "again.fpenc"
    before = set(files["dir"].iterdir())
    assert main(["dataset", "rekey", str(files["enc"]), str(pw), "--key-file", str(files["key"]),
                 "--new-passphrase-env", "FP_PW"]) == 0
    assert main(["dataset", "rekey", str(pw), str(again), "--passphrase-env", "FP_PW",
                 "--new-key-file", str(new_key)]) == 0
    assert set(files["dir"].iterdir()) - before == {pw, again}  # no plaintext or temp files
    data = crypto.decrypt_to_memory(again, key_source=crypto.KeySource.from_key_file(new_key))
    assert bytes(data) == files["plain"].read_bytes()
    assert crypto.inspect(again)["chunk_size"] == 4096
    capsys.readouterr()
    assert main(["dataset", "decrypt", str(again), "-", "--key-file", str(files["key"])]) == 1
    one_error(capsys, crypto.ERR_WRONG_KEY.format(file=again))


def _damaged(files: dict[str, Path]) -> dict[str, tuple[bytes, str]]:
    """File name -> (content, expected message) for every container error a decrypt can report."""
    blob = files["enc"].read_bytes()
    size = files["plain"].stat().st_size
    body = len(blob) - crypto.HEADER_SIZE
    v9 = blob[:8] + (9).to_bytes(2, "big") + blob[10:]
    cases = {
        "flip.fpenc": (blob[:200] + bytes([blob[200] ^ 1]) + blob[201:], crypto.ERR_CORRUPT, {"index": 0}),
        "flip-last.fpenc": (blob[:-1] + bytes([blob[-1] ^ 0x40]), crypto.ERR_CORRUPT,
                            {"index": -(-size // 4096) - 1}),
        "cut.fpenc": (blob[:-100], crypto.ERR_TRUNCATED, {"got": body - 100, "expected": body}),
        "cut-header.fpenc": (blob[:60], crypto.ERR_HEADER_TRUNCATED, {"got": 60}),
        "extra.fpenc": (blob + b"\n", crypto.ERR_TRAILING, {"extra": 1}),
        "plain.fpenc": (b"text,label\nhello,1\n", crypto.ERR_NOT_CONTAINER, {}),
        "empty.fpenc": (b"", crypto.ERR_NOT_CONTAINER, {}),
        "v9.fpenc": (v9, crypto.ERR_VERSION, {"version": 9, "supported": crypto.FORMAT_VERSION}),
        "header.fpenc": (blob[:30] + bytes([blob[30] ^ 1]) + blob[31:], crypto.ERR_HEADER_DIGEST, {}),
    }
    out = {}
    for name, (data, template, fields) in cases.items():
        path = files["dir"] / name
        path.write_bytes(data)
        out[name] = (data, template.format(file=path, **fields))
    return out


def test_every_container_error_is_one_line_and_writes_nothing(files, capsys) -> None:
    for name, (_, message) in _damaged(files).items():
        path = files["dir"] / name
        for out in (files["dir"] / f"{name}.out", "-"):
            capsys.readouterr()
            assert main(["dataset", "decrypt", str(path), str(out), "--key-file", str(files["key"])]) == 1, name
            one_error(capsys, message)
            assert out == "-" or not Path(out).exists()


def test_inspect_reports_header_errors_too(files, capsys) -> None:
    damaged = _damaged(files)
    for name in ("plain.fpenc", "v9.fpenc", "header.fpenc", "cut-header.fpenc"):
        capsys.readouterr()
        assert main(["dataset", "inspect", str(files["dir"] / name)]) == 1
        one_error(capsys, damaged[name][1])


def test_wrong_key_wrong_passphrase_wrong_kind(files, capsys, monkeypatch) -> None:
    other = files["dir"] / "other.key"
    assert main(["dataset", "keygen", str(other)]) == 0
    capsys.readouterr()
    assert main(["dataset", "decrypt", str(files["enc"]), "-", "--key-file", str(other)]) == 1
    one_error(capsys, crypto.ERR_WRONG_KEY.format(file=files["enc"]))

    monkeypatch.setenv("FP_PW", PASSWORD)
    pw = files["dir"] / "pw.fpenc"
    assert main(["dataset", "encrypt", str(files["plain"]), str(pw), "--passphrase-env", "FP_PW"]) == 0
    monkeypatch.setenv("FP_PW", "not it")
    capsys.readouterr()
    assert main(["dataset", "decrypt", str(pw), str(files["dir"] / "o"), "--passphrase-env", "FP_PW"]) == 1
    one_error(capsys, crypto.ERR_WRONG_PASSPHRASE.format(file=pw))
    assert main(["dataset", "decrypt", str(pw), "-", "--key-file", str(files["key"])]) == 1
    one_error(capsys, crypto.ERR_KDF_MISMATCH.format(file=pw, need="passphrase", got="key file"))
    assert main(["dataset", "decrypt", str(files["enc"]), "-", "--passphrase-env", "FP_PW"]) == 1
    one_error(capsys, crypto.ERR_KDF_MISMATCH.format(file=files["enc"], need="key file", got="passphrase"))
    assert not (files["dir"] / "o").exists()


def test_key_source_errors(files, capsys, monkeypatch) -> None:
    monkeypatch.delenv("FP_UNSET", raising=False)
    bad_key = files["dir"] / "bad.key"
    bad_key.write_text("not a key\n")
    bad_key.chmod(0o600)
    missing = files["dir"] / "missing.key"
    enc, plain, out = str(files["enc"]), str(files["plain"]), str(files["dir"] / "out")
    cases = [
        (["decrypt", enc, out, "--key-file", str(bad_key)],
         crypto.ERR_KEY_FILE.format(file=bad_key, label=crypto.KEY_FILE_LABEL)),
        (["decrypt", enc, out, "--key-file", str(missing)],
         crypto.ERR_KEY_FILE_UNREADABLE.format(file=missing, reason="No such file or directory")),
        (["decrypt", enc, out, "--passphrase-env", "FP_UNSET"], crypto.ERR_PASSPHRASE_ENV.format(var="FP_UNSET")),
        (["encrypt", plain, out, "--passphrase-env", "FP_UNSET"], crypto.ERR_PASSPHRASE_ENV.format(var="FP_UNSET")),
        (["rekey", enc, out, "--key-file", str(files["key"]), "--new-passphrase-env", "FP_UNSET"],
         crypto.ERR_PASSPHRASE_ENV.format(var="FP_UNSET")),
        (["rekey", enc, out, "--key-file", str(files["key"]), "--new-key-file", str(bad_key)],
         crypto.ERR_KEY_FILE.format(file=bad_key, label=crypto.KEY_FILE_LABEL)),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(["dataset", *argv]) == 1, argv
        one_error(capsys, message)
        assert not Path(out).exists()


def test_encrypt_errors(files, capsys) -> None:
    key = str(files["key"])
    missing = files["dir"] / "missing.csv"
    out = files["dir"] / "out.fpenc"
    cases = [
        (["encrypt", str(files["enc"]), str(out), "--key-file", key],
         cmd_dataset.ERR_ALREADY_CONTAINER.format(file=files["enc"])),
        (["encrypt", str(missing), str(out), "--key-file", key], cmd_dataset.ERR_NO_SUCH_FILE.format(file=missing)),
        (["encrypt", "/dev/null", str(out), "--key-file", key],
         crypto.ERR_IN_NOT_FILE.format(inp="/dev/null", kind="a character device", expected=crypto.EXPECT_PLAINTEXT)),
        (["decrypt", str(missing), str(out), "--key-file", key], cmd_dataset.ERR_NO_SUCH_FILE.format(file=missing)),
        (["inspect", str(missing)], cmd_dataset.ERR_NO_SUCH_FILE.format(file=missing)),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(["dataset", *argv]) == 1, argv
        one_error(capsys, message)
        assert not out.exists()


def test_usage_errors_exit_2(files, capsys) -> None:
    enc, key = str(files["enc"]), str(files["key"])
    for argv in (["decrypt", enc, "-"],  # no key given
                 ["decrypt", enc, "-", "--key-file", key, "--passphrase-env", "X"],  # two keys
                 ["rekey", enc, "out", "--key-file", key],  # no new key
                 ["encrypt", enc, "out", "--key-file", key, "--chunk-size", "0"]):
        with pytest.raises(SystemExit) as info:
            main(["dataset", *argv])
        assert info.value.code == 2
    assert main(["dataset"]) == 2


def test_no_secret_is_ever_printed(files, capsysbinary, monkeypatch) -> None:
    monkeypatch.setenv("FP_PW", PASSWORD)
    key_text = files["key"].read_text().split()[1]
    capsysbinary.readouterr()
    runs = [["keygen", str(files["dir"] / "k2")],
            ["encrypt", str(files["plain"]), str(files["dir"] / "p.fpenc"), "--passphrase-env", "FP_PW"],
            ["rekey", str(files["enc"]), str(files["dir"] / "r.fpenc"), "--key-file", str(files["key"]),
             "--new-passphrase-env", "FP_PW"],
            ["decrypt", str(files["dir"] / "p.fpenc"), str(files["dir"] / "x"), "--key-file", str(files["key"])],
            ["inspect", str(files["enc"])]]
    text = b""
    for argv in runs:
        main(["dataset", *argv])
        captured = capsysbinary.readouterr()
        text += captured.out + captured.err
    new_key_text = (files["dir"] / "k2").read_text().split()[1]
    for secret in (key_text, new_key_text, PASSWORD, crypto.read_key_file(files["key"]).hex()):
        assert secret.encode() not in text


def test_console_script_in_a_subprocess(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("fedpriv")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fedpriv"]
    env = {**os.environ, "FP_PW": PASSWORD}
    plain = tmp_path / "rows.jsonl"
    plain.write_bytes(b'{"text": "a", "label": 1}\n' * 100)

    def run(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*cmd, "dataset", *argv], capture_output=True, env=env, timeout=60, check=False)

    assert run("keygen", str(tmp_path / "k")).returncode == 0
    assert run("encrypt", str(plain), str(tmp_path / "e"), "--key-file", str(tmp_path / "k")).returncode == 0
    done = run("decrypt", str(tmp_path / "e"), "-", "--key-file", str(tmp_path / "k"))
    assert (done.returncode, done.stdout) == (0, plain.read_bytes())
    done = run("decrypt", str(tmp_path / "e"), "-", "--passphrase-env", "FP_PW")
    assert done.returncode == 1 and done.stdout == b""
    message = crypto.ERR_KDF_MISMATCH.format(file=tmp_path / "e", need="key file", got="passphrase")
    assert done.stderr.decode().splitlines() == [cmd_dataset.PREFIX + message]


def _snapshot(path: Path) -> tuple[int, int, bytes | None]:
    st = os.lstat(path)
    return st.st_mode, st.st_ino, (path.read_bytes() if stat.S_ISREG(st.st_mode) else None)


def test_decrypt_never_writes_over_an_input_a_key_a_device_a_fifo_or_a_link(files, capsys) -> None:
    """Reproductions from issue 15: each of these replaced the target with plaintext."""
    d, enc, key = files["dir"], files["enc"], files["key"]
    other_key = d / "other.key"
    assert main(["dataset", "keygen", str(other_key)]) == 0
    other_enc = d / "other.fpenc"
    assert main(["dataset", "encrypt", str(files["plain"]), str(other_enc), "--key-file", str(key)]) == 0
    fifo = d / "fifo"
    os.mkfifo(fifo)
    link = d / "link.csv"
    link.symlink_to(files["plain"])
    hard = d / "hard.fpenc"
    os.link(enc, hard)
    directory = d / "adir"
    directory.mkdir()
    cases = [
        (enc, crypto.ERR_OUT_IS_INPUT.format(out=enc, what="the input", inp=enc)),
        (hard, crypto.ERR_OUT_IS_INPUT.format(out=hard, what="the input", inp=enc)),
        (key, crypto.ERR_OUT_IS_INPUT.format(out=key, what="the key file", inp=key)),
        (other_key, crypto.ERR_OUT_HOLDS.format(out=other_key, what="key file")),
        (other_enc, crypto.ERR_OUT_HOLDS.format(out=other_enc, what="container")),
        (fifo, crypto.ERR_OUT_NOT_FILE.format(out=fifo, kind="a FIFO (named pipe)")),
        (link, crypto.ERR_OUT_SYMLINK.format(out=link)),
        (directory, crypto.ERR_OUT_NOT_FILE.format(out=directory, kind="a directory")),
        (Path("/dev/null"), crypto.ERR_OUT_NOT_FILE.format(out="/dev/null", kind="a character device")),
    ]
    for target, message in cases:
        before = _snapshot(target)
        capsys.readouterr()
        assert main(["dataset", "decrypt", str(enc), str(target), "--key-file", str(key)]) == 1, target
        one_error(capsys, message)
        assert _snapshot(target) == before, target
    missing_parent = d / "no" / "such" / "dir" / "out.csv"
    capsys.readouterr()
    assert main(["dataset", "decrypt", str(enc), str(missing_parent), "--key-file", str(key)]) == 1
    one_error(capsys, crypto.ERR_OUT_NO_PARENT.format(out=missing_parent, parent=missing_parent.parent))
    assert not (d / "no").exists()
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_decrypt_replaces_an_ordinary_file_atomically(files, capsys) -> None:
    out = files["dir"] / "old.csv"
    out.write_text("an earlier plaintext copy\n")
    assert main(["dataset", "decrypt", str(files["enc"]), str(out), "--key-file", str(files["key"])]) == 0
    assert out.read_bytes() == files["plain"].read_bytes()


def test_encrypt_and_rekey_refuse_the_same_targets(files, capsys) -> None:
    d, enc, key, plain = files["dir"], files["enc"], files["key"], files["plain"]
    before = {p: _snapshot(p) for p in (enc, key, plain)}
    cases = [
        (["encrypt", str(plain), str(plain), "--key-file", str(key)],
         crypto.ERR_OUT_IS_INPUT.format(out=plain, what="the input", inp=plain)),
        (["encrypt", str(plain), str(key), "--key-file", str(key)],
         crypto.ERR_OUT_IS_INPUT.format(out=key, what="the key file", inp=key)),
        (["encrypt", str(plain), "/dev/null", "--key-file", str(key)],
         crypto.ERR_OUT_NOT_FILE.format(out="/dev/null", kind="a character device")),
        (["rekey", str(enc), str(key), "--key-file", str(key), "--new-key-file", str(key)],
         crypto.ERR_OUT_IS_INPUT.format(out=key, what="the old key file", inp=key)),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(["dataset", *argv]) == 1, argv
        one_error(capsys, message)
    assert {p: _snapshot(p) for p in (enc, key, plain)} == before
    # re-keying a container in place stays allowed (documented): the output replaces the input atomically
    new_key = d / "new.key"
    assert main(["dataset", "keygen", str(new_key)]) == 0
    assert main(["dataset", "rekey", str(enc), str(enc), "--key-file", str(key), "--new-key-file", str(new_key)]) == 0
    capsys.readouterr()
    assert main(["dataset", "decrypt", str(enc), "-", "--key-file", str(new_key)]) == 0


def test_key_file_readable_by_others_is_refused_by_every_command(files, capsys) -> None:
    key = files["key"]
    key.chmod(0o644)
    out = files["dir"] / "out.csv"
    message = crypto.ERR_KEY_FILE_MODE.format(file=key, mode=0o644)
    for argv in (["decrypt", str(files["enc"]), str(out), "--key-file", str(key)],
                 ["encrypt", str(files["plain"]), str(files["dir"] / "x.fpenc"), "--key-file", str(key)]):
        capsys.readouterr()
        assert main(["dataset", *argv]) == 1
        one_error(capsys, message)
    assert not out.exists()


# Issue 15: `dataset encrypt FIFO OUT` blocked forever (the FIFO was opened to sniff for a container).
REFUSED_WITHIN_S = 10.0  # a refusal takes milliseconds; an opened FIFO blocks until a writer comes, i.e. forever


def _main_unblocked(argv: list[str], fifo: Path) -> int:
    """``main(argv)`` in a thread; if it is still running after REFUSED_WITHIN_S (blocked opening ``fifo``),
    open the FIFO's writing end once so the reader sees end-of-file and the thread ends, then fail."""
    result: dict[str, int] = {}
    worker = threading.Thread(target=lambda: result.setdefault("code", main(argv)), daemon=True)
    worker.start()
    worker.join(REFUSED_WITHIN_S)
    if worker.is_alive():
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(REFUSED_WITHIN_S)
        pytest.fail(f"fedpriv dataset {' '.join(argv[1:])}: still blocked after {REFUSED_WITHIN_S} s")
    return result["code"]


INPUT_POSITIONS = {  # where the non-regular file goes ({x}), and what was expected there
    "encrypt IN": (["encrypt", "{x}", "{out}", "--key-file", "{key}"], crypto.EXPECT_PLAINTEXT),
    "decrypt IN": (["decrypt", "{x}", "{out}", "--key-file", "{key}"], crypto.EXPECT_CONTAINER),
    "rekey IN": (["rekey", "{x}", "{out}", "--key-file", "{key}", "--new-key-file", "{key}"], crypto.EXPECT_CONTAINER),
    "inspect FILE": (["inspect", "{x}"], crypto.EXPECT_CONTAINER),
    "encrypt --key-file": (["encrypt", "{plain}", "{out}", "--key-file", "{x}"], crypto.EXPECT_KEY_FILE),
    "decrypt --key-file": (["decrypt", "{enc}", "{out}", "--key-file", "{x}"], crypto.EXPECT_KEY_FILE),
    "rekey --new-key-file": (["rekey", "{enc}", "{out}", "--key-file", "{key}", "--new-key-file", "{x}"],
                             crypto.EXPECT_KEY_FILE),
}


@pytest.mark.parametrize("position", sorted(INPUT_POSITIONS))
def test_an_input_that_is_not_a_regular_file_is_refused_before_it_is_opened(files, capsys, position) -> None:
    """A FIFO (it would block), a device and a directory, as the data, the container or a key file: one line
    naming the file, what it is and what was expected; nothing written."""
    d = files["dir"]
    fifo, directory = d / "pipe", d / "adir"
    os.mkfifo(fifo)
    directory.mkdir()
    out = d / "out.bin"
    template, expected = INPUT_POSITIONS[position]
    for target, kind in ((fifo, "a FIFO (named pipe)"), (Path("/dev/null"), "a character device"),
                         (directory, "a directory")):
        values = {"x": target, "out": out, "key": files["key"], "plain": files["plain"], "enc": files["enc"]}
        argv = ["dataset", *(a.format(**{k: str(v) for k, v in values.items()}) for a in template)]
        capsys.readouterr()
        assert _main_unblocked(argv, fifo) == 1, argv
        one_error(capsys, crypto.ERR_IN_NOT_FILE.format(inp=target, kind=kind, expected=expected))
        assert not out.exists() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_an_input_through_a_symbolic_link_is_still_read(files, capsys) -> None:
    """Links are followed for inputs (only outputs refuse them): a link to the data or the container works."""
    d = files["dir"]
    (d / "plain-link").symlink_to(files["plain"])
    (d / "enc-link").symlink_to(files["enc"])
    assert main(["dataset", "encrypt", str(d / "plain-link"), str(d / "again.fpenc"), "--key-file",
                 str(files["key"])]) == 0
    capsys.readouterr()
    assert main(["dataset", "decrypt", str(d / "enc-link"), "-", "--key-file", str(files["key"])]) == 0
