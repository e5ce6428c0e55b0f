"""Privacy accounting: ε of DP-SGD releases, noise calibration, budget checks.

Privacy unit: one record (example) of one institution's dataset, add/remove-one neighbouring. A DP-SGD release
is ``steps`` applications of the Poisson-subsampled Gaussian mechanism with sampling rate q and noise
multiplier σ (Abadi et al. 2016). Releases on the same data compose across rounds and runs; their ε at δ comes
from Opacus' accountants:

* ``"prv"`` (default): numerical composition of privacy loss random variables (Gopi, Lee, Wutschitz 2021),
  tight; Opacus returns the upper end of its error interval (estimate + ``eps_error`` = 0.01 absolute).
* ``"rdp"``: Rényi DP (Mironov 2017; Mironov, Talwar, Zhang 2019) at Opacus' default orders with the
  conversion of Balle et al. 2020; looser (typically 5-25 % above PRV), cheap, never fails numerically.

Composition rule for a node's total (documented, conservative): the DP-SGD releases compose through the
accountant, giving (ε_sgd, δ); every pure ε-DP release (noised evaluation counts, :class:`CountRelease`) adds
its ε by basic composition, so the node spends (ε_sgd + Σ ε_i, δ). Basic composition is never tighter than
the truth, so the reported total never under-states the spend.

This module is the math only (pure functions). What a node released is in its signed ledger, and the node
recomputes its spend from the whole ledger on every load (:mod:`client.budget`).

References
----------
M. Abadi et al., "Deep learning with differential privacy", CCS 2016.
I. Mironov, "Rényi differential privacy", CSF 2017.
I. Mironov, K. Talwar, L. Zhang, "Rényi differential privacy of the sampled Gaussian mechanism", 2019.
B. Balle et al., "Hypothesis testing interpretations and Rényi differential privacy", AISTATS 2020.
S. Gopi, Y. T. Lee, L. Wutschitz, "Numerical composition of differential privacy", NeurIPS 2021.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

ACCOUNTANTS = ("prv", "rdp")
PRV_EPS_ERROR = 0.01  # Opacus' default absolute error of the PRV ε; its upper bound is returned
PRV_MAX_GRID_POINTS = 20_000_000  # PRV discretisation larger than this takes > ~30 s and GBs: refuse instead
SIGMA_MAX = 10_000.0  # calibration gives up beyond this noise multiplier

ERR_DELTA = "delta must be in (0, 1); got {value!r}"
ERR_RATE = "sample_rate must be in (0, 1]; got {value!r}"
ERR_NOISE = "noise_multiplier must be a finite number >= 0; got {value!r}"
ERR_STEPS = "steps must be an integer >= 0; got {value!r}"
ERR_ACCOUNTANT = "accountant must be one of 'prv', 'rdp'; got {value!r}"
ERR_TARGET = "target_epsilon must be a finite number > 0; got {value!r}"
ERR_PRIOR_PURE = "prior_pure_epsilon must be a finite number >= 0; got {value!r}"
ERR_TOLERANCE = "epsilon_tolerance must be in (0, 0.05]; got {value!r}"
ERR_COUNT_EPS = "epsilon of a count release must be a finite number > 0; got {value!r}"
ERR_MECHANISM = "mechanism must be a non-empty string naming the noise mechanism; got {value!r}"
ERR_BUDGET = "budget must be a finite number > 0; got {value!r}"
ERR_RELEASE = "a release must be a DpSgdRelease or CountRelease; got {value!r}"
ERR_PRV_TOO_LARGE = (
    "PRV accounting of these releases needs a grid of {points:.3g} points (limit {limit:.3g}): noise too low "
    "or too many steps for an exact numerical composition (releases {history}). Use accountant='rdp' or "
    "add noise"
)
ERR_PRV_FAILED = (
    "the PRV accountant could not compute ε at δ={delta:g} for releases {history}: {reason}. "
    "Use accountant='rdp' for these parameters"
)
ERR_ALREADY_SPENT = (
    "the target ε={target:.4g} at δ={delta:g} is already used up by earlier releases (ε={spent:.4g} with "
    "accountant {accountant}); no noise level lets further training fit"
)
ERR_CANNOT_CALIBRATE = (
    "no noise multiplier up to {sigma_max:g} keeps ε <= {target:.4g} at δ={delta:g} for {steps} more steps "
    "at sample rate {rate:.4g} (earlier releases: ε={spent:.4g}); train fewer steps, or raise the budget"
)
HINT_RDP_FLOOR = (
    "; note that the RDP accountant (Opacus' orders up to {max_order:g}) cannot certify any ε below {floor:.3g} "
    "at δ={delta:g}: use accountant='prv' for small budgets"
)
# Refusal reason of check_budget; numbers are pre-formatted (2 decimals, more where needed to tell them apart).
REFUSAL = "training would spend ε={after} > budget {budget} at δ={delta:g} (spent so far {spent})"
REFUSAL_NO_DELTA = "training would spend ε={after} > budget {budget} (spent so far {spent})"


# --------------------------------------------------------------------------------------------- releases


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class DpSgdRelease:
    """``steps`` steps of the Poisson-subsampled Gaussian mechanism (one DP-SGD training release).

    Parameters
    ----------
    noise_multiplier : float
        σ, the Gaussian noise standard deviation divided by the clipping norm; >= 0 (0 = no privacy).
    sample_rate : float
        q, the Poisson sampling probability of each record per step, in (0, 1].
    steps : int
        Number of noisy optimizer steps, >= 0.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        s, q, n = self.noise_multiplier, self.sample_rate, self.steps
        if not (_is_real(s) and math.isfinite(s) and s >= 0):
            raise ValueError(ERR_NOISE.format(value=s))
        if not (_is_real(q) and 0 < q <= 1):
            raise ValueError(ERR_RATE.format(value=q))
        if not (isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0):
            raise ValueError(ERR_STEPS.format(value=n))
        # Plain Python numbers (numpy scalars would not serialise to JSON and hash differently).
        object.__setattr__(self, "noise_multiplier", float(s))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", int(n))


@dataclass(frozen=True)
class CountRelease:
    """A pure ε-DP release, e.g. evaluation counts noised with the discrete Laplace mechanism.

    Parameters
    ----------
    epsilon : float
        The release's ε (δ = 0), > 0. It adds to the node's total by basic composition.
    mechanism : str
        Name of the noise mechanism, recorded for the auditor (default ``"discrete-laplace"``).
    """

    epsilon: float
    mechanism: str = "discrete-laplace"

    def __post_init__(self) -> None:
        if not (_is_real(self.epsilon) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(ERR_COUNT_EPS.format(value=self.epsilon))
        if not (isinstance(self.mechanism, str) and self.mechanism.strip()):
            raise ValueError(ERR_MECHANISM.format(value=self.mechanism))
        object.__setattr__(self, "epsilon", float(self.epsilon))


def _check_delta(delta: Any) -> float:
    if not (_is_real(delta) and 0 < delta < 1):
        raise ValueError(ERR_DELTA.format(value=delta))
    return float(delta)


def _check_accountant(accountant: Any) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(ERR_ACCOUNTANT.format(value=accountant))
    return str(accountant)


def _as_release(r: Any) -> DpSgdRelease:
    if isinstance(r, DpSgdRelease):
        return r
    if isinstance(r, tuple | list) and len(r) == 3:  # Opacus-style (noise_multiplier, sample_rate, steps)
        return DpSgdRelease(*r)
    raise ValueError(ERR_RELEASE.format(value=r))


# --------------------------------------------------------------------------------------------- epsilon


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Silence two Opacus messages that say nothing about the value we return (this call only).

    * "Optimal order is the largest/smallest alpha": raised inside the PRV accountant's truncation-domain
      bound (a looser bound only widens the grid), and by the RDP conversion when the best order sits at the
      edge of Opacus' default grid, where the returned ε is still a valid, merely looser, upper bound.
    * numpy "divide by zero" in ``log(1 - q)`` of the PRV density at q = 1 (the branch is masked out).
    """
    import numpy as np

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Optimal order is the (largest|smallest) alpha",
                                category=UserWarning)
        with np.errstate(divide="ignore"):
            yield


def _merge(history: Sequence[Any]) -> tuple[tuple[float, float, int], ...]:
    """Active releases with identical (σ, q) merged (composition is commutative), in a canonical order."""
    merged: dict[tuple[float, float], int] = {}
    for r in map(_as_release, history):
        if r.steps > 0:
            key = (r.noise_multiplier, r.sample_rate)
            merged[key] = merged.get(key, 0) + r.steps
    return tuple(sorted((s, q, n) for (s, q), n in merged.items()))


def _fmt_history(hist: tuple[tuple[float, float, int], ...]) -> str:
    return "[" + ", ".join(f"(σ={s:.4g}, q={q:.4g}, steps={n})" for s, q, n in hist) + "]"


def _rdp_epsilon(hist: Sequence[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(hist)
    with _quiet_opacus():
        return float(acc.get_epsilon(delta=delta))


def _prv_grid_points(hist: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Size of the grid Opacus' PRV accountant will allocate (its ``_get_domain``, from public parts)."""
    delta_error = delta / 1000  # Opacus' default
    total = sum(n for _, _, n in hist)
    half_width = _rdp_epsilon(hist, delta_error / 4)
    for s, q, _ in hist:
        half_width = max(half_width, _rdp_epsilon([(s, q, 1)], delta_error / (8 * total)))
    half_width = max(half_width, PRV_EPS_ERROR) + 3
    mesh = PRV_EPS_ERROR / math.sqrt(total * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh


class _PrvTooLarge(ValueError):
    pass


@functools.lru_cache(maxsize=512)
def _epsilon(hist: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    if accountant == "rdp":
        return _rdp_epsilon(hist, delta)
    points = _prv_grid_points(hist, delta)
    if not points <= PRV_MAX_GRID_POINTS:
        raise _PrvTooLarge(ERR_PRV_TOO_LARGE.format(points=points, limit=PRV_MAX_GRID_POINTS,
                                                    history=_fmt_history(hist)))
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = list(hist)
    try:
        with _quiet_opacus():
            eps = float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    except (RuntimeError, ValueError, FloatingPointError, MemoryError) as exc:
        raise ValueError(ERR_PRV_FAILED.format(delta=delta, history=_fmt_history(hist), reason=exc)) from exc
    # The upper bound can dip below 0 when δ alone covers the release; ε is never negative.
    return max(eps, 0.0) if not math.isnan(eps) else math.inf


def compute_epsilon(history: Sequence[DpSgdRelease], *, delta: float, accountant: str = "prv") -> float:
    """ε at ``delta`` of the composition of every DP-SGD release in ``history``.

    Parameters
    ----------
    history : sequence of DpSgdRelease
        The releases on one dataset, in any order (composition is commutative). Opacus-style
        ``(noise_multiplier, sample_rate, steps)`` tuples are accepted too.
    delta : float
        Target δ, in (0, 1).
    accountant : {"prv", "rdp"}
        ``"prv"``: Gopi et al. 2021 via ``opacus.accountants.PRVAccountant``, upper bound of its ±0.01
        interval. ``"rdp"``: Mironov 2017 via ``opacus.accountants.RDPAccountant`` (default orders).

    Returns
    -------
    float
        ε (>= 0). 0.0 when no release has a step; ``inf`` when a release with steps > 0 has no noise.

    Raises
    ------
    ValueError
        Invalid parameters (the message names the parameter, range and value), or PRV cannot evaluate the
        releases (too little noise for its grid); the message suggests ``accountant="rdp"``.
    """
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    hist = _merge(history)
    if not hist:
        return 0.0
    if any(s == 0 for s, _, _ in hist):
        return math.inf
    return _epsilon(hist, delta, accountant)


def total_epsilon(history: Sequence[DpSgdRelease], count_releases: Sequence[CountRelease], *, delta: float,
                  accountant: str = "prv") -> float:
    """A node's total ε at ``delta``: DP-SGD releases through the accountant + Σ pure ε (basic composition)."""
    return compute_epsilon(history, delta=delta, accountant=accountant) + math.fsum(
        c.epsilon for c in count_releases)


# --------------------------------------------------------------------------------------------- calibration


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               accountant: str = "prv", prior_history: Sequence[DpSgdRelease] = (),
                               prior_pure_epsilon: float = 0.0, epsilon_tolerance: float = 0.01) -> float:
    """Smallest noise multiplier that keeps ``prior_history`` + ``steps`` new steps within ``target_epsilon``.

    Bracketing search on log σ (interpolation safeguarded by bisection). For PRV the bracket starts at the RDP
    solution, which is feasible for PRV in practice (PRV is the tighter accountant), so only a few PRV
    evaluations are needed.

    Parameters
    ----------
    target_epsilon : float
        ε budget for the whole history including the planned steps, > 0.
    delta : float
        δ in (0, 1).
    sample_rate : float
        Poisson sampling rate q of the planned steps, in (0, 1].
    steps : int
        Number of planned steps, >= 0 (0 returns 0.0: no noise is needed for nothing).
    accountant : {"prv", "rdp"}
        Accountant used for ε, as in :func:`compute_epsilon`.
    prior_history : sequence of DpSgdRelease
        Releases already made on the same data.
    prior_pure_epsilon : float
        ε of pure-DP releases already made (noised counts, >= 0); they add by basic composition
        (:func:`total_epsilon`), so the DP-SGD history must fit in ``target_epsilon - prior_pure_epsilon``.
    epsilon_tolerance : float
        Relative slack below the target, in (0, 0.05]: the result σ gives
        ``target * (1 - epsilon_tolerance) <= ε <= target``.

    Returns
    -------
    float
        The noise multiplier σ; ``compute_epsilon(prior_history + [DpSgdRelease(σ, q, steps)]) <= target``.

    Raises
    ------
    ValueError
        Invalid parameters; the target already spent by ``prior_history``; no σ <= ``SIGMA_MAX`` fits.
    """
    if not (_is_real(target_epsilon) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(ERR_TARGET.format(value=target_epsilon))
    if not (_is_real(epsilon_tolerance) and 0 < epsilon_tolerance <= 0.05):
        raise ValueError(ERR_TOLERANCE.format(value=epsilon_tolerance))
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    DpSgdRelease(1.0, sample_rate, steps)  # validates sample_rate and steps
    if not (_is_real(prior_pure_epsilon) and math.isfinite(prior_pure_epsilon) and prior_pure_epsilon >= 0):
        raise ValueError(ERR_PRIOR_PURE.format(value=prior_pure_epsilon))
    prior = [_as_release(r) for r in prior_history]
    target = float(target_epsilon) - float(prior_pure_epsilon)
    spent = compute_epsilon(prior, delta=delta, accountant=accountant) + float(prior_pure_epsilon)
    if spent >= float(target_epsilon) or target <= 0:
        target = float(target_epsilon)
        raise ValueError(ERR_ALREADY_SPENT.format(target=target, delta=delta, spent=spent, accountant=accountant))
    if steps == 0:
        return 0.0

    def eps(sigma: float) -> float:
        try:
            return compute_epsilon([*prior, DpSgdRelease(sigma, sample_rate, steps)], delta=delta,
                                   accountant=accountant)
        except ValueError:  # PRV cannot handle this little noise: certainly above any sane target
            if accountant == "prv":
                return math.inf
            raise

    guess = 1.0
    if accountant == "prv":
        with contextlib.suppress(ValueError):  # RDP is looser: it may find no room where PRV does
            guess = calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=sample_rate,
                                               steps=steps, accountant="rdp", prior_history=prior,
                                               epsilon_tolerance=0.05)
    def error() -> str:
        msg = ERR_CANNOT_CALIBRATE.format(sigma_max=SIGMA_MAX, target=target, delta=delta, steps=steps,
                                          rate=sample_rate, spent=spent)
        if accountant == "rdp":
            max_order, floor = _rdp_floor(delta)
            msg += HINT_RDP_FLOOR.format(max_order=max_order, floor=floor, delta=delta)
        return msg

    return _solve(eps, target=target, tolerance=float(epsilon_tolerance), guess=guess, error=error)


def _rdp_floor(delta: float) -> tuple[float, float]:
    """The smallest ε the RDP conversion can give at ``delta`` (zero RDP at every order), and the top order."""
    from opacus.accountants import RDPAccountant

    orders = RDPAccountant.DEFAULT_ALPHAS
    return max(orders), min(-(math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in orders)


def _solve(eps, *, target: float, tolerance: float, guess: float, error) -> float:
    """σ with target·(1 - tolerance) <= eps(σ) <= target for decreasing ``eps``; always a verified feasible σ.

    Secant steps on (log σ, log ε), aiming at the middle of the band, kept inside the current bracket with a
    10 % bisection safeguard so that the bracket shrinks on every step.
    """
    low_ok = target * (1 - tolerance)
    aim = target * (1 - tolerance / 2)
    lo, hi = 0.0, math.inf  # eps(lo) > target >= eps(hi)
    prev: tuple[float, float] | None = None
    slope = 2.5  # typical -d log ε / d log σ of DP-SGD; refined by secant steps
    s = guess
    for _ in range(80):
        e = eps(s)
        if e > target:
            lo = s
        else:
            hi = s
            if e >= low_ok or s < 1e-6:
                return s
        if prev is not None and math.isfinite(e) and e > 0 and math.isfinite(prev[1]) and prev[1] > 0 \
                and prev[0] != s and prev[1] != e:
            slope = min(max(-(math.log(e) - math.log(prev[1])) / (math.log(s) - math.log(prev[0])), 0.2), 50.0)
        prev = (s, e)
        cand = s * (e / aim) ** (1 / slope) if math.isfinite(e) and e > 0 else s * 2
        if lo > 0 and math.isfinite(hi):
            if hi - lo <= 1e-9 * hi:
                break
            ratio = hi / lo
            cand = min(max(cand, lo * ratio**0.1), lo * ratio**0.9)
        elif not math.isfinite(hi):  # nothing feasible yet: go up
            if s >= SIGMA_MAX:
                raise ValueError(error())
            cand = min(max(cand, s * 1.05), SIGMA_MAX)
        else:  # nothing infeasible yet: go down
            cand = min(cand, s * 0.95)
        s = cand
    if not math.isfinite(hi):  # pragma: no cover - the loop returns or raises first
        raise ValueError(error())
    return hi


# --------------------------------------------------------------------------------------------- budget


def _fmt_apart(a: float, b: float) -> tuple[str, str]:
    """Format two numbers with 2 decimals, or with as many more as it takes for them to read differently."""
    for digits in range(2, 10):
        sa, sb = f"{a:.{digits}f}", f"{b:.{digits}f}"
        if sa != sb or a == b:
            return sa, sb
    return repr(a), repr(b)


def check_budget(*, spent: float, cost_after: float, budget: float, delta: float | None = None) -> str | None:
    """Decide whether a planned release fits the budget.

    Parameters
    ----------
    spent : float
        ε spent before the release.
    cost_after : float
        ε after the release (``client.budget.NodePrivacy``); NaN counts as over budget.
    budget : float
        The node's ε budget, > 0.
    delta : float, optional
        δ at which both are measured, quoted in the refusal.

    Returns
    -------
    str or None
        None when ``cost_after <= budget``, else the refusal reason (:data:`REFUSAL`).
    """
    if not (_is_real(budget) and math.isfinite(budget) and budget > 0):
        raise ValueError(ERR_BUDGET.format(value=budget))
    if cost_after <= budget:
        return None
    after, budget_s = _fmt_apart(float(cost_after), float(budget))
    spent_s = f"{float(spent):.2f}"
    if delta is None:
        return REFUSAL_NO_DELTA.format(after=after, budget=budget_s, spent=spent_s)
    return REFUSAL.format(after=after, budget=budget_s, delta=delta, spent=spent_s)
