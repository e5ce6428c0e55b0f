"""`fedpriv tune`: the seeded search against scripted objectives, the search space, the data-marking rules,
the per-trial node state (fresh vs shared), best.toml as both run-config readers take it, and one real
end-to-end search on private data whose node ledgers must hold every trial (slow: Ray)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import RunConfig
from simulations import tune
from simulations.tune import TrialFailed, TrialOutcome, TuneError

ROOT = Path(__file__).resolve().parents[1]
BASE = RunConfig(labels="negative,positive")
LR_BEST, EPOCHS_BEST = 1e-2, 2  # the scripted objective's known optimum


def quadratic(params: dict, trial: int) -> TrialOutcome:
    """Best at learning-rate 1e-2 and local-epochs 2 (value 0), smooth in log10(learning-rate)."""
    return TrialOutcome(value=-(math.log10(params["learning-rate"]) + 2.0) ** 2
                        - 0.25 * (params["local-epochs"] - EPOCHS_BEST) ** 2)


def tiny_space(**extra) -> tune.SearchSpace:
    spec = {"learning-rate": {"low": 1e-4, "high": 1.0, "log": True}, "local-epochs": {"low": 1, "high": 3},
            **extra}
    return tune.parse_space(spec, base=BASE)


# --------------------------------------------------------------------------------------------- search


def test_search_returns_the_known_best_of_a_scripted_objective() -> None:
    res = tune.search(quadratic, space=tiny_space(), base=BASE, trials=40, seed=0)
    assert len(res.records) == 40 and all(r.status == "ok" for r in res.records)
    assert [r.trial for r in res.records] == list(range(1, 41))
    best = res.best
    assert best is not None
    assert best.value == max(r.value for r in res.records)
    assert best.params["local-epochs"] == EPOCHS_BEST
    assert abs(math.log10(best.params["learning-rate"]) - math.log10(LR_BEST)) < 0.15, best.params
    # TPE concentrates near the optimum: the second half of the search beats the random start-up on average.
    first, second = res.records[:10], res.records[20:]
    assert sum(r.value for r in second) / len(second) > sum(r.value for r in first) / len(first)


def test_search_with_one_choice_per_key_runs_exactly_that_configuration() -> None:
    space = tune.parse_space({"learning-rate": {"choices": [0.01]}, "local-epochs": 2, "train-part": "head"},
                             base=BASE)
    res = tune.search(quadratic, space=space, base=BASE, trials=2, seed=3)
    assert [r.params for r in res.records] == [{"train-part": "head", "learning-rate": 0.01, "local-epochs": 2}] * 2
    assert res.best is not None and res.best.trial == 1 and res.best.value == 0.0


def test_same_seed_same_trials_other_seed_other_trials() -> None:
    runs = [tune.search(quadratic, space=tiny_space(), base=BASE, trials=12, seed=s) for s in (7, 7, 8)]
    params = [[r.params for r in res.records] for res in runs]
    assert params[0] == params[1]
    assert params[0] != params[2]


def test_failed_trials_are_recorded_not_raised_and_the_search_goes_on() -> None:
    def objective(params: dict, trial: int) -> TrialOutcome:
        if params["learning-rate"] > 0.05:
            raise TrialFailed("training would spend ε=8.41 > budget 8.00", epsilon={"node-0": 7.9})
        if trial == 2:
            return TrialOutcome(value=float("nan"))
        return quadratic(params, trial)

    seen = []
    res = tune.search(objective, space=tiny_space(), base=BASE, trials=25, seed=1, on_trial=seen.append)
    assert seen == res.records
    failed = [r for r in res.records if r.status == "failed"]
    assert failed and all(r.value is None for r in failed)
    budget = [r for r in failed if r.params["learning-rate"] > 0.05]
    assert budget and all(r.reason == "training would spend ε=8.41 > budget 8.00" for r in budget)
    assert all(r.epsilon == {"node-0": 7.9} for r in budget)
    assert res.records[1].status == "failed" and "not a finite number" in res.records[1].reason
    assert res.best is not None and res.best.status == "ok" and res.best.params["learning-rate"] <= 0.05


def test_every_trial_failing_gives_no_best() -> None:
    def objective(params: dict, trial: int) -> TrialOutcome:
        raise TrialFailed("every node refused")

    res = tune.search(objective, space=tiny_space(), base=BASE, trials=3, seed=0)
    assert res.best is None and [r.status for r in res.records] == ["failed"] * 3


def test_relative_learning_rate_follows_the_train_part() -> None:
    space = tune.parse_space({"learning-rate": {"low": 0.5, "high": 2.0, "relative": True},
                              "train-part": {"choices": ["head", "lora"]}}, base=BASE)
    assert space.keys == ("train-part", "learning-rate")  # the part is drawn first
    res = tune.search(lambda p, t: TrialOutcome(value=0.0), space=space, base=BASE, trials=12, seed=0)
    parts = set()
    for r in res.records:
        default = BASE.replace(train_part=r.params["train-part"]).effective_learning_rate
        factor = r.suggested["learning-rate-factor"]
        assert 0.5 <= factor <= 2.0
        assert r.params["learning-rate"] == pytest.approx(factor * default, rel=1e-12)
        parts.add(r.params["train-part"])
    assert parts == {"head", "lora"}


# --------------------------------------------------------------------------------------------- space


def test_default_space_searches_the_five_knobs() -> None:
    space = tune.load_space(None, base=BASE)
    assert set(space.keys) == {"learning-rate", "local-epochs", "clipping-norm", "train-part", "batch-size"}


def test_space_file_overrides_defaults_and_fixes_scalars(tmp_path: Path) -> None:
    f = tmp_path / "space.toml"
    f.write_text('batch-size = 32\ntrain-part = "head"\n[clipping-norm]\nlow = 0.5\nhigh = 2.0\n')
    space = tune.load_space(f, base=BASE)
    dims = {d.key: d for d in space.dims}
    assert dims["batch-size"].value == 32 and dims["batch-size"].low is None and not dims["batch-size"].choices
    assert (dims["clipping-norm"].low, dims["clipping-norm"].high, dims["clipping-norm"].log) == (0.5, 2.0, False)
    j = tmp_path / "space.json"
    j.write_text(json.dumps({"local-epochs": {"choices": [1, 2]}}))
    assert {d.key: d for d in tune.load_space(j, base=BASE).dims}["local-epochs"].choices == (1, 2)


def test_space_problems_are_listed_together() -> None:
    spec = {
        "epsilon": {"low": 1.0, "high": 2.0},
        "local-epochs": {"low": 3, "high": 1},
        "clipping-norm": {"low": 0.0, "high": 1.0, "log": True},
        "batch-size": {"choices": []},
        "train-part": {"choices": ["head", "everything"]},
        "top-k-layers": {"low": 0, "high": 2, "step": 1},
        "weight-decay": {"low": 0.0, "high": 0.1, "relative": True},
        "lora-r": 2.5,
    }
    with pytest.raises(TuneError) as exc:
        tune.parse_space(spec, base=BASE, source="my.toml")
    msg = str(exc.value)
    assert msg.startswith("search space my.toml: 8 problem(s):\n")
    for line in (
        tune.SPACE_UNKNOWN_KEY.format(key="epsilon", valid=", ".join(tune.TUNABLE_KEYS)),
        tune.SPACE_ORDER.format(key="local-epochs", low=3, high=1),
        tune.SPACE_LOG.format(key="clipping-norm", low=0.0),
        tune.SPACE_EMPTY.format(key="batch-size"),
        tune.SPACE_BAD_FIELDS.format(key="top-k-layers", fields="step"),
        tune.SPACE_RELATIVE.format(key="weight-decay"),
        tune.SPACE_TYPE.format(key="lora-r", what="value", value=2.5, kind="an integer"),
    ):
        assert f"  - {line}" in msg, line
    assert "train-part: choice 'everything': config key 'train-part' must be one of auto, full, head, lora" in msg


def test_space_file_that_cannot_be_parsed(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("learning-rate = {low = \n")
    with pytest.raises(TuneError, match=r"^search space file .*bad.toml: cannot be parsed"):
        tune.load_space(f, base=BASE)
    with pytest.raises(TuneError, match=r"^search space file .*missing.toml: "):
        tune.load_space(tmp_path / "missing.toml", base=BASE)


# --------------------------------------------------------------------------------------------- rules


def test_data_must_be_marked_and_private_needs_consent_and_dp() -> None:
    assert tune.check_data_kind(data="", data_is=None, private_ok=False, dp=True) == "synthetic"
    assert tune.check_data_kind(data="x.csv", data_is="public", private_ok=False, dp=False) == "public"
    assert tune.check_data_kind(data="x.csv", data_is="private", private_ok=True, dp=True) == "private"
    with pytest.raises(TuneError) as exc:
        tune.check_data_kind(data="x.csv", data_is=None, private_ok=True, dp=True)
    assert str(exc.value) == tune.ERR_DATA_UNMARKED.format(data="x.csv")
    with pytest.raises(TuneError) as exc:
        tune.check_data_kind(data="x.csv", data_is="private", private_ok=False, dp=True)
    assert str(exc.value) == tune.ERR_PRIVATE_NOT_OK
    with pytest.raises(TuneError) as exc:
        tune.check_data_kind(data="", data_is="private", private_ok=True, dp=False)
    assert str(exc.value) == tune.ERR_PRIVATE_NO_DP


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"trials": 0}, tune.ERR_TRIALS.format(value=0)),
    ({"metric": "loss"}, tune.ERR_METRIC.format(choices=", ".join(tune.METRICS), value="loss")),
    ({"metric": "eval_accuracy"}, tune.ERR_METRIC_EVAL.format(metric="eval_accuracy")),
    ({"tune_epsilon": 8.0}, tune.ERR_TUNE_EPSILON.format(budget=8.0, value=8.0)),
    ({"tune_epsilon": 0.0}, tune.ERR_TUNE_EPSILON.format(budget=8.0, value=0.0)),
])
def test_settings_are_checked_before_any_work(kwargs: dict, message: str) -> None:
    settings = {"trials": 4, "metric": "accuracy", "eval_data": "", "private": True, "tune_epsilon": 4.0,
                "budget": 8.0, **kwargs}
    with pytest.raises(TuneError) as exc:
        tune.check_settings(**settings)
    assert str(exc.value) == message


def test_private_trials_split_the_tuning_budget_cumulatively() -> None:
    caps = [tune.trial_epsilon_cap(trial=k, trials=4, tune_epsilon=2.0) for k in (1, 2, 3, 4)]
    assert caps == [0.5, 1.0, 1.5, 2.0]


def test_cli_refuses_unmarked_data_and_private_without_consent(tmp_path: Path, capsys) -> None:
    from fedpriv.cli import main

    data = tmp_path / "d.csv"
    data.write_text("text,label\na,x\nb,y\n")
    assert main(["tune", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "fedpriv tune: " + tune.ERR_DATA_UNMARKED.format(data=data)
    assert main(["tune", "--data-is", "private", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "fedpriv tune: " + tune.ERR_PRIVATE_NOT_OK
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["tune", "--out", str(tmp_path / "full")]) == 2
    from fedpriv.cmd_tune import ERR_OUT_EXISTS

    assert capsys.readouterr().err.strip() == "fedpriv tune: " + ERR_OUT_EXISTS.format(out=tmp_path / "full")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------- federation plumbing


class FakeRunner:
    """Stands in for simulations.runner.run: records what each trial asked for and writes metrics rows."""

    def __init__(self, rows_for) -> None:
        self.rows_for = rows_for
        self.calls: list[tuple[RunConfig, dict[str, dict]]] = []

    def __call__(self, cfg: RunConfig, *, nodes_dir: Path, num_nodes: int, progress=None) -> None:
        from server.rows import RoundRow
        from server.rundir import RunDir

        node_cfgs = {p.name: json.loads((p / "node.json").read_text()) for p in sorted(nodes_dir.iterdir())}
        assert len(node_cfgs) == num_nodes
        self.calls.append((cfg, node_cfgs))
        rd = RunDir(cfg.out)
        for row in self.rows_for(len(self.calls), cfg):
            rd.append_metrics(RoundRow.from_json(row))
        (rd.path / "model").mkdir(parents=True, exist_ok=True)


def _nodes(tmp_path: Path, n: int = 2) -> Path:
    nodes = tmp_path / "out" / "nodes"
    for i in range(n):
        (nodes / f"node-{i}").mkdir(parents=True)
        (nodes / f"node-{i}" / "node.json").write_text(json.dumps({
            "node-name": f"node-{i}", "state-dir": str(nodes / f"node-{i}" / "state"), "epsilon": 8.0,
            "data-path": str(nodes / f"node-{i}" / "data.jsonl")}))
    return nodes


@pytest.mark.parametrize("private", [True, False])
def test_federation_objective_state_dirs_epsilon_caps_and_best_model(tmp_path: Path, private: bool) -> None:
    nodes = _nodes(tmp_path)
    accs = {1: 0.6, 2: 0.8, 3: 0.7}

    def rows(call: int, cfg: RunConfig) -> list[dict]:
        eps = 1.0 * call if private else 1.0
        return [{"round": 1, "status": "ok", "accuracy": accs[call], "epsilon": {"node-0": eps, "node-1": eps}}]

    runner = FakeRunner(rows)
    obj = tune.FederationObjective(base=BASE, out=tmp_path / "out", nodes_dir=nodes, num_nodes=2,
                                   metric="accuracy", private=private, trials=3, tune_epsilon=3.0, runner=runner)
    outcomes = [obj({"learning-rate": 0.01 * t}, t) for t in (1, 2, 3)]
    assert [o.value for o in outcomes] == [0.6, 0.8, 0.7]
    for t, (cfg, node_cfgs) in enumerate(runner.calls, start=1):
        assert cfg.out == str(tmp_path / "out" / "trials" / f"trial-{t:03d}")
        assert cfg.learning_rate == pytest.approx(0.01 * t)
        state = node_cfgs["node-0"]["state-dir"]
        if private:
            assert cfg.epsilon == pytest.approx(t * 1.0)  # cumulative cap: 1/3 of the tuning budget per trial
            assert state == str(nodes / "node-0" / "state")  # one accountant and ledger for every trial
        else:
            assert cfg.epsilon == 0.0
            assert state == str(tmp_path / "out" / "trials" / f"trial-{t:03d}" / "nodes" / "node-0" / "state")
    if private:
        assert [o.epsilon["node-0"] for o in outcomes] == [1.0, 2.0, 3.0]
        assert [o.epsilon_trial["node-0"] for o in outcomes] == [1.0, 1.0, 1.0]
    else:
        assert all(o.epsilon_trial["node-0"] == 1.0 for o in outcomes)
    kept = sorted(p.parent.name for p in (tmp_path / "out" / "trials").glob("*/model"))
    assert kept == ["trial-002"]  # only the best trial keeps its model


def test_federation_objective_turns_refusals_and_crashes_into_failed_trials(tmp_path: Path) -> None:
    nodes = _nodes(tmp_path)
    refused = {"round": 1, "status": "failed", "reason": "0 usable updates < min-nodes=2; global model unchanged",
               "refusals": [{"node": n, "reason": "training would spend ε=8.41 > budget 8.00"}
                            for n in ("node-0", "node-1")], "accuracy": 0.5}
    obj = tune.FederationObjective(base=BASE, out=tmp_path / "out", nodes_dir=nodes, num_nodes=2,
                                   metric="accuracy", private=True, trials=2, tune_epsilon=3.0,
                                   runner=FakeRunner(lambda call, cfg: [refused]))
    with pytest.raises(TrialFailed) as exc:
        obj({}, 1)
    assert exc.value.reason == ("round 1 failed: 0 usable updates < min-nodes=2; global model unchanged (node-0: "
                                "training would spend ε=8.41 > budget 8.00; node-1: training would spend ε=8.41 > "
                                "budget 8.00)")
    assert not (tmp_path / "out" / "trials" / "trial-001" / "model").exists()

    def crash(cfg, **kw):
        raise RuntimeError("ray died")

    obj.runner = crash
    with pytest.raises(TrialFailed, match=r"^the federation failed: RuntimeError: ray died$"):
        obj({}, 2)


# --------------------------------------------------------------------------------------------- outputs


def _flwr_accepts(path: Path) -> dict:
    """What `flwr run . --run-config FILE` does with FILE: parse it, fuse it into pyproject's app config
    (unknown keys are an error), then the ServerApp parses the fused config."""
    import tomllib
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"'click\.utils\.\w+' is deprecated", category=DeprecationWarning)
        from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

    overrides = parse_config_args([str(path)])
    defaults = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    fused = fuse_dicts(defaults, overrides, check_keys=True)
    RunConfig.from_mapping(fused)
    return overrides


def test_best_toml_is_accepted_by_simulate_and_flwr_run(tmp_path: Path) -> None:
    from fedpriv.cmd_simulate import load_run_config_arg

    base = BASE.replace(group_col="group", model="tiny", clipping_norm=1.0, noise_seed=0, out="runs/x",
                        fairness_thresholds={"max-equalized-odds-difference": 0.2})
    params = {"learning-rate": 0.0123, "local-epochs": 2, "clipping-norm": 1.0, "train-part": "lora",
              "batch-size": 16}
    values = tune.best_run_config(base, params, epsilon=3.5)
    assert values["epsilon"] == 3.5 and values["model"] == "tiny" and values["group-col"] == "group"
    assert values["clipping-norm"] == 1.0  # a searched key is written even when it equals the default
    assert not {"out", "noise-seed", "num-server-rounds"} & set(values)
    assert not [k for k in values if k.startswith("fairness.")]
    path = tune.write_run_config_toml(tmp_path / "best.toml", values, comments=["a comment", 'with "quotes"'])
    assert path.read_text().startswith("# a comment\n")

    sim = RunConfig.from_mapping(load_run_config_arg(str(path)))
    for key, value in params.items():
        assert sim.to_mapping()[key] == value
    assert sim.epsilon == 3.5 and sim.labels == "negative,positive"
    assert _flwr_accepts(path) == values


def test_simulate_takes_the_file_with_run_config_file(tmp_path: Path) -> None:
    from fedpriv.cli import build_parser
    from fedpriv.cmd_simulate import build_config

    path = tune.write_run_config_toml(tmp_path / "best.toml", {"learning-rate": 0.02, "local-epochs": 3})
    args = build_parser().parse_args(["simulate", "--run-config-file", str(path), "--local-epochs", "1"])
    cfg = build_config(args)
    assert cfg.learning_rate == 0.02 and cfg.local_epochs == 1  # explicit flags still win
    args = build_parser().parse_args(["simulate", "--run-config-file", str(tmp_path / "nope.toml")])
    with pytest.raises(FileNotFoundError, match="nope.toml does not exist"):
        build_config(args)


def test_trials_plot_marks_failures(tmp_path: Path) -> None:
    from server.plots import plot_trials

    path = plot_trials([0.6, None, 0.8, float("nan"), 0.7], tmp_path / "t.png", metric="accuracy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_trials([None], tmp_path / "none.png", metric="accuracy").stat().st_size > 0


# --------------------------------------------------------------------------------------------- end to end (Ray)


@pytest.mark.slow
def test_private_tune_end_to_end_ledgers_hold_every_trial(tmp_path: Path) -> None:
    from audit.run import audit_run
    from common.ledger import load_public_key, verify_ledger
    from fedpriv.cli import main
    from fedpriv.cmd_simulate import load_run_config_arg

    trials, rounds = 2, 1
    space = tmp_path / "space.toml"
    space.write_text('train-part = "head"\nbatch-size = 16\nlocal-epochs = 1\n'
                     '[learning-rate]\nlow = 0.005\nhigh = 0.05\nlog = true\n')
    out = tmp_path / "tune"
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"), PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "fedpriv", "tune", "--model", "tiny", "--nodes", "2", "--rounds", str(rounds),
           "--trials", str(trials), "--synthetic-size", "300", "--data-is", "private", "--private-ok",
           "--epsilon", "8", "--tune-epsilon", "4", "--space", str(space), "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "fedpriv tune: warning: TUNING ON PRIVATE DATA." in proc.stderr

    recs = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in recs] == [1, 2] and all(r["status"] == "ok" for r in recs), recs
    for node in ("node-0", "node-1"):
        cum = [r["epsilon"][node] for r in recs]
        assert 0 < cum[0] < cum[1] <= 4.0 * 1.001  # cumulative over trials, within the tuning budget
        assert cum[0] <= 2.0 * 1.001  # trial 1 of 2 may reach half of it
        assert recs[1]["epsilon_trial"][node] == pytest.approx(cum[1] - cum[0])

    # Every trial's release is in each node's own ledger, which verifies; so does the coordinator's copy.
    for node in ("node-0", "node-1"):
        state = out / "nodes" / node / "state"
        key = load_public_key(state / "node_ed25519.pub")
        own = verify_ledger(state / "ledger.jsonl", key)
        assert own.ok, [str(p) for p in own.problems]
        train = [e for e in own.entries if e["kind"] == "dp-sgd"]
        assert len(train) == trials * rounds
        assert len({e["run"] for e in train}) == trials  # one run per trial
        assert own.entries[-1]["epsilon"] == pytest.approx(recs[-1]["epsilon"][node])  # every release counted
        copy = out / "ledgers" / f"{node}.jsonl"
        assert main(["ledger", "verify", str(copy), "--pubkey", str(out / "ledgers" / f"{node}.pub"), "--segment"]) == 0
        assert [json.loads(x)["hash"] for x in copy.read_text().splitlines()] == [e["hash"] for e in own.entries]
    # Each trial's run directory holds the coordinator's copies of that trial only: from trial 2 on the audit
    # cannot see the nodes' earlier spend and says so (issue 17); with the nodes' own ledgers it checks it all.
    node_ledgers = out / "audit-node-ledgers"
    node_ledgers.mkdir()
    for node in ("node-0", "node-1"):
        state = out / "nodes" / node / "state"
        shutil.copy(state / "ledger.jsonl", node_ledgers / f"{node}.jsonl")
        shutil.copy(state / "ledger.head", node_ledgers / f"{node}.head")
    for t in range(1, trials + 1):
        partial = audit_run(out / "trials" / f"trial-{t:03d}")
        assert {f.check for f in partial.failures} == (set() if t == 1 else {"coverage"}), partial.failures
        rep = audit_run(out / "trials" / f"trial-{t:03d}", node_ledgers=node_ledgers)
        assert rep.passed, [str(f) for f in rep.failures]

    # best.toml: the best trial's values, accepted by both run-config readers, asking only for what is left.
    best = max(recs, key=lambda r: r["value"])
    for reader in (lambda p: load_run_config_arg(str(p)), _flwr_accepts):
        values = reader(out / "best.toml")
        cfg = RunConfig.from_mapping(values)
        assert cfg.learning_rate == pytest.approx(best["params"]["learning-rate"])
        assert cfg.train_part == "head" and cfg.batch_size == 16 and cfg.model == "tiny"
        # the budget minus the most tuning could spend (each node was capped at the tuning budget 4), never a
        # measured figure a lost row could understate
        assert cfg.epsilon == pytest.approx(8.0 - 4.0)
    assert summary_spent(out) == pytest.approx(max(recs[-1]["epsilon"].values()))
    summary = json.loads((out / "tune.json").read_text())
    # per node: each trial's training release and its noised evaluation counts
    assert summary["data_is"] == "private" and summary["ledger_entries"] == {"node-0": 4, "node-1": 4}
    assert (out / "trials.png").stat().st_size > 0
    assert sorted(p.parent.name for p in (out / "trials").glob("*/model")) == [f"trial-{best['trial']:03d}"]


def summary_spent(out: Path) -> float:
    return json.loads((out / "tune.json").read_text())["epsilon_spent_on_tuning"]


def test_a_fixed_noise_seed_differs_per_trial(tmp_path) -> None:
    from common.config import RunConfig
    from simulations.tune import FederationObjective

    def objective(base):
        return FederationObjective(base=base, out=tmp_path, nodes_dir=tmp_path / "nodes", num_nodes=2,
                                   metric="accuracy", private=False, trials=5, tune_epsilon=0.0)

    seeds = {objective(RunConfig(noise_seed=0)).trial_config({}, t).noise_seed for t in range(5)}
    assert len(seeds) == 5 and all(s >= 0 for s in seeds)
    assert objective(RunConfig()).trial_config({}, 3).noise_seed == -1
