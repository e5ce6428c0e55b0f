"""Noised evaluation counts: the node's ε-DP release of its per-group confusion matrices.

Discrete Laplace (two-sided geometric) noise on every cell (Ghosh, Roughgarden, Sundararajan 2009). The
fairness math on the (noised or exact) counts is in :mod:`common.fairness`; the node decides what it
releases and records the spend in its ledger (:mod:`client.budget`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from common.metrics import as_confusion

ERR_EPSILON = ("epsilon must be a finite number > 0 (the privacy parameter of the count release, range (0, inf)), "
               "got {value!r}")
ERR_RNG = "rng must be a numpy.random.Generator, e.g. numpy.random.default_rng(seed); got {type}"
ERR_NOISE_SHAPE = ("with all_groups, every matrix must be (C, C) with one C, given by num_classes when there "
                   "are no matrices; got shapes {shapes} and num_classes={num_classes!r}")
ERR_UNLISTED_GROUPS = "groups {groups!r} are not in all_groups; the released group names must be public"




def _check_noise_args(epsilon: float, rng: np.random.Generator) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(ERR_EPSILON.format(value=epsilon))
    if not isinstance(rng, np.random.Generator):
        raise TypeError(ERR_RNG.format(type=type(rng).__name__))


def discrete_laplace(shape: tuple[int, ...], *, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Two-sided geometric noise, P(k) = (1 - q) / (1 + q) * q^|k| with q = exp(-epsilon), k in Z.

    Sampled as the difference of two i.i.d. geometric variables with success probability 1 - q (Ghosh,
    Roughgarden, Sundararajan 2009). Variance 2q / (1 - q)^2 (about 2 / epsilon^2 for small epsilon).
    """
    _check_noise_args(epsilon, rng)
    p = -math.expm1(-float(epsilon))  # 1 - exp(-eps), accurate for small eps
    return rng.geometric(p, size=shape).astype(np.int64) - rng.geometric(p, size=shape).astype(np.int64)


def noisy_counts(cm: np.ndarray, *, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """An epsilon-DP release of one confusion matrix.

    Neighbouring datasets differ by adding or removing one example, which changes exactly one cell by 1: the
    L1 sensitivity is 1, so adding independent discrete Laplace noise of scale 1/epsilon to every cell
    (:func:`discrete_laplace`) is epsilon-DP (Ghosh et al. 2009). Negative noisy counts are clamped to 0, which
    is post-processing and costs no privacy (it biases small counts upwards). Under replace-one neighbouring
    (one example's label or prediction changed) the sensitivity is 2 and the same release is 2*epsilon-DP.

    Parameters
    ----------
    cm : array-like of non-negative int, shape (C, C)
    epsilon : float > 0
        Privacy parameter; validated (``ERR_EPSILON``).
    rng : numpy.random.Generator
        Seeded by the caller; never numpy's global state.

    Returns
    -------
    numpy.ndarray of int64, shape (C, C), all entries >= 0
    """
    _check_noise_args(epsilon, rng)
    m = as_confusion(cm)
    return np.maximum(m + discrete_laplace(m.shape, epsilon=epsilon, rng=rng), 0)


def noisy_group_confusions(group_cms: Mapping[str, np.ndarray], *, epsilon: float, rng: np.random.Generator,
                           all_groups: Iterable[str] | None = None,
                           num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Noise every group's matrix with the same epsilon; the whole release is epsilon-DP.

    Each example is in exactly one group, so adding or removing it changes one cell of one group's matrix:
    the per-group releases act on disjoint data and compose in parallel (McSherry 2009) at the same epsilon.

    The set of group *names* is not protected by the noise: a group whose only member is added or removed
    would appear or disappear. Pass ``all_groups``, the public list of groups, to release a noised matrix for
    every listed group (zeros before noise where a group is absent) so that the key set is data-independent;
    examples in an unlisted group raise ``ValueError`` (``ERR_UNLISTED_GROUPS``). Without it, the group names
    are released as they are, outside the epsilon guarantee. ``num_classes`` gives C when ``group_cms`` is
    empty (a node with no validation examples) and ``all_groups`` is given.

    Returns
    -------
    dict of str to numpy.ndarray of int64, sorted by group name (noise is drawn in that order, so a seeded
    ``rng`` gives a reproducible release).
    """
    _check_noise_args(epsilon, rng)
    cms = {str(g): as_confusion(m) for g, m in group_cms.items()}
    if all_groups is not None:
        listed = {str(g) for g in all_groups}
        unlisted = sorted(g for g in cms if g not in listed)
        if unlisted:
            raise ValueError(ERR_UNLISTED_GROUPS.format(groups=unlisted))
        shapes = {m.shape for m in cms.values()} | ({(num_classes, num_classes)} if num_classes else set())
        if len(shapes) != 1:
            raise ValueError(ERR_NOISE_SHAPE.format(shapes=sorted(shapes), num_classes=num_classes))
        shape = shapes.pop()
        cms = {g: cms.get(g, np.zeros(shape, dtype=np.int64)) for g in listed}
    return {g: noisy_counts(cms[g], epsilon=epsilon, rng=rng) for g in sorted(cms)}
