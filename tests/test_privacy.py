"""Privacy accounting: golden values from an independent library, calibration, budget refusals, restarts."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting as dpa
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from common.privacy import (
    REFUSAL,
    CountRelease,
    DpSgdRelease,
    NodeAccountant,
    calibrate_noise_multiplier,
    check_budget,
    compute_epsilon,
)

# Published DP-SGD configurations: (sample rate, noise multiplier, steps, delta).
CONFIGS = {
    # Abadi et al. 2016 / TF-Privacy MNIST tutorial: N=60000, batch 256, sigma 1.1, 60 epochs, delta 1e-5.
    "mnist-abadi": (256 / 60000, 1.1, int(60 * 60000 / 256), 1e-5),
    # De et al. 2022-style large-batch CIFAR-10: N=50000, batch 4096, sigma 3.0, 2500 steps, delta 1e-5.
    "cifar-large-batch": (4096 / 50000, 3.0, 2500, 1e-5),
    # A federated node: 2000 examples, batch 32, sigma 0.9, 3 rounds x 1 epoch.
    "fedpriv-node": (32 / 2000, 0.9, 3 * 63, 1e-5),
}


def _google(q: float, sigma: float, steps: int, delta: float, *, kind: str) -> float:
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    acc = (rdp_privacy_accountant.RdpAccountant() if kind == "rdp"
           else pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3))
    acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rdp_matches_google_dp_accounting_within_1_percent(name: str) -> None:
    q, sigma, steps, delta = CONFIGS[name]
    ours = compute_epsilon([DpSgdRelease(sigma, q, steps)], delta=delta, accountant="rdp")
    assert ours == pytest.approx(_google(q, sigma, steps, delta, kind="rdp"), rel=0.01)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prv_matches_google_pld_within_1_percent(name: str) -> None:
    q, sigma, steps, delta = CONFIGS[name]
    ours = compute_epsilon([DpSgdRelease(sigma, q, steps)], delta=delta, accountant="prv")
    assert ours == pytest.approx(_google(q, sigma, steps, delta, kind="pld"), rel=0.01)


def test_mnist_golden_value() -> None:
    # Literature value for this configuration with RDP accounting at delta=1e-5: about 2.6
    # (TF-Privacy's compute_dp_sgd_privacy reports 2.59-2.92 depending on its RDP orders).
    q, sigma, steps, delta = CONFIGS["mnist-abadi"]
    eps = compute_epsilon([DpSgdRelease(sigma, q, steps)], delta=delta, accountant="rdp")
    assert 2.5 < eps < 2.95


def test_composition_across_rounds_equals_one_long_release() -> None:
    q, sigma, delta = 0.02, 1.0, 1e-5
    split = compute_epsilon([DpSgdRelease(sigma, q, 50)] * 3, delta=delta, accountant="rdp")
    whole = compute_epsilon([DpSgdRelease(sigma, q, 150)], delta=delta, accountant="rdp")
    assert split == pytest.approx(whole, rel=1e-12)


def test_edge_cases_and_errors() -> None:
    assert compute_epsilon([], delta=1e-5) == 0.0
    assert compute_epsilon([DpSgdRelease(0.0, 0.1, 0)], delta=1e-5) == 0.0
    assert math.isinf(compute_epsilon([DpSgdRelease(0.0, 0.1, 5)], delta=1e-5))
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\), got 1.5"):
        compute_epsilon([], delta=1.5)
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\], got 0"):
        DpSgdRelease(1.0, 0, 5)
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        DpSgdRelease(-1.0, 0.1, 5)
    with pytest.raises(ValueError, match="accountant must be one of"):
        compute_epsilon([DpSgdRelease(1.0, 0.1, 5)], delta=1e-5, accountant="gdp")


@pytest.mark.parametrize("target,accountant", [(1.0, "rdp"), (3.0, "prv"), (8.0, "prv"), (8.0, "rdp")])
def test_calibrated_noise_meets_target_within_5_percent(target: float, accountant: str) -> None:
    q, steps, delta = 32 / 1500, 150, 1e-5
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=steps,
                                       accountant=accountant)
    eps = compute_epsilon([DpSgdRelease(sigma, q, steps)], delta=delta, accountant=accountant)
    assert eps <= target
    assert eps >= 0.95 * target


def test_calibration_accounts_for_prior_spending() -> None:
    q, delta = 0.05, 1e-5
    prior = [DpSgdRelease(1.5, q, 40)]
    sigma = calibrate_noise_multiplier(target_epsilon=4.0, delta=delta, sample_rate=q, steps=40,
                                       accountant="rdp", prior_history=prior)
    total = compute_epsilon([*prior, DpSgdRelease(sigma, q, 40)], delta=delta, accountant="rdp")
    assert 0.95 * 4.0 <= total <= 4.0
    with pytest.raises(ValueError, match="already used up"):
        calibrate_noise_multiplier(target_epsilon=0.1, delta=delta, sample_rate=q, steps=10, accountant="rdp",
                                   prior_history=prior)


def test_budget_check_refuses_with_reason() -> None:
    assert check_budget(spent=6.1, cost_after=7.9, budget=8.0, delta=1e-5) is None
    reason = check_budget(spent=6.1, cost_after=8.4, budget=8.0, delta=1e-5)
    assert reason == REFUSAL.format(after=8.4, budget=8.0, delta=1e-5, spent=6.1, cost=8.4 - 6.1)
    assert "8.400 > budget 8.000" in reason and "spent so far 6.100" in reason


def test_node_accountant_continues_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "acct.json"
    rel = DpSgdRelease(1.2, 0.02, 50)
    uninterrupted = compute_epsilon([rel] * 3, delta=1e-5, accountant="rdp")
    a = NodeAccountant.load(path, accountant="rdp", delta=1e-5)
    a.commit(rel)
    a.commit(rel)
    b = NodeAccountant.load(path, accountant="rdp", delta=1e-5)  # a new process
    assert b.epsilon_if(rel) == pytest.approx(uninterrupted, rel=1e-12)
    assert len(b.history) == 2  # epsilon_if does not record
    b.commit(rel)
    assert NodeAccountant.load(path, accountant="rdp", delta=1e-5).epsilon() == pytest.approx(uninterrupted, rel=1e-12)


def test_count_releases_add_by_basic_composition(tmp_path: Path) -> None:
    a = NodeAccountant.load(tmp_path / "a.json", accountant="rdp", delta=1e-5)
    a.commit(DpSgdRelease(1.0, 0.05, 20))
    base = a.epsilon()
    a.commit(CountRelease(0.5))
    a.commit(CountRelease(0.25))
    assert a.epsilon() == pytest.approx(base + 0.75, rel=1e-12)


def test_node_accountant_refuses_mismatched_state(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    a = NodeAccountant.load(path, accountant="rdp", delta=1e-5)
    a.commit(DpSgdRelease(1.0, 0.05, 20))
    with pytest.raises(ValueError, match="cannot continue with accountant=prv"):
        NodeAccountant.load(path, accountant="prv", delta=1e-5)
    with pytest.raises(ValueError, match="delta=1e-06"):
        NodeAccountant.load(path, accountant="rdp", delta=1e-6)
