"""Privacy accounting for a node: ε of DP-SGD releases, noise calibration, the persistent accountant.

Privacy unit: one record (example) of one institution's dataset, add/remove neighbouring. A DP-SGD release
is ``steps`` applications of the Poisson-subsampled Gaussian mechanism with sampling rate q and noise
multiplier σ (Abadi et al. 2016). Releases compose across rounds and runs on the same data; their ε at δ is
computed with Opacus' accountants: PRV (Gopi, Lee, Wutschitz 2021; the default, tight) or RDP
(Mironov 2017; Mironov, Talwar, Zhang 2019; looser, cheap). Pure-ε releases (noised evaluation counts) add
up by basic composition on top of the DP-SGD ε: a conservative rule that never under-states the spend.

State (what was released) lives in a small JSON file in the node's state directory so that accounting
continues across rounds in fresh processes and across runs; the math is in pure functions.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ACCOUNTANTS = ("prv", "rdp")

ERR_DELTA = "delta must be in (0, 1), got {value!r}"
ERR_RATE = "sample_rate must be in (0, 1], got {value!r}"
ERR_NOISE = "noise_multiplier must be >= 0, got {value!r}"
ERR_STEPS = "steps must be a non-negative integer, got {value!r}"
ERR_EPS_TARGET = "target_epsilon must be > 0, got {value!r}"
ERR_ACCOUNTANT = "accountant must be one of prv, rdp; got {value!r}"
ERR_ALREADY_SPENT = (
    "the budget ε={target:.4g} at δ={delta:g} is already used up by earlier releases (ε={spent:.4g}); "
    "no noise level lets further training fit"
)
ERR_CANNOT_CALIBRATE = (
    "no noise multiplier up to {sigma_max:g} keeps ε <= {target:.4g} at δ={delta:g} for {steps} steps at "
    "sample rate {rate:.4g}; train fewer rounds/epochs, use larger batches, or raise the budget"
)
ERR_STATE_MISMATCH = (
    "{file}: this accountant state was recorded with accountant={have_acc}, delta={have_delta:g}; "
    "it cannot continue with accountant={want_acc}, delta={want_delta:g} (the ε would not be comparable). "
    "Keep the node's delta and accountant fixed, or use a new state directory for a new dataset"
)
REFUSAL = (
    "refusing to train: this round would bring ε to {after:.3f} > budget {budget:.3f} at δ={delta:g} "
    "(spent so far {spent:.3f}, this round costs {cost:.3f})"
)


@dataclass(frozen=True)
class DpSgdRelease:
    """``steps`` Poisson-subsampled Gaussian steps with rate ``sample_rate`` and multiplier ``noise_multiplier``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (isinstance(self.noise_multiplier, int | float) and self.noise_multiplier >= 0
                and math.isfinite(self.noise_multiplier)):
            raise ValueError(ERR_NOISE.format(value=self.noise_multiplier))
        if not (isinstance(self.sample_rate, int | float) and 0 < self.sample_rate <= 1):
            raise ValueError(ERR_RATE.format(value=self.sample_rate))
        if not (isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 0):
            raise ValueError(ERR_STEPS.format(value=self.steps))


@dataclass(frozen=True)
class CountRelease:
    """A pure ε-DP release (e.g. discrete-Laplace noised evaluation counts)."""

    epsilon: float
    mechanism: str = "discrete-laplace"


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise ValueError(ERR_DELTA.format(value=delta))


def compute_epsilon(history: Sequence[DpSgdRelease], *, delta: float, accountant: str = "prv") -> float:
    """ε at ``delta`` of the composition of every release in ``history``.

    Returns 0.0 for an empty history and ``inf`` when any release with steps > 0 has no noise.
    """
    _check_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(ERR_ACCOUNTANT.format(value=accountant))
    active = [r for r in history if r.steps > 0]
    if not active:
        return 0.0
    if any(r.noise_multiplier == 0 for r in active):
        return math.inf
    merged: dict[tuple[float, float], int] = {}
    for r in active:  # identical mechanisms compose by adding steps
        key = (float(r.noise_multiplier), float(r.sample_rate))
        merged[key] = merged.get(key, 0) + r.steps
    hist = [(s, q, n) for (s, q), n in merged.items()]
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = hist
        return float(acc.get_epsilon(delta=delta))
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = hist
    return float(acc.get_epsilon(delta=delta, eps_error=0.01))


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               accountant: str = "prv", prior_history: Sequence[DpSgdRelease] = (),
                               epsilon_tolerance: float = 0.02, sigma_max: float = 200.0) -> float:
    """Smallest σ (to ``epsilon_tolerance`` relative precision in ε) such that ``prior_history`` plus ``steps``
    new steps at ``sample_rate`` gives ε <= ``target_epsilon``. The achieved ε is always <= target.
    """
    if not (isinstance(target_epsilon, int | float) and target_epsilon > 0):
        raise ValueError(ERR_EPS_TARGET.format(value=target_epsilon))
    DpSgdRelease(1.0, sample_rate, steps)  # validates rate and steps
    spent = compute_epsilon(prior_history, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise ValueError(ERR_ALREADY_SPENT.format(target=target_epsilon, delta=delta, spent=spent))

    def eps(sigma: float) -> float:
        return compute_epsilon([*prior_history, DpSgdRelease(sigma, sample_rate, steps)], delta=delta,
                               accountant=accountant)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > sigma_max:
            raise ValueError(ERR_CANNOT_CALIBRATE.format(sigma_max=sigma_max, target=target_epsilon, delta=delta,
                                                         steps=steps, rate=sample_rate))
    # Invariant: eps(hi) <= target < eps(lo) (eps(0) = inf). Stop once eps(hi) is within tolerance.
    for _ in range(60):
        e_hi = eps(hi)
        if e_hi >= target_epsilon * (1 - epsilon_tolerance) or hi - lo < 1e-6:
            break
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def check_budget(*, spent: float, cost_after: float, budget: float, delta: float = 0.0) -> str | None:
    """None when ``cost_after`` (ε after the planned release) fits the budget, else the refusal reason."""
    if cost_after <= budget:
        return None
    return REFUSAL.format(after=cost_after, budget=budget, delta=delta, spent=spent, cost=cost_after - spent)


class NodeAccountant:
    """Everything one node released on one dataset, persisted as JSON (atomic writes)."""

    def __init__(self, path: Path, *, accountant: str, delta: float, history: list[DpSgdRelease],
                 pure: list[CountRelease]) -> None:
        self.path = path
        self.accountant = accountant
        self.delta = delta
        self.history = history
        self.pure = pure

    @classmethod
    def load(cls, path: str | Path, *, accountant: str, delta: float) -> NodeAccountant:
        _check_delta(delta)
        if accountant not in ACCOUNTANTS:
            raise ValueError(ERR_ACCOUNTANT.format(value=accountant))
        path = Path(path)
        if not path.exists():
            return cls(path, accountant=accountant, delta=delta, history=[], pure=[])
        data = json.loads(path.read_text())
        if data["accountant"] != accountant or float(data["delta"]) != float(delta):
            raise ValueError(ERR_STATE_MISMATCH.format(file=path, have_acc=data["accountant"],
                                                       have_delta=float(data["delta"]), want_acc=accountant,
                                                       want_delta=delta))
        return cls(path, accountant=accountant, delta=delta,
                   history=[DpSgdRelease(float(s), float(q), int(n)) for s, q, n in data["history"]],
                   pure=[CountRelease(float(e), str(m)) for e, m in data.get("pure", [])])

    def epsilon(self) -> float:
        return self.epsilon_of(self.history, self.pure)

    def epsilon_of(self, history: Sequence[DpSgdRelease], pure: Sequence[CountRelease]) -> float:
        return compute_epsilon(history, delta=self.delta, accountant=self.accountant) + sum(p.epsilon for p in pure)

    def epsilon_if(self, release: DpSgdRelease | CountRelease) -> float:
        """ε after ``release``, without recording it."""
        if isinstance(release, CountRelease):
            return self.epsilon_of(self.history, [*self.pure, release])
        return self.epsilon_of([*self.history, release], self.pure)

    def commit(self, release: DpSgdRelease | CountRelease) -> None:
        if isinstance(release, CountRelease):
            self.pure.append(release)
        else:
            self.history.append(release)
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"accountant": self.accountant, "delta": self.delta,
                "history": [[r.noise_multiplier, r.sample_rate, r.steps] for r in self.history],
                "pure": [[p.epsilon, p.mechanism] for p in self.pure]}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
