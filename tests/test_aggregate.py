"""Server-side update validation and aggregation (FedAvg here; median, trimmed mean, Krum via Flower)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from server.aggregate import (
    REJECT_DTYPE,
    REJECT_KEYS,
    REJECT_NONFINITE,
    REJECT_NORM,
    REJECT_SHAPE,
    REJECT_WEIGHT,
    Update,
    aggregate,
    fedavg,
    update_norm,
    validate_update,
)

ROBUST = ["fedmedian", "trimmed-mean", "krum"]
ALL_RULES = ["fedavg", *ROBUST]


@pytest.fixture(autouse=True)
def _flower_imported(flower):
    """The robust rules import Flower; import it once with its known import-time warning handled."""


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


GLOBAL = {"w": f32([[1.0, 2.0], [3.0, 4.0]]), "b": f32([0.5, -0.5]), "s": f32(2.0)}


def valid_update(delta: float = 0.25) -> dict[str, np.ndarray]:
    return {k: v + f32(delta) for k, v in GLOBAL.items()}


# --------------------------------------------------------------------------------------------- validation


def test_valid_update_is_accepted():
    assert validate_update(valid_update(), GLOBAL, num_examples=10) is None
    assert validate_update(valid_update(), GLOBAL, num_examples=np.int64(10)) is None
    assert validate_update(GLOBAL, GLOBAL, num_examples=1, max_update_norm=1e-9) is None  # zero update


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=repr)
def test_non_finite_values_are_rejected(bad):
    arrays = valid_update()
    arrays["w"] = arrays["w"].copy()
    arrays["w"][0, 1] = bad
    arrays["w"][1, 0] = bad
    assert validate_update(arrays, GLOBAL, num_examples=5) == REJECT_NONFINITE.format(name="w", count=2)


def test_non_finite_scalar_is_rejected():
    arrays = valid_update() | {"s": f32(np.nan)}
    assert validate_update(arrays, GLOBAL, num_examples=5) == REJECT_NONFINITE.format(name="s", count=1)


@pytest.mark.parametrize(
    ("name", "value"),
    [("w", f32([1.0, 2.0, 3.0, 4.0])), ("b", f32([[0.5, -0.5]])), ("s", f32([2.0])), ("b", f32(0.0))],
    ids=["flattened", "extra-axis", "scalar-as-1d", "vector-as-scalar"],
)
def test_wrong_shape_is_rejected(name, value):
    arrays = valid_update() | {name: value}
    assert validate_update(arrays, GLOBAL, num_examples=5) == REJECT_SHAPE.format(
        name=name, got=value.shape, expected=GLOBAL[name].shape)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_wrong_dtype_is_rejected(dtype):
    arrays = valid_update() | {"b": GLOBAL["b"].astype(dtype)}
    assert validate_update(arrays, GLOBAL, num_examples=5) == REJECT_DTYPE.format(name="b", got=np.dtype(dtype).name)


def test_missing_and_extra_tensors_are_rejected():
    arrays = {k: v for k, v in valid_update().items() if k != "b"}
    assert validate_update(arrays, GLOBAL, num_examples=5) == REJECT_KEYS.format(missing=["b"], extra=[])
    arrays = valid_update() | {"zz": f32(1.0), "aa": f32(1.0)}
    assert validate_update(arrays, GLOBAL, num_examples=5) == REJECT_KEYS.format(missing=[], extra=["aa", "zz"])


@pytest.mark.parametrize("n", [0, -3, 2.0, 1.5, True, "10", None, np.float32(4)], ids=repr)
def test_num_examples_must_be_a_positive_int(n):
    assert validate_update(valid_update(), GLOBAL, num_examples=n) == REJECT_WEIGHT.format(value=n)


def test_update_norm_bound_binds():
    arrays = valid_update(0.25)  # 7 coordinates moved by 0.25: norm = 0.25 * sqrt(7) = 0.6614
    norm = 0.25 * np.sqrt(7)
    assert update_norm(arrays, GLOBAL) == pytest.approx(norm, rel=1e-12)
    assert validate_update(arrays, GLOBAL, num_examples=5, max_update_norm=0.6) == REJECT_NORM.format(
        norm=update_norm(arrays, GLOBAL), bound=0.6)
    assert validate_update(arrays, GLOBAL, num_examples=5, max_update_norm=0.67) is None
    assert validate_update(arrays, GLOBAL, num_examples=5, max_update_norm=0.0) is None  # 0 = no bound


def test_update_norm_is_measured_against_the_global_model():
    # large weights, small change: the bound applies to the change, not to the weights
    big = {"w": f32(np.full((100,), 1000.0))}
    moved = {"w": big["w"] + f32(0.01)}
    assert validate_update(moved, big, num_examples=1, max_update_norm=0.2) is None


# --------------------------------------------------------------------------------------------- fedavg


def test_fedavg_weights_by_examples_exactly():
    a = {"w": f32([1.0, -2.0, 0.5]), "s": f32(1.0)}
    b = {"w": f32([3.0, 2.0, 0.25]), "s": f32(-1.0)}
    c = {"w": f32([0.0, 0.0, 8.0]), "s": f32(5.0)}
    out = fedavg([Update("a", a, 1), Update("b", b, 3), Update("c", c, 4)])
    # by hand: (1*a + 3*b + 4*c) / 8
    assert np.array_equal(out["w"], f32([(1 + 9 + 0) / 8, (-2 + 6 + 0) / 8, (0.5 + 0.75 + 32) / 8]))
    assert np.array_equal(out["s"], f32((1 - 3 + 20) / 8))
    assert out["s"].shape == () and all(v.dtype == np.float32 for v in out.values())


def test_fedavg_equal_weights_is_the_mean():
    rng = np.random.default_rng(0)
    ups = [Update(f"n{i}", {"w": f32(rng.normal(size=(3, 4)))}, 7) for i in range(5)]
    expected = np.mean([u.arrays["w"].astype(np.float64) for u in ups], axis=0).astype(np.float32)
    np.testing.assert_allclose(fedavg(ups)["w"], expected, rtol=0, atol=1e-6)


def test_fedavg_needs_updates():
    with pytest.raises(ValueError, match="no updates to aggregate"):
        fedavg([])


# --------------------------------------------------------------------------------------------- all rules


def random_updates(n: int, seed: int = 0) -> list[Update]:
    rng = np.random.default_rng(seed)
    return [Update(f"node-{i}", {"w": f32(rng.normal(size=(2, 3))), "b": f32(rng.normal(size=(3,))),
                                 "s": f32(rng.normal())}, int(rng.integers(1, 50))) for i in range(n)]


@pytest.mark.parametrize("kind", ALL_RULES)
def test_aggregate_is_order_independent(kind):
    ups = random_updates(5)
    first = aggregate(kind, ups, trim_beta=0.2)
    for perm in itertools.islice(itertools.permutations(ups), 1, 24, 5):
        again = aggregate(kind, list(perm), trim_beta=0.2)
        assert all(np.array_equal(first[k], again[k]) for k in first), kind


@pytest.mark.parametrize("kind", ALL_RULES)
def test_aggregate_keeps_names_shapes_dtype_and_scalars(kind):
    ups = random_updates(5)
    out = aggregate(kind, ups)
    assert set(out) == {"w", "b", "s"}
    for k, v in out.items():
        assert v.shape == ups[0].arrays[k].shape, (kind, k)
        assert v.dtype == np.float32
    assert out["s"].shape == ()


@pytest.mark.parametrize("kind", ALL_RULES)
def test_all_zero_updates_aggregate_to_zero(kind):
    ups = [Update(f"n{i}", {"w": np.zeros((2, 2), np.float32), "s": f32(0.0)}, i + 1) for i in range(4)]
    out = aggregate(kind, ups)
    assert np.array_equal(out["w"], np.zeros((2, 2), np.float32)) and np.array_equal(out["s"], f32(0.0))


@pytest.mark.parametrize("kind", ALL_RULES)
def test_identical_updates_aggregate_to_themselves(kind):
    arrays = {"w": f32([[0.1, -7.25], [3.0, 1e-3]]), "s": f32(-0.3)}
    out = aggregate(kind, [Update(f"n{i}", dict(arrays), 3 + i) for i in range(3)])
    for k in arrays:
        np.testing.assert_allclose(out[k], arrays[k], rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ROBUST)
def test_robust_rules_need_updates(kind):
    with pytest.raises(ValueError, match=f"{kind} aggregation returned no model"):
        aggregate(kind, [])


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        aggregate("mean", random_updates(2))


# --------------------------------------------------------------------------------------------- robust rules

# Crafted values are small multiples of 1/4, so every sum and mean below is exact in float32.
COLUMNS = f32([
    [1.0, 10.0, -2.0, 0.0],
    [2.0, -1.0, -2.0, 0.25],
    [3.0, 0.5, 100.0, 0.5],  # an outlier in column 2
    [4.0, 0.25, -1.0, 0.75],
    [1000.0, 0.0, -3.0, 1.0],  # an outlier in column 0
])


def column_updates() -> list[Update]:
    # the weights differ wildly: the robust rules must ignore them
    return [Update(f"n{i}", {"w": row.copy(), "s": f32(row[0])}, 1 + 100 * i) for i, row in enumerate(COLUMNS)]


def test_fedmedian_is_coordinate_wise_median():
    out = aggregate("fedmedian", column_updates())
    assert np.array_equal(out["w"], f32([3.0, 0.25, -2.0, 0.5]))
    assert np.array_equal(out["s"], f32(3.0))


def test_fedmedian_even_count_averages_the_middle_two():
    out = aggregate("fedmedian", column_updates()[:4])
    assert np.array_equal(out["w"], f32([2.5, 0.375, -1.5, 0.375]))


def test_trimmed_mean_cuts_beta_from_each_end():
    # beta = 0.2 of 5 nodes: one value cut from each end of every coordinate, the middle 3 averaged
    out = aggregate("trimmed-mean", column_updates(), trim_beta=0.2)
    srt = np.sort(COLUMNS.astype(np.float64), axis=0)
    expected = f32(srt[1:4].mean(axis=0))
    assert np.array_equal(out["w"], expected)
    assert np.array_equal(out["w"], f32([3.0, 0.25, -5.0 / 3.0, 0.5]))
    # beta = 0: the plain (unweighted) mean
    out0 = aggregate("trimmed-mean", column_updates(), trim_beta=0.0)
    np.testing.assert_allclose(out0["w"], COLUMNS.astype(np.float64).mean(axis=0), rtol=1e-7)


def krum_choice(points: np.ndarray, f: int) -> int:
    """Blanchard et al. 2017: the point with the least sum of squared distances to its n - f - 2 nearest."""
    n = len(points)
    d2 = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    scores = [np.sort(np.delete(d2[i], i))[: n - f - 2].sum() for i in range(n)]
    assert len(set(scores)) == n, "crafted input must not tie"
    return int(np.argmin(scores))


@pytest.mark.parametrize("f", [0, 1, 2])
def test_krum_returns_the_krum_choice(f):
    rng = np.random.default_rng(3)
    honest = rng.normal(0.0, 0.1, size=(5, 4))
    attackers = rng.normal(0.0, 0.1, size=(2, 4)) + np.array([50.0, -50.0, 50.0, -50.0])
    points = f32(np.vstack([honest, attackers]))
    ups = [Update(f"n{i}", {"w": points[i].copy()}, 10 + i) for i in range(len(points))]
    chosen = krum_choice(points.astype(np.float64), f)
    assert chosen < 5  # an honest node
    out = aggregate("krum", ups, krum_byzantine=f)
    assert np.array_equal(out["w"], points[chosen])  # Krum returns one node's update unchanged
