"""`fedpriv fairness` and `fedpriv status` on saved artefacts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fedpriv.cli import main


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    from common.model import ModelSpec, build_model, load_tokenizer, save_pretrained

    out = tmp_path_factory.mktemp("model") / "model"
    model = build_model(ModelSpec(source="tiny", labels=("negative", "positive"), train_part="head"))
    save_pretrained(model, load_tokenizer("tiny"), out)
    return out


def _data(path: Path, groups=("north", "south")) -> Path:
    rows = [{"review": f"the visit was {'great' if i % 2 else 'awful'} {i}", "stars": "positive" if i % 2 else "negative",
             "site": groups[i % len(groups)]} for i in range(40)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["review", "stars", "site"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_fairness_report_and_predictions_for_a_saved_model(tmp_path: Path, saved_model: Path, capsys) -> None:
    data = _data(tmp_path / "held.csv")
    rc = main(["fairness", "--model", str(saved_model), "--data", str(data), "--group-col", "site",
               "--text-col", "review", "--label-col", "stars", "--out", str(tmp_path / "r.json"),
               "--predictions-out", str(tmp_path / "p.csv"), "--min-group-size", "5"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["num_examples"] == 40 and set(rep["fairness"]["groups"]) == {"north", "south"}
    assert "equalized_odds_difference" in rep["fairness"]["gaps"]
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "group", "label", "prediction", "score"]
    assert len(rows) == 40 and {r["label"] for r in rows} == {"negative", "positive"}
    scores = np.array([float(r["score"]) for r in rows])
    assert ((scores >= 0) & (scores <= 1)).all()
    # The report's accuracy is the accuracy of the written predictions.
    acc = np.mean([r["label"] == r["prediction"] for r in rows])
    assert rep["accuracy"] == pytest.approx(acc)


def test_fairness_cli_names_a_missing_group_column(tmp_path: Path, saved_model: Path, capsys) -> None:
    data = _data(tmp_path / "held.csv")
    rc = main(["fairness", "--model", str(saved_model), "--data", str(data), "--group-col", "hospital",
               "--text-col", "review", "--label-col", "stars", "--out", str(tmp_path / "r.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing column 'hospital'" in err and "held.csv" in err


def test_fairness_never_overwrites_its_input_or_the_model(tmp_path: Path, saved_model: Path, capsys) -> None:
    """Issue 15: `--data same.csv --out same.csv` overwrote the input; `--predictions-out` likewise."""
    from common.fsutil import ERR_OUT_IS_INPUT, ERR_OUT_NOT_FILE
    from fedpriv.cmd_fairness import ERR_SAME_OUTPUTS

    data = _data(tmp_path / "held.csv")
    before = data.read_bytes()
    base = ["fairness", "--model", str(saved_model), "--data", str(data), "--group-col", "site",
            "--text-col", "review", "--label-col", "stars"]
    config = saved_model / "config.json"
    config_before = config.read_bytes()
    other = tmp_path / "r.json"
    cases = [
        (["--out", str(data)], ERR_OUT_IS_INPUT.format(out=data, what="the --data file", inp=data)),
        (["--out", str(other), "--predictions-out", str(data)],
         ERR_OUT_IS_INPUT.format(out=data, what="the --data file", inp=data)),
        (["--out", str(config)], ERR_OUT_IS_INPUT.format(out=config, what="a file of --model", inp=config)),
        (["--out", str(other), "--predictions-out", str(other)], ERR_SAME_OUTPUTS.format(path=other)),
        (["--out", "/dev/null"], ERR_OUT_NOT_FILE.format(out="/dev/null", kind="a character device")),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.splitlines() == [f"fedpriv fairness: {message}"], extra
    assert data.read_bytes() == before and config.read_bytes() == config_before
    assert not other.exists()
