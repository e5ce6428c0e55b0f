"""Privacy accounting: published golden values, an independent library, calibration, budget, persistent state."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import common.privacy as privacy
from common.privacy import (
    ERR_ALREADY_SPENT,
    ERR_DELTA,
    ERR_NOISE,
    ERR_RATE,
    ERR_STEPS,
    REFUSAL,
    REFUSAL_NO_DELTA,
    CountRelease,
    DpSgdRelease,
    calibrate_noise_multiplier,
    check_budget,
    compute_epsilon,
)

DELTA = 1e-5
REL_1PCT = 0.01  # "matches within 1 %"


# --------------------------------------------------------------------------------------------- golden values


def test_opacus_published_rdp_value() -> None:
    # Source: Opacus' own test suite, opacus/tests/accountants_test.py::test_rdp_accountant (shipped in the
    # installed wheel): q=0.04, sigma=1.5, steps=int(90/0.04)=2250, delta=1e-5 -> eps = 7.32911117143.
    eps = compute_epsilon([DpSgdRelease(1.5, 0.04, int(90 / 0.04))], delta=1e-5, accountant="rdp")
    assert eps == pytest.approx(7.32911117143, rel=REL_1PCT)


def test_opacus_published_prv_value() -> None:
    # Source: opacus/tests/accountants_test.py::test_prv_accountant: q=0.04, sigma=1.5, steps=int(90//0.04)
    # (= 2249 in floating point), delta=1e-5 -> eps = 6.777395712150674.
    eps = compute_epsilon([DpSgdRelease(1.5, 0.04, int(90 // 0.04))], delta=1e-5, accountant="prv")
    assert eps == pytest.approx(6.777395712150674, rel=REL_1PCT)


# Source: opacus/tests/prv_accountant.py, table `msr_values`, "Computed from
# https://github.com/microsoft/prv_accountant" (the reference implementation of Gopi et al. 2021), delta=1e-6.
MSR_PRV = {
    (0.8, 0.001, 100): 0.270403364058018680360362395731,
    (1.5, 0.05, 100): 1.95385313568420015961635272106,
    (3.0, 0.2, 100): 3.38122051022184422208738396876,
    (1.5, 0.05, 1000): 6.20996924657726712126759593957,
    (2.0, 0.001, 20000): 0.305837939762453436820521801565,
}


@pytest.mark.parametrize(("sigma", "q", "steps"), sorted(MSR_PRV))
def test_prv_matches_microsoft_reference_values(sigma: float, q: float, steps: int) -> None:
    eps = compute_epsilon([DpSgdRelease(sigma, q, steps)], delta=1e-6, accountant="prv")
    assert eps == pytest.approx(MSR_PRV[(sigma, q, steps)], rel=REL_1PCT)


# Source: tensorflow/privacy, tutorials/README.md, "Select Parameters" table (MNIST, N=60000, batch 256,
# privacy eps reported at delta=1e-5 by mnist_dpsgd_tutorial.py's compute_epsilon: RDP orders
# [1 + x/10 for x in 1..99] + 12..63 with the 2018 conversion eps = min_a rdp(a) - log(delta)/(a - 1)).
TF_PRIVACY_MNIST = [  # (noise multiplier, epochs, published eps)
    (1.12, 60, 2.92),
    (0.6, 30, 9.74),
    (1.2, 10, 1.20),
]


@pytest.mark.parametrize(("sigma", "epochs", "published"), TF_PRIVACY_MNIST)
def test_rdp_curve_reproduces_tf_privacy_mnist_table(sigma: float, epochs: int, published: float) -> None:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    q, steps = 256 / 60000, epochs * (60000 // 256)
    orders = np.array(RDPAccountant.DEFAULT_ALPHAS)  # the same orders as the tutorial
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders))
    classic = float(np.min(rdp - math.log(DELTA) / (orders - 1)))
    # The RDP curve our "rdp" accountant uses reproduces the published number (printed with 2 decimals) ...
    assert classic == pytest.approx(published, abs=0.01)
    # ... and our ε, with the tighter conversion of Balle et al. 2020, is below it, PRV lower still.
    ours = compute_epsilon([DpSgdRelease(sigma, q, steps)], delta=DELTA, accountant="rdp")
    assert ours < classic
    assert compute_epsilon([DpSgdRelease(sigma, q, steps)], delta=DELTA, accountant="prv") < ours


def test_rdp_curve_reproduces_abadi_et_al_moments_accountant() -> None:
    # Source: Abadi et al. 2016, "Deep learning with differential privacy", Sec. 3.1: "with L = 0.01N,
    # sigma = 4, delta = 1e-5 and T = 10000, we have eps ~ 1.26 using the moments accountant" (moments
    # lambda <= 32, i.e. integer RDP orders alpha = lambda + 1 in 2..33, classic conversion).
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = np.arange(2, 34)
    rdp = compute_rdp(q=0.01, noise_multiplier=4.0, steps=10000, orders=list(orders))
    assert float(np.min(rdp - math.log(DELTA) / (orders - 1))) == pytest.approx(1.26, abs=0.005)
    ours_rdp = compute_epsilon([DpSgdRelease(4.0, 0.01, 10000)], delta=DELTA, accountant="rdp")
    ours_prv = compute_epsilon([DpSgdRelease(4.0, 0.01, 10000)], delta=DELTA, accountant="prv")
    assert ours_prv < ours_rdp < 1.26  # warnings are errors: Opacus' "largest alpha" note stays inside


# --------------------------------------------------------------------------------------------- Google dp-accounting


def _google(sigma: float, q: float, steps: int, *, kind: str) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    acc = RdpAccountant() if kind == "rdp" else PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(event)
    return float(acc.get_epsilon(DELTA))


CROSS = {  # (sigma, q, steps)
    "opacus-test": (1.5, 0.04, 2250),
    "fedpriv-node-3-rounds": (0.9, 32 / 2000, 3 * 63),
}


@pytest.mark.parametrize("name", sorted(CROSS))
def test_rdp_matches_google_rdp_within_1_percent(name: str) -> None:
    sigma, q, steps = CROSS[name]
    ours = compute_epsilon([DpSgdRelease(sigma, q, steps)], delta=DELTA, accountant="rdp")
    assert ours == pytest.approx(_google(sigma, q, steps, kind="rdp"), rel=REL_1PCT)


@pytest.mark.parametrize("name", sorted(CROSS))
def test_prv_matches_google_pld_within_2_percent(name: str) -> None:
    sigma, q, steps = CROSS[name]
    ours = compute_epsilon([DpSgdRelease(sigma, q, steps)], delta=DELTA, accountant="prv")
    pld = _google(sigma, q, steps, kind="pld")
    assert pld <= ours <= pld * 1.02  # PRV returns an upper bound (estimate + 0.01)


# --------------------------------------------------------------------------------------------- compute_epsilon


def test_composition_is_order_free_and_additive_in_steps() -> None:
    a, b = DpSgdRelease(1.0, 0.02, 50), DpSgdRelease(1.3, 0.02, 70)
    for acc in ("rdp", "prv"):
        split = compute_epsilon([a, b, a, a], delta=DELTA, accountant=acc)
        assert split == compute_epsilon([b, DpSgdRelease(1.0, 0.02, 150)], delta=DELTA, accountant=acc)
        assert split > compute_epsilon([a, b], delta=DELTA, accountant=acc)


def test_edge_cases() -> None:
    assert compute_epsilon([], delta=DELTA) == 0.0
    assert compute_epsilon([DpSgdRelease(1.0, 0.1, 0)], delta=DELTA) == 0.0
    assert compute_epsilon([DpSgdRelease(0.0, 0.1, 0)], delta=DELTA) == 0.0
    assert math.isinf(compute_epsilon([DpSgdRelease(0.0, 0.1, 5), DpSgdRelease(1.0, 0.1, 5)], delta=DELTA))
    # Full-batch (q = 1) works without numpy warnings (warnings are errors here).
    full = compute_epsilon([DpSgdRelease(5.0, 1.0, 10)], delta=DELTA)
    assert 0 < full < compute_epsilon([DpSgdRelease(5.0, 1.0, 10)], delta=DELTA, accountant="rdp")
    # numpy scalars and Opacus-style tuples are accepted and normalised.
    r = DpSgdRelease(np.float32(1.5), np.float64(0.04), np.int64(100))
    assert (type(r.noise_multiplier), type(r.steps)) == (float, int)
    assert compute_epsilon([(1.5, 0.04, 100)], delta=DELTA, accountant="rdp") == compute_epsilon(
        [r], delta=DELTA, accountant="rdp")


@pytest.mark.parametrize(("args", "message"), [
    ((-1.0, 0.1, 5), ERR_NOISE.format(value=-1.0)),
    ((math.nan, 0.1, 5), ERR_NOISE.format(value=math.nan)),
    ((1.0, 0, 5), ERR_RATE.format(value=0)),
    ((1.0, 1.5, 5), ERR_RATE.format(value=1.5)),
    ((1.0, 0.1, -1), ERR_STEPS.format(value=-1)),
    ((1.0, 0.1, 2.5), ERR_STEPS.format(value=2.5)),
    ((1.0, 0.1, True), ERR_STEPS.format(value=True)),
])
def test_release_validation_names_parameter_range_and_value(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        DpSgdRelease(*args)


@pytest.mark.parametrize("delta", [0, 1, 1.5, -1e-5, math.nan])
def test_delta_validation(delta: float) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(ERR_DELTA.format(value=delta))}$"):
        compute_epsilon([DpSgdRelease(1.0, 0.1, 5)], delta=delta)


def test_accountant_validation_and_count_release_validation() -> None:
    with pytest.raises(ValueError, match=re.escape(privacy.ERR_ACCOUNTANT.format(value="gdp"))):
        compute_epsilon([DpSgdRelease(1.0, 0.1, 5)], delta=DELTA, accountant="gdp")
    with pytest.raises(ValueError, match=re.escape(privacy.ERR_COUNT_EPS.format(value=0.0))):
        CountRelease(0.0)
    with pytest.raises(ValueError, match=re.escape(privacy.ERR_MECHANISM.format(value=""))):
        CountRelease(0.5, "")


def test_prv_refuses_grids_it_cannot_afford(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(privacy, "PRV_MAX_GRID_POINTS", 1000)
    with pytest.raises(ValueError, match=r"^PRV accounting of these releases needs a grid of .* accountant='rdp'"):
        compute_epsilon([DpSgdRelease(1.01, 0.05, 33)], delta=DELTA, accountant="prv")


# --------------------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize(("target", "accountant"), [(1.0, "rdp"), (8.0, "rdp"), (1.0, "prv"), (8.0, "prv")])
def test_calibrated_noise_meets_target_within_tolerance(target: float, accountant: str) -> None:
    q, steps = 32 / 1500, 150
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps,
                                       accountant=accountant)
    eps = compute_epsilon([DpSgdRelease(sigma, q, steps)], delta=DELTA, accountant=accountant)
    assert target * (1 - 0.01) <= eps <= target  # default epsilon_tolerance=0.01, well inside the 5 % promise
    # ... and it is (nearly) the smallest such sigma: 2 % less noise overshoots the target.
    assert compute_epsilon([DpSgdRelease(sigma * 0.98, q, steps)], delta=DELTA, accountant=accountant) > target


@settings(max_examples=12, deadline=None)
@given(target=st.floats(0.5, 20.0), q=st.floats(1e-3, 0.2), steps=st.integers(1, 2000))
def test_calibration_property_rdp(target: float, q: float, steps: int) -> None:
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps,
                                       accountant="rdp")
    eps = compute_epsilon([DpSgdRelease(sigma, q, steps)], delta=DELTA, accountant="rdp")
    assert 0.95 * target <= eps <= target


@settings(max_examples=3, deadline=None)
@given(target=st.floats(1.0, 10.0), q=st.floats(5e-3, 0.05), steps=st.integers(10, 300))
def test_calibration_property_prv(target: float, q: float, steps: int) -> None:
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps)
    eps = compute_epsilon([DpSgdRelease(sigma, q, steps)], delta=DELTA)
    assert 0.95 * target <= eps <= target


def test_calibration_accounts_for_prior_spending() -> None:
    q = 0.05
    prior = [DpSgdRelease(1.5, q, 40)]
    sigma = calibrate_noise_multiplier(target_epsilon=4.0, delta=DELTA, sample_rate=q, steps=40,
                                       accountant="rdp", prior_history=prior)
    total = compute_epsilon([*prior, DpSgdRelease(sigma, q, 40)], delta=DELTA, accountant="rdp")
    assert 0.99 * 4.0 <= total <= 4.0
    spent = compute_epsilon(prior, delta=DELTA, accountant="rdp")
    message = ERR_ALREADY_SPENT.format(target=1.0, delta=DELTA, spent=spent, accountant="rdp")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        calibrate_noise_multiplier(target_epsilon=1.0, delta=DELTA, sample_rate=q, steps=10, accountant="rdp",
                                   prior_history=prior)
    assert calibrate_noise_multiplier(target_epsilon=4.0, delta=DELTA, sample_rate=q, steps=0,
                                      accountant="rdp", prior_history=prior) == 0.0


def test_calibration_explains_targets_out_of_reach() -> None:
    with pytest.raises(ValueError, match=r"cannot certify any ε below 0\.103 at δ=1e-05: use accountant='prv'"):
        calibrate_noise_multiplier(target_epsilon=0.05, delta=DELTA, sample_rate=0.001, steps=100,
                                   accountant="rdp")
    with pytest.raises(ValueError, match=re.escape(privacy.ERR_TARGET.format(value=-1))):
        calibrate_noise_multiplier(target_epsilon=-1, delta=DELTA, sample_rate=0.1, steps=10)
    with pytest.raises(ValueError, match=re.escape(privacy.ERR_TOLERANCE.format(value=0.5))):
        calibrate_noise_multiplier(target_epsilon=1, delta=DELTA, sample_rate=0.1, steps=10, epsilon_tolerance=0.5)


# --------------------------------------------------------------------------------------------- budget


def test_budget_check_fits_and_refuses_with_reason() -> None:
    assert check_budget(spent=6.1, cost_after=7.9, budget=8.0, delta=DELTA) is None
    assert check_budget(spent=6.1, cost_after=8.0, budget=8.0, delta=DELTA) is None  # exactly at the budget
    reason = check_budget(spent=6.1, cost_after=8.4, budget=8.0, delta=DELTA)
    assert reason == REFUSAL.format(after="8.40", budget="8.00", delta=DELTA, spent="6.10")
    assert reason == "training would spend ε=8.40 > budget 8.00 at δ=1e-05 (spent so far 6.10)"
    # Values that would print alike get the digits it takes to see the difference.
    assert "ε=8.001 > budget 8.000" in check_budget(spent=7.5, cost_after=8.001, budget=8.0, delta=DELTA)
    assert check_budget(spent=1.0, cost_after=math.nan, budget=8.0) == REFUSAL_NO_DELTA.format(
        after="nan", budget="8.00", spent="1.00")
    assert "ε=inf" in check_budget(spent=0.0, cost_after=math.inf, budget=8.0, delta=DELTA)
    with pytest.raises(ValueError, match=re.escape(privacy.ERR_BUDGET.format(value=0))):
        check_budget(spent=0.0, cost_after=1.0, budget=0)


# --------------------------------------------------------------------------------------------- composition


def test_count_releases_add_by_basic_composition() -> None:
    base = compute_epsilon([DpSgdRelease(1.0, 0.05, 20)], delta=DELTA, accountant="rdp")
    total = privacy.total_epsilon([DpSgdRelease(1.0, 0.05, 20)], [CountRelease(0.5), CountRelease(0.25, "geometric")],
                                  delta=DELTA, accountant="rdp")
    assert total == pytest.approx(base + 0.75, rel=1e-12)


def test_calibration_leaves_room_for_pure_releases_already_made() -> None:
    prior = [DpSgdRelease(1.5, 0.05, 40)]
    sigma = calibrate_noise_multiplier(target_epsilon=4.0, delta=DELTA, sample_rate=0.05, steps=40, accountant="rdp",
                                       prior_history=prior, prior_pure_epsilon=1.0)
    total = privacy.total_epsilon([*prior, DpSgdRelease(sigma, 0.05, 40)], [CountRelease(1.0)], delta=DELTA,
                                  accountant="rdp")
    assert 4.0 * 0.99 <= total <= 4.0
    with pytest.raises(ValueError, match="already used up"):
        calibrate_noise_multiplier(target_epsilon=1.0, delta=DELTA, sample_rate=0.05, steps=40, accountant="rdp",
                                   prior_pure_epsilon=1.0)
    with pytest.raises(ValueError, match=re.escape(privacy.ERR_PRIOR_PURE.format(value=-1.0))):
        calibrate_noise_multiplier(target_epsilon=1.0, delta=DELTA, sample_rate=0.05, steps=40,
                                   prior_pure_epsilon=-1.0)
