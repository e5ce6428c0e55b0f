"""Statistics of the one-run privacy audit (Steinke, Nasr and Jagielski, NeurIPS 2023, "Privacy Auditing with
One (1) Training Run"), and the verdict fedpriv draws from them.

The auditor makes ``m`` canaries and flips a fair coin for each (in or out of the training data), trains once,
scores every canary, guesses "in" for the ``k_in`` highest scores and "out" for the ``k_out`` lowest, and
counts the correct guesses ``v`` out of ``r = k_in + k_out``. If training is (ε, δ)-DP, ``v`` cannot be much
larger than a Binomial(r, e^ε/(1+e^ε)) draw (their Theorem 5.2, which also bounds the δ part); the largest ε
this rejects at 95% confidence is an ε *lower bound*. The guarantee holds for any score, so long as the guess
counts are fixed before training and ties are not broken by membership.

Pure functions only: no training here.
"""

from __future__ import annotations

import math

import numpy as np

VERDICTS = ("pass", "fail", "inconclusive")
# Guess sizes (per side, as a fraction of the canaries) that :func:`choose_guesses` picks from, smallest first.
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.45)
# :func:`choose_guesses` wants a ceiling this far above the claim, so that a few wrong guesses can still fail it.
CEILING_MARGIN = 1.0

ERR_GUESSES = ("guesses: k_in + k_out = {r} must be between 1 and the number of canaries ({m}); "
               "got k_in={k_in}, k_out={k_out}")
ERR_CONFIDENCE = "confidence must be in (0, 1); got {value}"


def _binom_sf(v: int, r: int, q: float) -> float:
    """P[Binomial(r, q) >= v]."""
    from scipy.stats import binom  # heavy third-party import, only when the audit runs

    return float(binom.sf(v - 1, r, q))


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Probability of ``v`` or more correct guesses out of ``r`` if the mechanism is (ε, δ)-DP.

    Theorem 5.2 of Steinke et al. (2023): with ``f(u) = P[Binomial(r, p) >= u]``, ``p = e^ε / (1 + e^ε)``,
    ``P[W >= v] <= f(v) + 2 m δ max_{1 <= i <= v} (f(v - i) - f(v)) / i``.

    Parameters
    ----------
    m : int
        Number of canaries, each included independently with probability 1/2.
    r : int
        Number of guesses made (abstentions excluded), ``0 <= r <= m``.
    v : int
        Number of correct guesses, ``0 <= v <= r``.
    epsilon, delta : float
        The null hypothesis' DP parameters, ``epsilon >= 0``, ``0 <= delta <= 1``.
    """
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m; got m={m}, r={r}, v={v}")
    if epsilon < 0 or not (0.0 <= delta <= 1.0):
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1; got epsilon={epsilon}, delta={delta}")
    from scipy.stats import binom  # heavy third-party import, only when the audit runs

    p = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = _binom_sf(v, r, p)
    if delta == 0.0 or v == 0:
        return min(1.0, tail)
    # max over i of P[v - i <= B < v] / i, the cumulative sum built from the top down
    pmf = binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    ratios = np.cumsum(pmf) / np.arange(1, v + 1)
    return min(1.0, tail + 2.0 * m * delta * float(ratios.max()))


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float = 0.0, confidence: float = 0.95) -> float:
    """Largest ε that the observed ``v`` of ``r`` correct guesses rejects at ``confidence`` (0.0 if none).

    The p-value grows with ε, so the set of rejected ε is an interval [0, ε*); bisection finds ε* to 1e-6.
    """
    if not (0.0 < confidence < 1.0):
        raise ValueError(ERR_CONFIDENCE.format(value=confidence))
    alpha = 1.0 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, hi * 2.0
        if hi > 1e4:  # cannot happen for finite r (p_value -> 1 as ε grows); guard against a bad scipy
            return lo
    while hi - lo > 1e-6:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def epsilon_ceiling(m: int, r: int, *, delta: float = 0.0, confidence: float = 0.95) -> float:
    """The largest lower bound ``m`` canaries and ``r`` guesses can ever give: every guess correct.

    An audit whose ceiling is below the claimed ε cannot fail that claim, whatever the training does
    (Steinke et al. 2023, Figure 1: the one-run bound saturates with the number of guesses, and the δ term
    ``2 m δ`` caps it further as ``m`` grows).
    """
    return epsilon_lower_bound(m, r, r, delta=delta, confidence=confidence)


def choose_guesses(m: int, *, claimed_epsilon: float, delta: float, confidence: float = 0.95,
                   fractions: tuple[float, ...] = GUESS_FRACTIONS, margin: float = CEILING_MARGIN) -> int:
    """Guesses per side ``k`` (``k_in = k_out = k``) for an audit of ``claimed_epsilon``, fixed before training.

    The smallest ``k = round(f m)`` over ``fractions`` whose ceiling reaches ``claimed_epsilon + margin``: few
    guesses are the most accurate ones (the top and bottom scores), but the ceiling must leave room for a
    few wrong ones. When no size reaches it, the size with the highest ceiling. The choice depends on
    ``m``, δ and the claim only, never on the scores, so the 95% level holds as stated.
    """
    sizes = sorted({max(1, min(m // 2, round(f * m))) for f in fractions})
    ceilings = [epsilon_ceiling(m, 2 * k, delta=delta, confidence=confidence) for k in sizes]
    for k, c in zip(sizes, ceilings, strict=True):
        if c >= claimed_epsilon + margin:
            return k
    return sizes[int(np.argmax(ceilings))]


def guess_and_count(scores: np.ndarray, included: np.ndarray, *, k_in: int, k_out: int,
                    seed: int = 0) -> tuple[int, int]:
    """Guess "in" for the ``k_in`` highest scores and "out" for the ``k_out`` lowest; return (r, v).

    Ties are broken by a random order drawn from ``seed`` before the scores are looked at, never by the
    membership labels (ties are common without noise, where every excluded canary scores the same).
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if len(included) != m:
        raise ValueError(f"{m} scores but {len(included)} membership flags")
    if k_in < 0 or k_out < 0 or not (1 <= k_in + k_out <= m):
        raise ValueError(ERR_GUESSES.format(r=k_in + k_out, m=m, k_in=k_in, k_out=k_out))
    tiebreak = np.random.default_rng(seed).permutation(m)
    order = np.lexsort((tiebreak, scores))  # ascending by score, ties in the random order
    out_idx, in_idx = order[:k_out], order[m - k_in:] if k_in else order[:0]
    v = int(included[in_idx].sum()) + int((~included[out_idx]).sum())
    return k_in + k_out, v


def verdict(*, lower_bound: float, claimed: float, ceiling: float) -> str:
    """``fail`` when the lower bound exceeds the claim (the mechanism leaks more than it claims, at 95%);
    ``inconclusive`` when the ceiling is below the claim (these settings could never fail it); else ``pass``
    (no evidence against the claim: a pass does not certify privacy)."""
    if lower_bound > claimed:
        return "fail"
    if ceiling < claimed:
        return "inconclusive"
    return "pass"
