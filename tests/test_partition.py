"""Simulation helpers: IID / Dirichlet / by-group partitions and the synthetic demo dataset."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.partition import by_group, dirichlet, iid, partition
from simulations.synthetic import GROUPS, LABELS, NEGATIVE, NEUTRAL, POSITIVE, make_synthetic

# Label skew statistic: mean over nodes of the total-variation distance between a node's label distribution
# and the pooled one (0 = every node looks like the pool, 1 - 1/C at most).
SKEWED_TV = 0.40  # Dirichlet(0.1), 4 balanced classes, 5 nodes: measured 0.51..0.69 over seeds 0..9
NEAR_IID_TV = 0.08  # Dirichlet(100): measured 0.02..0.04
# Synthetic data: binomial rates over ~1600-2400 examples have a standard error <= 0.0125; 0.05 is 4 SE.
RATE_TOL = 0.05


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.size == n, "an example is missing or duplicated"
    assert np.array_equal(np.sort(joined), np.arange(n))
    assert all(p.dtype.kind == "i" for p in parts)


def mean_tv(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    classes = np.unique(labels)
    pooled = np.array([np.mean(labels == c) for c in classes])
    return float(np.mean([0.5 * np.abs(np.array([np.mean(labels[p] == c) for c in classes]) - pooled).sum()
                          for p in parts]))


# --------------------------------------------------------------------------------------------- iid


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), data=st.data())
def test_iid_covers_once_with_sizes_within_one(n, data):
    nodes = data.draw(st.integers(1, n))
    parts = iid(n, nodes, seed=data.draw(st.integers(0, 2**32 - 1)))
    assert len(parts) == nodes
    assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_seeded():
    a, b, c = iid(100, 4, seed=3), iid(100, 4, seed=3), iid(100, 4, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(("n", "nodes", "match"), [(3, 4, "cannot split 3 examples across 4 nodes"),
                                                   (10, 0, "--nodes must be >= 1, got 0")])
def test_iid_node_count_errors(n, nodes, match):
    with pytest.raises(ValueError, match=match):
        iid(n, nodes, seed=0)


# --------------------------------------------------------------------------------------------- dirichlet


@settings(max_examples=40, deadline=None)
@given(nodes=st.integers(1, 5), classes=st.integers(2, 4), alpha=st.sampled_from([0.3, 1.0, 10.0]),
       seed=st.integers(0, 1000), data=st.data())
def test_dirichlet_covers_once_and_respects_min_size(nodes, classes, alpha, seed, data):
    # >= 20 examples per node: a split with every node >= 2 is then likely enough per draw (no endless retries)
    n = data.draw(st.integers(20 * nodes, 300))
    labels = np.arange(n) % classes
    parts = dirichlet(labels, nodes, alpha=alpha, seed=seed, min_size=2, max_tries=1000)
    assert len(parts) == nodes
    assert_exact_cover(parts, n)
    assert min(len(p) for p in parts) >= 2


def test_small_alpha_skews_labels_more_than_large_alpha():
    labels = np.repeat(np.arange(4), 500)
    for seed in range(5):
        skewed = mean_tv(labels, dirichlet(labels, 5, alpha=0.1, seed=seed))
        near_iid = mean_tv(labels, dirichlet(labels, 5, alpha=100.0, seed=seed))
        assert skewed > SKEWED_TV, (seed, skewed)
        assert near_iid < NEAR_IID_TV, (seed, near_iid)


def test_dirichlet_is_seeded():
    labels = np.repeat(np.arange(3), 50)
    a = dirichlet(labels, 3, alpha=0.5, seed=1)
    b = dirichlet(labels, 3, alpha=0.5, seed=1)
    c = dirichlet(labels, 3, alpha=0.5, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_min_size_larger_than_feasible_is_reported():
    labels = np.repeat(np.arange(2), 50)
    with pytest.raises(ValueError, match=r"could not draw a Dirichlet\(alpha=0\.01\) split .* >= 20 examples"):
        dirichlet(labels, 5, alpha=0.01, seed=0, min_size=20, max_tries=3)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")], ids=repr)
def test_dirichlet_bad_alpha(alpha):
    with pytest.raises(ValueError, match=f"--alpha must be > 0, got {alpha}"):
        dirichlet(np.zeros(10), 2, alpha=alpha, seed=0)


def test_dirichlet_too_many_nodes():
    with pytest.raises(ValueError, match="cannot split 4 examples across 5 nodes"):
        dirichlet(np.zeros(4), 5, alpha=1.0, seed=0)


# --------------------------------------------------------------------------------------------- by group


def group_sets(groups: np.ndarray, parts: list[np.ndarray]) -> list[set[str]]:
    return [set(groups[p].tolist()) for p in parts]


def test_by_group_keeps_groups_whole_when_nodes_are_few():
    groups = np.array(["a"] * 50 + ["b"] * 30 + ["c"] * 20 + ["d"] * 5)
    parts = by_group(groups, 2, seed=0)
    assert_exact_cover(parts, len(groups))
    sets = group_sets(groups, parts)
    assert sets[0].isdisjoint(sets[1])  # no group on two nodes
    assert sets == [{"a", "c"}, {"b", "d"}]  # round-robin, largest first


def test_by_group_gives_each_node_one_group_when_nodes_are_many():
    groups = np.array(["north"] * 60 + ["south"] * 40)
    parts = by_group(groups, 5, seed=0)
    assert_exact_cover(parts, len(groups))
    sets = group_sets(groups, parts)
    assert all(len(s) == 1 for s in sets)
    assert [s.pop() for s in sets] == ["north", "south", "north", "south", "north"]
    north = [len(p) for p in parts[0::2]]
    assert max(north) - min(north) <= 1  # a group's examples are split evenly over its nodes


def test_by_group_is_seeded():
    groups = np.array(["a"] * 20 + ["b"] * 20)
    a, b = by_group(groups, 4, seed=1), by_group(groups, 4, seed=1)
    c = by_group(groups, 4, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_by_group_too_many_nodes_for_a_small_group():
    groups = np.array(["big"] * 10 + ["tiny"])
    with pytest.raises(ValueError, match="group 'tiny' has 1 examples but would be split across 2 nodes"):
        by_group(groups, 4, seed=0)
    with pytest.raises(ValueError, match="cannot split 11 examples across 12 nodes"):
        by_group(groups, 12, seed=0)


def test_partition_dispatch():
    labels = np.arange(20) % 2
    groups = ["a"] * 10 + ["b"] * 10
    assert_exact_cover(partition("iid", labels=labels, groups=None, num_nodes=3, seed=0), 20)
    assert_exact_cover(partition("dirichlet", labels=labels, groups=None, num_nodes=3, seed=0, alpha=5.0), 20)
    assert_exact_cover(partition("group", labels=labels, groups=groups, num_nodes=2, seed=0), 20)
    with pytest.raises(ValueError, match="needs a group column"):
        partition("group", labels=labels, groups=None, num_nodes=2, seed=0)
    with pytest.raises(ValueError, match="--partition must be one of iid, dirichlet, group, got 'random'"):
        partition("random", labels=labels, groups=None, num_nodes=2, seed=0)


# --------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_by_seed():
    a, b, c = make_synthetic(200, seed=5), make_synthetic(200, seed=5), make_synthetic(200, seed=6)
    assert a.texts == b.texts and np.array_equal(a.labels, b.labels) and a.groups == b.groups
    assert a.texts != c.texts
    assert a.label_names == LABELS and set(a.groups) <= set(GROUPS)
    assert a.labels.dtype == np.int64 and len(a) == 200


@pytest.mark.parametrize("skew", [0.0, 0.4, 0.8])
def test_synthetic_label_skew_per_group(skew):
    ds = make_synthetic(4000, seed=0, label_skew=skew, south_share=0.4)
    groups = np.asarray(ds.groups)
    rate = {g: float(ds.labels[groups == g].mean()) for g in GROUPS}
    assert rate["north"] == pytest.approx(0.5 + skew / 2, abs=RATE_TOL)
    assert rate["south"] == pytest.approx(0.5 - skew / 2, abs=RATE_TOL)
    assert float(np.mean(groups == "south")) == pytest.approx(0.4, abs=RATE_TOL)


def test_synthetic_noise_only_in_south_and_words_decide_the_rest():
    ds = make_synthetic(4000, seed=1, south_noise=0.25)
    words = [set(t.replace(",", "").split()) for t in ds.texts]
    neutral = np.array([bool(w & set(NEUTRAL)) for w in words])
    groups = np.asarray(ds.groups)
    assert not neutral[groups == "north"].any()
    assert float(neutral[groups == "south"].mean()) == pytest.approx(0.25, abs=RATE_TOL)
    for w, y, amb in zip(words, ds.labels.tolist(), neutral.tolist(), strict=True):
        if not amb:
            assert w & set(POSITIVE if y else NEGATIVE), "a non-ambiguous example must carry its label's word"
            assert not w & set(NEGATIVE if y else POSITIVE)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n must be >= 1, got 0"),
        ({"n": 10, "label_skew": 1.0}, r"label_skew must be in \[0, 1\), got 1.0"),
        ({"n": 10, "label_skew": -0.1}, r"label_skew must be in \[0, 1\), got -0.1"),
        ({"n": 10, "south_noise": 1.5}, r"south_noise must be in \[0, 1\], got 1.5"),
        ({"n": 10, "south_share": 0.0}, r"south_share must be in \(0, 1\), got 0.0"),
        ({"n": 10, "south_share": 1.0}, r"south_share must be in \(0, 1\), got 1.0"),
    ],
)
def test_synthetic_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic(**kwargs)
