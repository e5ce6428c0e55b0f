"""Issue 15, "nothing lost": `fedpriv simulate --out/--fresh` deletes only a run directory fedpriv created, and
only after every check passed; a resume on other data is refused; a run in which nothing trained is reported
as a failure. In-process and Ray-free (every case here stops before the federation starts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpriv import cmd_simulate
from fedpriv.cli import main
from server.rows import RoundRow
from server.rundir import RUN_MARKER, RunDir
from simulations import runner


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDPRIV_SIM_KEY_DIR", str(tmp_path / "sim-keys"))
    (tmp_path / "rows.csv").write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(40)))
    (tmp_path / "other.csv").write_text("text,label\n" + "".join(f"other {i},{i % 2}\n" for i in range(40)))
    (tmp_path / "empty.csv").write_text("text,label\n")
    return tmp_path


def simulate(capsys, *argv: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["simulate", "--model", "tiny", "--quiet", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.splitlines()


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_fresh_never_deletes_a_directory_fedpriv_did_not_create(workdir: Path, capsys) -> None:
    """Issue 15 reproduction: `--data empty.csv --out victim --fresh` deleted victim/ and its thesis."""
    victim = workdir / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("years of work\n")
    for data in ("empty.csv", "rows.csv"):
        code, lines = simulate(capsys, "--data", data, "--out", str(victim), "--fresh")
        assert code == 2
        assert lines == ["fedpriv simulate: " + cmd_simulate.ERR_FRESH_NOT_RUN.format(out=victim, marker=RUN_MARKER)]
        assert tree(victim) == {"thesis.txt": b"years of work\n"}
    # without --fresh a foreign non-empty directory is not written into either
    code, lines = simulate(capsys, "--data", "rows.csv", "--out", str(victim))
    assert code == 2 and lines == ["fedpriv simulate: " + cmd_simulate.ERR_OUT_FOREIGN.format(out=victim,
                                                                                               marker=RUN_MARKER)]
    assert tree(victim) == {"thesis.txt": b"years of work\n"}


def test_fresh_refuses_the_working_directory_a_file_and_a_link(workdir: Path, capsys) -> None:
    before = tree(workdir)
    code, lines = simulate(capsys, "--out", ".", "--fresh")
    assert code == 2 and lines == ["fedpriv simulate: " + cmd_simulate.ERR_FRESH_NOT_RUN.format(out=".",
                                                                                                 marker=RUN_MARKER)]
    RunDir(workdir).marker_path.write_text("even a marked working directory is not deleted\n")
    code, lines = simulate(capsys, "--out", ".", "--fresh")
    assert code == 2 and lines == ["fedpriv simulate: " + cmd_simulate.ERR_FRESH_CWD.format(out=".")]
    RunDir(workdir).marker_path.unlink()
    code, lines = simulate(capsys, "--out", "rows.csv", "--fresh")  # issue 15: this was a traceback
    assert code == 2 and lines == ["fedpriv simulate: " + cmd_simulate.ERR_OUT_NOT_DIR.format(out="rows.csv")]
    run = workdir / "real"
    RunDir(run).mark()
    (workdir / "link").symlink_to(run)
    code, lines = simulate(capsys, "--out", "link", "--fresh")
    assert code == 2 and lines == ["fedpriv simulate: " + cmd_simulate.ERR_FRESH_LINK.format(out="link")]
    assert run.is_dir() and (workdir / "link").is_symlink()
    assert {k: v for k, v in tree(workdir).items() if not k.startswith(("real", "link"))} == before


def test_fresh_on_a_run_directory_validates_everything_before_deleting(workdir: Path, capsys) -> None:
    run = workdir / "run"
    RunDir(run).mark()
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    snapshot = tree(run)
    for bad in (["--data", "empty.csv"], ["--epsilon", "nan"], ["--model", "/nonexistent"], ["--nodes", "1000"],
                ["--data", "missing.csv"], ["--folds", "1"]):
        code, lines = simulate(capsys, "--data", "rows.csv", *bad, "--out", str(run), "--fresh")
        assert code == 2 and len(lines) == 1, (bad, lines)
        assert tree(run) == snapshot, bad


def test_a_marked_run_directory_is_what_fresh_deletes(workdir: Path, capsys) -> None:
    """After every check passed, --fresh removes the run directory and its simulated keys (outside it)."""
    from fedpriv.cmd_simulate import _delete_run, check_out_dir

    run = workdir / "run"
    RunDir(run).mark()
    (run / "old.txt").write_text("from an earlier run\n")
    keys = runner.node_key_dir(run)
    keys.mkdir(parents=True)
    (keys / "node-0.key").write_text("k")
    check_out_dir(run, fresh=True)
    _delete_run(run)
    assert not run.exists() and not keys.exists()


def test_marker_is_written_only_for_new_or_empty_directories(tmp_path: Path) -> None:
    new = RunDir(tmp_path / "new")
    assert new.mark() and new.is_marked()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert RunDir(empty).mark()
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("x")
    assert not RunDir(full).mark() and not (full / RUN_MARKER).exists()
    # the server marks the run directory it creates (deployment: `flwr run` with out=...)
    rd = RunDir(tmp_path / "server-made")
    rd.write_config({"a": 1}, run_id="r")
    assert rd.is_marked()


def test_resume_with_different_data_is_refused(workdir: Path, capsys) -> None:
    """Issue 15: resuming a run with a different --data silently switched data mid-run."""
    from common.config import RunConfig

    run = workdir / "run"
    RunDir(run).mark()
    cfg = RunConfig(model="tiny", out=str(run))
    opts = runner.SimOptions(nodes=4, data="rows.csv")
    runner.record_fingerprint(run, runner.data_fingerprint(cfg, opts))
    snapshot = tree(run)
    code, lines = simulate(capsys, "--data", "other.csv", "--out", str(run))
    assert code == 2 and len(lines) == 1
    assert "was started on other data (data-sha256:" in lines[0] and "--fresh" in lines[0]
    assert tree(run) == snapshot
    # the same file with one byte changed is other data too; so is another split
    (workdir / "rows.csv").write_text((workdir / "rows.csv").read_text().replace("row 7,1", "row 7,0"))
    code, lines = simulate(capsys, "--data", "rows.csv", "--out", str(run))
    assert code == 2 and "data-sha256" in lines[0]
    (workdir / "rows.csv").write_text((workdir / "rows.csv").read_text().replace("row 7,0", "row 7,1"))
    code, lines = simulate(capsys, "--data", "rows.csv", "--out", str(run), "--nodes", "3")
    assert code == 2 and "nodes: 4 -> 3" in lines[0]
    # same data, same split: accepted (no error from the fingerprint check)
    runner.check_fingerprint(run, runner.data_fingerprint(cfg, opts))


def test_nothing_trained_is_a_failure_with_the_reasons(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    refusal = "training would spend ε=9.1 > budget 8.0 at δ=1e-05"
    for rnd in (1, 2):
        rd.append_metrics(RoundRow.from_json({
            "round": rnd, "status": "failed", "reason": "0 usable updates < min-nodes=1",
            "refusals": [{"node": "node-0", "reason": refusal}],
            "errors": [{"node_id": 7, "reason": "ClientAppException:<'boom'>"}], "rejected": []}))
    text = cmd_simulate.nothing_trained(tmp_path, after_round=0)
    lines = text.splitlines()
    assert lines[0] == cmd_simulate.ERR_NOTHING_TRAINED.format(failed=2)
    assert lines[1:] == [f"  node-0: {refusal}", "  node id 7: ClientAppException:<'boom'>",
                         "  0 usable updates < min-nodes=1"]
    assert cmd_simulate.nothing_trained(tmp_path, after_round=2) == ""  # nothing ran this time: not a failure
    rd.append_metrics(RoundRow.from_json({"round": 3, "status": "ok"}))
    assert cmd_simulate.nothing_trained(tmp_path, after_round=0) == ""


def test_simulated_node_keys_live_outside_the_run_directory(workdir: Path) -> None:
    from common.config import RunConfig

    run = workdir / "run"
    RunDir(run).mark()
    cfg = RunConfig(model="tiny", out=str(run))
    opts = runner.SimOptions(nodes=2, data="rows.csv", encrypt=True)
    _, nodes_dir = runner.prepare_nodes(cfg, opts, run)
    keys = runner.node_key_dir(run)
    assert keys.is_dir() and not keys.resolve().is_relative_to(run.resolve())
    assert (keys.stat().st_mode & 0o077) == 0
    for i in range(2):
        node = json.loads((nodes_dir / f"node-{i}" / "node.json").read_text())
        assert Path(node["key-file"]) == (keys / f"node-{i}.key").resolve()
        assert (Path(node["key-file"]).stat().st_mode & 0o077) == 0
    assert not [p for p in run.rglob("*") if p.name.endswith(".key") and "dataset" in p.name]
    from common.crypto import is_key_file

    assert not [p for p in run.rglob("*") if p.is_file() and is_key_file(p)]
