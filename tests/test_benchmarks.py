"""The privacy/utility benchmark measures what it says: real runs whose nodes accept its settings.

After node-owned privacy (issue 13) a node refuses a fixed noise seed unless its own config allows it; the
benchmark kept asking for one and reported the untrained model's accuracy of its failed runs as results.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POSITIVE = ("a moving , funny film", "warm and wise", "a delight from start to end", "sharp , tender and true")
NEGATIVE = ("a dull , lifeless mess", "tedious and shallow", "a waste of two hours", "clumsy , loud and empty")


def _sst2_like(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(rows):
        label = rng.randrange(2)
        lines.append(f"{rng.choice(POSITIVE if label else NEGATIVE)} {rng.choice(('indeed', 'really', ''))}\t{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _benchmark(tmp_path: Path, *extra: str) -> dict:
    data = tmp_path / "sst2"
    data.mkdir()
    _sst2_like(data / "train.tsv", 480, seed=0)
    _sst2_like(data / "dev.tsv", 60, seed=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1", "FEDPRIV_SIM_KEY_DIR": str(tmp_path / "keys")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "privacy_utility.py"), "--data-dir", str(data),
                           "--model", "tiny", "--epsilons", "8", "--run-config", "num-server-rounds=1", *extra],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_reproducible_noise_seeds_are_allowed_by_the_nodes_and_every_run_trains(tmp_path: Path) -> None:
    report = _benchmark(tmp_path, "--repeats", "2", "--noise-seeds")
    assert report["noise"] == "seeds 0..R-1"
    runs = report["results"]
    assert [r["returncode"] for r in runs] == [0, 0], [r["stderr_tail"] for r in runs]
    assert all("--allow-fixed-noise-seed" in r["command"] and f"noise-seed={r['repeat']}" in r["command"] for r in runs)
    assert all(r["within_budget"] is True and r["eval_accuracy"] is not None for r in runs)
    (summary,) = report["summary"]
    assert summary["failed_runs"] == [] and len(summary["eval_accuracies"]) == 2
    assert summary["target_met"] is not None


@pytest.mark.slow
def test_a_failed_run_is_reported_as_a_failure_not_as_an_accuracy(tmp_path: Path) -> None:
    # the benchmark's old request: a fixed noise seed the nodes were not told to allow; nothing trains and the
    # run exits non-zero (issue 15), but its metrics still show the untrained model's accuracy
    report = _benchmark(tmp_path, "--repeats", "1", "--run-config", "num-server-rounds=1 noise-seed=3")
    (run,) = report["results"]
    assert run["returncode"] != 0 and run["eval_accuracy"] is None
    assert "allow-fixed-noise-seed=false" in run["stderr_tail"]
    (summary,) = report["summary"]
    assert summary["failed_runs"] == [0] and summary["eval_accuracies"] == [] and summary["target_met"] is None
    assert "--allow-fixed-noise-seed" not in run["command"]
