"""Independent ε recomputation for auditors: four accountants agree, PLD is accurate and fast, inputs checked."""

from __future__ import annotations

import ast
import logging
import math
import re
import time
from pathlib import Path

import pytest

import audit.accounting as audit_accounting
from audit.accounting import METHODS, AccountingError, pld_interval, recompute_epsilon

DELTA = 1e-5

CONFIGS = {  # name: (history, delta)
    # Opacus' own test configuration (opacus/tests/accountants_test.py).
    "opacus-test": ([(1.5, 0.04, 2250)], 1e-5),
    # Abadi et al. 2016, Sec. 3.1 (q = 0.01, sigma = 4, T = 10000).
    "abadi": ([(4.0, 0.01, 10000)], 1e-5),
    # A fedpriv node: 2000 examples, batch 32, 3 rounds of one epoch, then a round with more noise.
    "fedpriv-node": ([(0.9, 32 / 2000, 63)] * 3 + [(1.2, 32 / 2000, 63)], 1e-5),
}


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, float]]:
    return {name: recompute_epsilon(h, delta=d) for name, (h, d) in CONFIGS.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_four_accountants_agree(results, name: str) -> None:
    r = results[name]
    assert set(r) == set(METHODS) and all(math.isfinite(v) and v > 0 for v in r.values())
    # The two RDP implementations use different order grids: same value within 1 %.
    assert r["opacus_rdp"] == pytest.approx(r["dp_accounting_rdp"], rel=0.01)
    # PRV (upper bound, estimate + 0.01) and PLD (pessimistic) are both near-exact: within 2 %.
    assert r["dp_accounting_pld"] <= r["opacus_prv"] <= r["dp_accounting_pld"] * 1.02 + 0.01
    # RDP is the loosest.
    assert r["opacus_prv"] < r["opacus_rdp"]


def test_published_values(results) -> None:
    # Source: Opacus opacus/tests/accountants_test.py::test_rdp_accountant -> 7.32911117143 (RDP, delta 1e-5).
    assert results["opacus-test"]["opacus_rdp"] == pytest.approx(7.32911117143, rel=0.01)
    # Source: opacus/tests/prv_accountant.py `msr_values`, computed with Microsoft's prv_accountant
    # (Gopi et al. 2021): sigma=1.5, q=0.05, 1000 steps, delta=1e-6 -> eps = 6.20996924657726712.
    r = recompute_epsilon([(1.5, 0.05, 1000)], delta=1e-6)
    assert r["opacus_prv"] == pytest.approx(6.20996924657726712, rel=0.01)
    assert r["dp_accounting_pld"] == pytest.approx(6.20996924657726712, rel=0.01)


def test_training_path_and_audit_agree_on_opacus_values(results) -> None:
    from common.privacy import DpSgdRelease, compute_epsilon

    history, delta = CONFIGS["fedpriv-node"]
    releases = [DpSgdRelease(*h) for h in history]
    assert compute_epsilon(releases, delta=delta, accountant="prv") == pytest.approx(
        results["fedpriv-node"]["opacus_prv"], rel=1e-9)
    assert compute_epsilon(releases, delta=delta, accountant="rdp") == pytest.approx(
        results["fedpriv-node"]["opacus_rdp"], rel=1e-9)


def test_pld_discretisation_is_within_1_percent_of_a_fine_reference(results) -> None:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    history, delta = CONFIGS["abadi"]  # here a fixed interval of 1e-3 would be 1.4 % too high
    s, q, n = history[0]
    interval = pld_interval(results["abadi"]["dp_accounting_rdp"], n)
    fine = PLDAccountant(value_discretization_interval=interval / 8)
    fine.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n))
    reference = fine.get_epsilon(delta)
    assert reference <= results["abadi"]["dp_accounting_pld"] <= reference * 1.01


def test_about_1000_steps_take_well_under_a_few_seconds() -> None:
    recompute_epsilon([(1.0, 0.01, 10)], delta=DELTA)  # imports out of the way
    start = time.perf_counter()
    r = recompute_epsilon([(1.0, 0.01, 1000)], delta=DELTA)
    elapsed = time.perf_counter() - start
    assert r["dp_accounting_pld"] == pytest.approx(1.8282, rel=0.01)  # fine-grid PLD of this configuration
    assert elapsed < 5.0, f"{elapsed:.2f} s"  # measured ~0.5 s on 2 CPU cores


def test_edge_cases() -> None:
    assert recompute_epsilon([], delta=DELTA) == dict.fromkeys(METHODS, 0.0)
    assert recompute_epsilon([(1.0, 0.1, 0)], delta=DELTA) == dict.fromkeys(METHODS, 0.0)
    assert recompute_epsilon([(0.0, 0.1, 5), (1.0, 0.1, 5)], delta=DELTA) == dict.fromkeys(METHODS, math.inf)
    # Identical mechanisms compose by adding steps.
    assert recompute_epsilon([(1.2, 0.05, 20)] * 3, delta=DELTA) == recompute_epsilon([(1.2, 0.05, 60)],
                                                                                     delta=DELTA)


@pytest.mark.parametrize(("history", "delta", "message"), [
    ([(1.0, 0.0, 5)], DELTA, audit_accounting.ERR_HISTORY.format(i=0, value=(1.0, 0.0, 5))),
    ([(1.0, 0.1, 5), (-1.0, 0.1, 5)], DELTA, audit_accounting.ERR_HISTORY.format(i=1, value=(-1.0, 0.1, 5))),
    ([(1.0, 0.1)], DELTA, audit_accounting.ERR_HISTORY.format(i=0, value=(1.0, 0.1))),
    ([(1.0, 0.1, 2.5)], DELTA, audit_accounting.ERR_HISTORY.format(i=0, value=(1.0, 0.1, 2.5))),
    ([(1.0, 0.1, 5)], 0.0, audit_accounting.ERR_DELTA.format(value=0.0)),
])
def test_inputs_are_validated(history: list, delta: float, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        recompute_epsilon(history, delta=delta)


def test_a_failing_accountant_is_named_or_reported_as_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    from opacus.accountants import PRVAccountant

    def broken(self, delta, **kwargs):
        raise RuntimeError("Cannot compute epsilon")

    monkeypatch.setattr(PRVAccountant, "get_epsilon", broken)
    with pytest.raises(AccountingError, match=r"^opacus_prv could not compute ε at δ=1e-05 for .*Cannot compute"):
        recompute_epsilon([(1.0, 0.02, 100)], delta=DELTA)
    r = recompute_epsilon([(1.0, 0.02, 100)], delta=DELTA, on_error="nan")
    assert math.isnan(r["opacus_prv"]) and all(math.isfinite(r[m]) for m in METHODS if m != "opacus_prv")


def test_library_noise_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    # dp_accounting logs each RDP order it drops; Opacus warns about edge orders (warnings are errors here).
    absl = logging.getLogger("absl")
    filters = list(absl.filters)
    with caplog.at_level(logging.WARNING):
        r = recompute_epsilon([(0.8, 0.05, 1000)], delta=1e-6)
    assert not [rec for rec in caplog.records if "failed to converge" in rec.getMessage()]
    assert absl.filters == filters  # nothing left behind
    assert r["dp_accounting_pld"] == pytest.approx(19.515, rel=0.01)  # fine-grid PLD of this configuration


def test_shares_no_code_with_the_training_path() -> None:
    source = Path(audit_accounting.__file__).read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not any(m == "common" or m.startswith(("common.", "client", "server", "fedpriv")) for m in imported)
