"""K-fold cross-validation: folds partition every node's data exactly, the folds' privacy asks add up to the
node's budget, and the summary's mean and spread are right. The end-to-end `fedpriv simulate --folds` run is
slow (Ray) and checks that the folds' ε is all in the node ledgers."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import ConfigError, RunConfig
from common.data import kfold_split
from simulations.crossval import fold_configs, summarize


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 300), k=st.integers(2, 10), seed=st.integers(0, 2**31 - 1))
def test_folds_partition_the_data_exactly(n: int, k: int, seed: int) -> None:
    if k > n:
        with pytest.raises(ValueError, match="2 <= folds <= examples"):
            kfold_split(n, folds=k, fold=0, seed=seed)
        return
    vals = []
    for f in range(k):
        train, val = kfold_split(n, folds=k, fold=f, seed=seed)
        assert not set(train) & set(val) and len(train) + len(val) == n
        vals.append(val)
    allv = np.concatenate(vals)
    assert sorted(allv.tolist()) == list(range(n))  # each index held out exactly once
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 1


def test_fold_index_is_checked() -> None:
    with pytest.raises(ValueError, match="fold must be in 0..2"):
        kfold_split(10, folds=3, fold=3, seed=0)
    with pytest.raises(ConfigError, match="cv-folds"):
        RunConfig(cv_folds=1)
    with pytest.raises(ConfigError, match="cv-fold"):
        RunConfig(cv_folds=3, cv_fold=3)


def test_node_validation_sets_follow_the_folds(tmp_path, monkeypatch) -> None:
    from client.node import load_node_config, load_node_data
    from simulations.runner import SimOptions, prepare_nodes

    cfg = RunConfig(model="tiny", out=str(tmp_path))
    cfg, nodes_dir = prepare_nodes(cfg, SimOptions(nodes=1, synthetic_size=50), tmp_path)
    node = load_node_config({"partition-id": 0}, str(nodes_dir))
    held_out = []
    for f in range(3):
        data = load_node_data(node, cfg.replace(cv_folds=3, cv_fold=f), model_source="tiny")
        assert len(data.train) + len(data.val) == data.n_total == 50
        held_out += [tuple(x) for x in data.val.input_ids]
    train_all = load_node_data(node, cfg, model_source="tiny")
    everything = sorted(tuple(x) for x in train_all.train.input_ids + train_all.val.input_ids)
    assert sorted(held_out) == everything  # the three validation sets together are the node's data


def test_fold_asks_add_up_to_the_budget(tmp_path) -> None:
    cfgs = fold_configs(RunConfig(), folds=4, budget=8.0, out=tmp_path)
    assert [c.epsilon for c in cfgs] == [2.0, 4.0, 6.0, 8.0]
    assert [c.cv_fold for c in cfgs] == [0, 1, 2, 3] and all(c.cv_folds == 4 for c in cfgs)
    assert cfgs[2].out == str(tmp_path / "fold-2")
    assert all(c.epsilon == 0 for c in fold_configs(RunConfig(dp=False), folds=2, budget=8.0, out=tmp_path))
    # a smaller ask in the run config is split the same way, never raised; a larger one is capped
    assert [c.epsilon for c in fold_configs(RunConfig(epsilon=2.0), folds=2, budget=8.0, out=tmp_path)] == [1.0, 2.0]
    assert [c.epsilon for c in fold_configs(RunConfig(epsilon=20.0), folds=2, budget=8.0, out=tmp_path)] == [4.0, 8.0]


def test_a_fixed_noise_seed_differs_per_fold(tmp_path) -> None:
    seeds = [c.noise_seed for c in fold_configs(RunConfig(noise_seed=0), folds=4, budget=8.0, out=tmp_path)]
    assert len(set(seeds)) == 4 and all(s >= 0 for s in seeds)
    assert {c.noise_seed for c in fold_configs(RunConfig(), folds=3, budget=8.0, out=tmp_path)} == {-1}


def test_summary_mean_spread_and_total_epsilon(tmp_path) -> None:
    accs = [0.8, 0.7, 0.9]
    for k, acc in enumerate(accs):
        d = tmp_path / f"fold-{k}"
        d.mkdir()
        rows = [{"round": 1, "status": "ok", "accuracy": 0.5, "epsilon": {"node-0": 1.0 + 2 * k}},
                {"round": 2, "status": "ok", "accuracy": acc, "epsilon": {"node-0": 2.0 + 2 * k},
                 "fairness": {"gaps": {"equalized_odds_difference": {"value": 0.1 * (k + 1)}}}},
                {"round": 3, "status": "failed"}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize(tmp_path, 3)
    a = s["metrics"]["accuracy"]
    assert a["mean"] == pytest.approx(statistics.mean(accs)) and a["std"] == pytest.approx(statistics.stdev(accs))
    assert (a["min"], a["max"], a["folds"]) == (0.7, 0.9, 3)
    assert s["metrics"]["gap.equalized_odds_difference"]["mean"] == pytest.approx(0.2)
    assert s["epsilon_total"] == {"node-0": 6.0}
    assert [f["round"] for f in s["per_fold"]] == [2, 2, 2]


def test_total_epsilon_counts_failed_rounds_and_the_node_ledgers(tmp_path) -> None:
    d = tmp_path / "fold-0"
    d.mkdir()
    rows = [{"round": 1, "status": "ok", "accuracy": 0.6, "epsilon": {"node-0": 5.0}},
            {"round": 2, "status": "failed", "epsilon": {"node-0": 7.9}}]  # node-0 trained; the round failed
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert summarize(tmp_path, 1)["epsilon_total"] == {"node-0": 7.9}
    # the node's own ledger also holds releases no row shows (e.g. noised counts after the last round)
    ledger = tmp_path / "nodes" / "node-0" / "state" / "ledger.jsonl"
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"round": 1, "epsilon": 5.0}) + "\n" + json.dumps({"round": 2, "epsilon": 8.0}) + "\n")
    assert summarize(tmp_path, 1)["epsilon_total"] == {"node-0": 8.0}


@pytest.mark.slow
def test_simulate_folds_end_to_end(tmp_path) -> None:
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"), RAY_USAGE_STATS_ENABLED="0",
               FLWR_TELEMETRY_ENABLED="0", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "cv"
    proc = subprocess.run([sys.executable, "-m", "fedpriv", "simulate", "--model", "tiny", "--nodes", "2",
                           "--rounds", "1", "--folds", "2", "--synthetic-size", "200", "--quiet", "--out", str(out),
                           "--epsilon", "4", "--run-config", "accountant=\"rdp\""],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads((out / "cv.json").read_text())
    assert s["completed_folds"] == 2 and set(s["metrics"]["accuracy"]) >= {"mean", "std"}
    for node in ("node-0", "node-1"):
        ledger = [json.loads(x) for x in (out / "nodes" / node / "state" / "ledger.jsonl").read_text().splitlines()]
        # one training release and one noised-count release per fold, all in the node's one ledger
        assert [(e["kind"], e["run"] == ledger[0]["run"]) for e in ledger] == [
            ("dp-sgd", True), ("count-noise", True), ("dp-sgd", False), ("count-noise", False)]
        assert ledger[-1]["epsilon"] <= 4.0 + 1e-9 and ledger[1]["epsilon"] <= 2.0 + 1e-9
        assert s["epsilon_total"][node] == pytest.approx(ledger[-1]["epsilon"])
    assert "2-fold cross-validation" in proc.stderr
