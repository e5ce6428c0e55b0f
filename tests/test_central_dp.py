"""Central (client-level) DP on the server, ``server/central_dp.py``: clipping binds, the noise has the stated
scale, the accountant's ε matches an independent computation, and a checkpointed accountant continues the same ε
(also through the round loop, resumed after a crash, with the server's signed ledger holding each round once)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common.config import RunConfig


def _cdp(**kw):
    from server.central_dp import CentralDp

    state = kw.pop("state", None)
    population = kw.pop("population", 4)
    cfg = RunConfig(central_dp=True, **{"central_noise_multiplier": 1.0, "central_clipping_norm": 1.0,
                                        "noise_seed": 11, "delta": 1e-5, **kw})
    return CentralDp(cfg, population_size=population, state=state)


def test_clipping_binds_and_updates_are_averaged_with_equal_weights(flower) -> None:
    cdp = _cdp(central_noise_multiplier=1e-9, central_clipping_norm=0.5)
    ref = {"w": np.zeros(4, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    big = {"w": np.array([3.0, 4.0, 0, 0], dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}  # norm 5
    small = {"w": np.zeros(4, dtype=np.float32), "b": np.array([0.1, 0.0], dtype=np.float32)}  # norm 0.1
    out = cdp.aggregate([big, small], ref, server_round=1)
    # big is clipped to norm 0.5 (0.3, 0.4); small is untouched; equal weights 1/2 each
    np.testing.assert_allclose(out["w"], [0.15, 0.2, 0, 0], atol=1e-7)
    np.testing.assert_allclose(out["b"], [0.05, 0.0], atol=1e-7)
    assert cdp.last_release["noise_std"] == pytest.approx(1e-9 * 0.5 / 2) and cdp.last_release["sample_size"] == 2


def test_an_unchanged_model_is_a_valid_update_and_noise_zero_is_refused_upfront(flower) -> None:
    """Found by these tests: an all-zero update divided by its norm (ZeroDivisionError stopped the run after
    the round's ε was spent), and central-noise-multiplier=0 passed the config but Flower's accountant raised."""
    from common.config import ConfigError

    cdp = _cdp(central_noise_multiplier=1e-9)
    ref = {"w": np.ones(3, dtype=np.float32)}
    out = cdp.aggregate([{"w": np.ones(3, dtype=np.float32)}], ref, server_round=1)
    np.testing.assert_allclose(out["w"], 1.0, atol=1e-6)
    with pytest.raises(ConfigError, match="central-noise-multiplier"):
        RunConfig(central_dp=True, central_noise_multiplier=0.0)
    RunConfig(central_dp=False, central_noise_multiplier=0.0)  # irrelevant when central DP is off


@pytest.mark.parametrize(("sigma", "clip", "m"), [(1.0, 1.0, 4), (0.5, 2.0, 2), (3.0, 0.1, 5)])
def test_noise_standard_deviation_is_sigma_c_over_m(flower, sigma: float, clip: float, m: int) -> None:
    cdp = _cdp(central_noise_multiplier=sigma, central_clipping_norm=clip, population=m)
    n = 200_000
    ref = {"w": np.zeros(n, dtype=np.float32)}
    same = [{"w": np.zeros(n, dtype=np.float32)} for _ in range(m)]  # zero updates: the output is pure noise
    out = cdp.aggregate(same, ref, server_round=1)["w"].astype(np.float64)
    expected = sigma * clip / m
    assert cdp.last_release["noise_std"] == pytest.approx(expected)
    # the sample std of n normals has relative standard error 1/sqrt(2n) ~ 0.16%: allow 5 standard errors
    assert out.std() == pytest.approx(expected, rel=5 / math.sqrt(2 * n))
    assert abs(out.mean()) < 5 * expected / math.sqrt(n)


def test_noise_is_seeded_only_when_asked(flower) -> None:
    ref = {"w": np.zeros(64, dtype=np.float32)}
    upd = [{"w": np.zeros(64, dtype=np.float32)}]
    a = _cdp(noise_seed=5).aggregate(upd, ref, server_round=1)["w"]
    b = _cdp(noise_seed=5).aggregate(upd, ref, server_round=1)["w"]
    c = _cdp(noise_seed=-1).aggregate(upd, ref, server_round=1)["w"]
    d = _cdp(noise_seed=-1).aggregate(upd, ref, server_round=1)["w"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(c, d)


def _independent_epsilon(sigma: float, rounds: int, delta: float, orders) -> float:
    """ε of ``rounds`` Gaussian releases without subsampling, straight from dp_accounting (add-or-remove)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(list(orders), dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dp_accounting.GaussianDpEvent(sigma), rounds)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 1), (1.0, 5), (0.7, 3), (2.5, 10)])
def test_accounting_matches_an_independent_rdp_computation(flower, sigma: float, rounds: int) -> None:
    cdp = _cdp(central_noise_multiplier=sigma)
    ref = {"w": np.zeros(3, dtype=np.float32)}
    eps = []
    for r in range(1, rounds + 1):
        cdp.aggregate([{"w": np.ones(3, dtype=np.float32)}] * 2, ref, server_round=r)
        eps.append(cdp.epsilon())
        assert cdp.last_release["epsilon"] == eps[-1] and cdp.last_release["round"] == r
    assert eps == sorted(eps) and len(set(eps)) == len(eps)  # strictly growing
    orders = cdp.accountant._orders
    assert eps[-1] == pytest.approx(_independent_epsilon(sigma, rounds, 1e-5, orders), rel=1e-9)
    # and below the classic RDP -> (ε, δ) bound min_a [k a / (2 σ²) + log(1/δ) / (a - 1)]
    classic = min(rounds * a / (2 * sigma**2) + math.log(1 / 1e-5) / (a - 1) for a in orders if a > 1)
    assert eps[-1] <= classic + 1e-9


def test_checkpointed_accountant_continues_the_same_epsilon(flower) -> None:
    ref = {"w": np.zeros(3, dtype=np.float32)}
    upd = [{"w": np.ones(3, dtype=np.float32)}] * 2
    straight = _cdp(central_noise_multiplier=0.9)
    for r in (1, 2, 3):
        straight.aggregate(upd, ref, server_round=r)
    first = _cdp(central_noise_multiplier=0.9)
    for r in (1, 2):
        first.aggregate(upd, ref, server_round=r)
    state = json.loads(json.dumps(first.state_dict()))  # what the checkpoint stores (JSON)
    resumed = _cdp(central_noise_multiplier=0.9, state=state)
    assert resumed.epsilon() == pytest.approx(first.epsilon(), rel=1e-12)
    resumed.aggregate(upd, ref, server_round=3)
    assert resumed.epsilon() == pytest.approx(straight.epsilon(), rel=1e-12)


class CrashingGrid:
    """The scripted grid of test_selection, crashing the coordinator once at round ``crash_round``'s evaluation
    (after aggregation, before the round is committed)."""

    def __new__(cls, crash_round: int | None = None):
        from tests.test_selection import ScriptedGrid

        class _Grid(ScriptedGrid):
            def send_and_receive(self, msgs, *, timeout=None):
                msgs = list(msgs)
                if crash_round is not None and msgs and msgs[0].metadata.message_type != "train" and int(
                        msgs[0].content["config"]["server-round"]) == crash_round:
                    raise RuntimeError("coordinator crashed")
                return super().send_and_receive(msgs, timeout=timeout)

        return _Grid()


def _server_ledger(run):
    return [json.loads(x) for x in (run / "ledgers" / "server.jsonl").read_text().splitlines() if x.strip()]


def test_central_dp_run_resumes_with_its_accountant_and_ledger(tmp_path, server_task) -> None:
    from common.ledger import load_public_key, verify_ledger
    from server.loop import run_federation

    def cfg(out):
        return RunConfig(num_server_rounds=3, model="tiny", labels="negative,positive", dp=False, min_nodes=2,
                         out=str(out), central_dp=True, central_noise_multiplier=1.2, central_clipping_norm=0.05,
                         noise_seed=3)

    straight = tmp_path / "straight"
    run_federation(CrashingGrid(), cfg(straight), wait_timeout=5)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="coordinator crashed"):
        run_federation(CrashingGrid(crash_round=2), cfg(run), wait_timeout=5)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["round"] == 1 and state["central_dp"]["accountant"]
    # the crashed round's release was ledgered before its commit: the resumed run appends round 2 again,
    # and the ledger keeps both (a release happened), so the audit can count it
    run_federation(CrashingGrid(), cfg(run), wait_timeout=5)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    ref_rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    eps = [r["central_epsilon"] for r in rows]
    assert eps == sorted(eps)
    ledger = _server_ledger(run)
    res = verify_ledger(run / "ledgers" / "server.jsonl", load_public_key(run / "ledgers" / "server.pub"))
    assert res.ok, [str(p) for p in res.problems]
    assert [e["round"] for e in _server_ledger(straight)] == [1, 2, 3]
    # every committed round once in the ledger's rounds, plus the crashed round's release: its noised model
    # went out for evaluation before the crash, so it is a release and stays on record
    assert [e["round"] for e in ledger] == [1, 2, 2, 3]
    # the resumed accountant is rebuilt from the ledger: the crashed round's release counts too, so ε after
    # round 3 is above the uninterrupted run's (4 releases, not 3)
    assert eps[-1] > ref_rows[-1]["central_epsilon"]
    assert ledger[-1]["epsilon"] == pytest.approx(eps[-1], rel=1e-12)


def test_a_release_before_a_crash_is_counted_after_the_resume(tmp_path, server_task) -> None:
    from server.loop import run_federation

    def cfg(out):
        return RunConfig(num_server_rounds=3, model="tiny", labels="negative,positive", dp=False, min_nodes=2,
                         out=str(out), central_dp=True, central_noise_multiplier=1.2, central_clipping_norm=0.05,
                         noise_seed=3)

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="coordinator crashed"):
        run_federation(CrashingGrid(crash_round=2), cfg(run), wait_timeout=5)
    run_federation(CrashingGrid(), cfg(run), wait_timeout=5)
    ledger = _server_ledger(run)
    assert len(ledger) == 4
    assert ledger[-1]["epsilon"] == pytest.approx(_independent_epsilon(1.2, 4, 1e-5, _cdp().accountant._orders),
                                                  rel=1e-9)
