"""common.plots: charts are written for real per-round rows, including None values and a single round."""

from __future__ import annotations

import numpy as np
import pytest

from common.fairness import fairness_report, group_confusions
from server.plots import plot_gaps_over_rounds, plot_group_rates_over_rounds, plot_metric_over_rounds

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fairness(seed: int, *, num_classes: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, num_classes, 60), rng.integers(0, num_classes, 60)
    groups = rng.choice(["a", "b", "c"], 60)
    labels = [f"c{i}" for i in range(num_classes)]
    return fairness_report(group_confusions(y, p, groups, num_classes=num_classes), labels=labels)


def _rows(n: int) -> list[dict]:
    return [{"round": r, "accuracy": 0.5 + 0.1 * r, "loss": 1.0 / r, "fairness": _fairness(r)} for r in range(1, n + 1)]


def _assert_png(path, expected):
    assert path == expected and path.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("n_rounds", [1, 3])
def test_all_charts_for_one_and_several_rounds(tmp_path, n_rounds):
    rows = _rows(n_rounds)
    out = tmp_path / "nested" / "dir"
    _assert_png(plot_metric_over_rounds(rows, ["accuracy", "loss"], out / "m.png", title="t", ylabel="y",
                                        hlines={"target": 0.8}), out / "m.png")
    _assert_png(plot_group_rates_over_rounds(rows, out / "r.png"), out / "r.png")
    _assert_png(plot_gaps_over_rounds(rows, out / "g.png"), out / "g.png")


def test_none_nan_missing_and_non_numeric_values_are_skipped(tmp_path):
    rows = _rows(3)
    rows[0]["accuracy"] = None
    rows[1]["accuracy"] = float("nan")
    rows[2].pop("loss")
    rows.append({"round": 4, "accuracy": "n/a", "eps:node-0": {"value": 1.5}, "fairness": None})
    rows.append({"accuracy": True})  # no round: numbered by position; bool is not a metric value
    rows[0]["fairness"]["groups"]["a"]["tpr"] = {"value": None, "undefined_reason": "no positive examples"}
    rows[1]["fairness"]["gaps"]["equalized_odds_difference"]["value"] = None
    for path in (plot_metric_over_rounds(rows, ["accuracy", "loss", "eps:node-0", "absent"], tmp_path / "m.png",
                                         title="t", ylabel="y"),
                 plot_group_rates_over_rounds(rows, tmp_path / "r.png"),
                 plot_gaps_over_rounds(rows, tmp_path / "g.png")):
        assert path.read_bytes().startswith(PNG_MAGIC)


def test_empty_rows_give_a_no_data_chart(tmp_path):
    for path in (plot_metric_over_rounds([], ["accuracy"], tmp_path / "m.png", title="t", ylabel="y"),
                 plot_group_rates_over_rounds([], tmp_path / "r.png"),
                 plot_gaps_over_rounds([{"round": 1}], tmp_path / "g.png")):
        assert path.read_bytes().startswith(PNG_MAGIC)


def test_multiclass_reports(tmp_path):
    rows = [{"round": r, "fairness": _fairness(r, num_classes=3)} for r in (1, 2)]
    _assert_png(plot_group_rates_over_rounds(rows, tmp_path / "r.png", rates=("accuracy",)), tmp_path / "r.png")
    _assert_png(plot_gaps_over_rounds(rows, tmp_path / "g.png"), tmp_path / "g.png")


def test_many_groups(tmp_path):
    rng = np.random.default_rng(0)
    groups = [f"term-{i}" for i in rng.integers(0, 50, 500)]
    rep = fairness_report(group_confusions(rng.integers(0, 2, 500), rng.integers(0, 2, 500), groups,
                                           num_classes=2), labels=["n", "p"])
    path = plot_group_rates_over_rounds([{"round": 1, "fairness": rep}, {"round": 2, "fairness": rep}],
                                        tmp_path / "r.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_does_not_import_pyplot(tmp_path):
    import sys

    had = "matplotlib.pyplot" in sys.modules
    plot_gaps_over_rounds(_rows(1), tmp_path / "g.png")
    assert had or "matplotlib.pyplot" not in sys.modules
