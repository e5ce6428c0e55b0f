"""Issue 15: every command refuses bad option values before any work, with exit code 2 and one line naming the
option, the value and the accepted range; no traceback from user input. In-process ``main()`` (no Ray)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedpriv.cli import main


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDPRIV_SIM_KEY_DIR", str(tmp_path / "sim-keys"))
    (tmp_path / "rows.csv").write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(50)))
    (tmp_path / "empty.csv").write_text("text,label\n")
    (tmp_path / "m").mkdir()  # passes the model-directory checks that run before the option checks
    (tmp_path / "m" / "config.json").write_text("{}")
    return tmp_path


def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out, argv
    return int(code), captured.err.splitlines()


SIM = ["simulate", "--model", "tiny", "--quiet"]
BAD = [
    # (argv, words the one-line message must contain)
    ([*SIM, "--epsilon", "0"], ["--epsilon", "> 0", "0.0"]),
    ([*SIM, "--epsilon", "-1"], ["--epsilon", "> 0", "-1.0"]),
    ([*SIM, "--epsilon", "nan"], ["--epsilon", "finite", "nan"]),
    ([*SIM, "--epsilon", "inf"], ["--epsilon", "finite", "inf"]),
    ([*SIM, "--delta", "0"], ["--delta", "> 0 and < 1", "0.0"]),
    ([*SIM, "--delta", "1"], ["--delta", "> 0 and < 1", "1.0"]),
    ([*SIM, "--delta", "2"], ["--delta", "> 0 and < 1", "2.0"]),
    ([*SIM, "--count-noise-epsilon", "-1"], ["--count-noise-epsilon", ">= 0", "-1.0"]),
    ([*SIM, "--nodes", "0"], ["--nodes", ">= 1", "0"]),
    ([*SIM, "--nodes", "-2"], ["--nodes", ">= 1", "-2"]),
    ([*SIM, "--nodes", "1000", "--data", "rows.csv"], ["--nodes", "50", "1000"]),
    ([*SIM, "--alpha", "0", "--partition", "dirichlet"], ["--alpha", "> 0", "0.0"]),
    ([*SIM, "--alpha", "-1"], ["--alpha", "> 0", "-1.0"]),
    ([*SIM, "--folds", "1"], ["--folds", ">= 2", "1"]),
    ([*SIM, "--folds", "-3"], ["--folds", ">= 2", "-3"]),
    ([*SIM, "--rounds", "0"], ["--rounds", ">= 1", "0"]),
    ([*SIM, "--lr", "-1"], ["--lr", ">= 0", "-1.0"]),
    ([*SIM, "--batch-size", "-1"], ["--batch-size", ">= 0", "-1"]),  # 0 = the recipe
    ([*SIM, "--max-length", "2"], ["--max-length", ">= 8", "2"]),
    ([*SIM, "--synthetic-size", "0"], ["--synthetic-size", ">= 1", "0"]),
    ([*SIM, "--synthetic-skew", "1.5"], ["--synthetic-skew", "< 1", "1.5"]),
    ([*SIM, "--model", "/nonexistent"], ["--model", "/nonexistent"]),
    ([*SIM, "--data", "missing.csv"], ["--data", "missing.csv"]),
    ([*SIM, "--data", "empty.csv"], ["empty.csv"]),
    ([*SIM, "--nodes", "x"], ["--nodes", "invalid int value", "'x'"]),
    ([*SIM, "--partition", "bogus"], ["--partition", "invalid choice", "bogus"]),
    ([*SIM, "--run-config", "no-such-key=1"], ["no-such-key"]),
    (["tune", "--model", "tiny", "--epsilon", "nan"], ["--epsilon", "finite", "nan"]),
    (["tune", "--model", "tiny", "--nodes", "0"], ["--nodes", ">= 1", "0"]),
    (["tune", "--model", "tiny", "--trials", "0"], ["trials", "0"]),
    (["dataset", "encrypt", "rows.csv", "out.fpenc", "--key-file", "k", "--chunk-size", "0"],
     ["--chunk-size", "positive", "'0'"]),
    (["dataset", "decrypt", "x.fpenc", "out.csv"], ["--key-file", "--passphrase-env", "required"]),
    (["ledger", "verify", "l.jsonl", "--pubkey", "k.pub", "--expected-count", "-1"], ["--expected-count", "-1"]),
    (["audit-empirical", "--canaries", "0"], ["--canaries", "> 0", "0"]),
    (["audit-empirical", "--epsilon", "nan"], ["--epsilon", "nan"]),
    (["audit-empirical", "--delta", "2"], ["--delta", "2"]),
    (["audit-empirical", "--confidence", "1.5"], ["--confidence", "1.5"]),
    (["fairness", "--model", "m", "--data", "rows.csv", "--group-col", "g", "--out", "r.json", "--max-length", "0"],
     ["--max-length", ">= 8", "0"]),
    (["fairness", "--model", "m", "--data", "rows.csv", "--group-col", "g", "--out", "r.json",
      "--min-group-size", "-1"], ["--min-group-size", ">= 0", "-1"]),
    (["certs", "init", "certs", "--server-host", "localhost", "--days", "0"], ["--days", "0"]),
    (["compress", "--model", "m", "--out", "c", "--prune", "1.5"], ["--prune", "[0, 1)", "1.5"]),
    (["compress", "--model", "m", "--out", "c", "--prune", "nan"], ["--prune", "[0, 1)", "nan"]),
    (["compress", "--model", "m", "--out", "c", "--quantize", "int8", "--threads", "-1"], ["--threads", ">= 0", "-1"]),
]


@pytest.mark.parametrize(("argv", "words"), BAD, ids=[" ".join(a[:1] + a[4:] if a[0] == "simulate" else a)
                                                     for a, _ in BAD])
def test_bad_option_values_exit_2_with_one_line(workdir: Path, capsys, argv: list[str], words: list[str]) -> None:
    before = sorted(p.name for p in workdir.iterdir())
    code, lines = run_main(argv, capsys)
    assert code == 2, (argv, lines)
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert sorted(p.name for p in workdir.iterdir()) == before  # nothing written: no run dir, no partitions
    assert not (workdir / "runs").exists()


def test_the_console_script_prints_no_traceback_for_bad_values(workdir: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for argv in (["simulate", "--epsilon", "nan"], ["simulate", "--nodes", "-2"], ["simulate", "--folds", "1"]):
        proc = subprocess.run([sys.executable, "-m", "fedpriv", *argv], cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
