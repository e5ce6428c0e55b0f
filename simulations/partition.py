"""Split one dataset across N simulated nodes: IID, Dirichlet over labels, or by group.

Every partitioner is a pure function of (labels or groups, number of nodes, seed) returning a list of index
arrays that together cover every example exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PARTITIONS = ("iid", "dirichlet", "group")


def _check_nodes(n_items: int, num_nodes: int) -> None:
    if num_nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {num_nodes}")
    if n_items < num_nodes:
        raise ValueError(f"--nodes must be between 1 and the number of examples ({n_items}), got {num_nodes}: "
                         f"cannot split {n_items} examples across {num_nodes} nodes; need at least one each")


def iid(n_items: int, num_nodes: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle and cut into near-equal parts (sizes differ by at most one)."""
    _check_nodes(n_items, num_nodes)
    perm = np.random.default_rng(seed).permutation(n_items)
    return [np.sort(p) for p in np.array_split(perm, num_nodes)]


def dirichlet(labels: Sequence[int] | np.ndarray, num_nodes: int, *, alpha: float, seed: int,
              min_size: int = 2, max_tries: int = 100) -> list[np.ndarray]:
    """Label-skewed split: for each class, node shares are drawn from Dirichlet(alpha).

    Small ``alpha`` (0.1) gives nodes dominated by one class; large ``alpha`` (100) approaches IID.
    Draws are repeated (same seeded generator) until every node has at least ``min_size`` examples.
    """
    labels = np.asarray(labels)
    _check_nodes(len(labels), num_nodes)
    if not alpha > 0:
        raise ValueError(f"--alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    min_size = min(min_size, len(labels) // num_nodes)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_nodes)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_nodes, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for node, chunk in enumerate(np.split(idx, cuts)):
                parts[node].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"could not draw a Dirichlet(alpha={alpha}) split giving every one of {num_nodes} nodes "
        f">= {min_size} examples in {max_tries} tries; raise --alpha or lower --nodes"
    )


def by_group(groups: Sequence[str], num_nodes: int, *, seed: int) -> list[np.ndarray]:
    """Each group goes to its own node(s): groups are assigned round-robin (largest first).

    With more nodes than groups, a group's examples are split IID across the nodes it owns.
    """
    groups = np.asarray([str(g) for g in groups])
    _check_nodes(len(groups), num_nodes)
    names, counts = np.unique(groups, return_counts=True)
    order = names[np.argsort(-counts, kind="stable")]
    if len(order) >= num_nodes:
        parts: list[list[int]] = [[] for _ in range(num_nodes)]
        for i, g in enumerate(order):
            parts[i % num_nodes].extend(np.flatnonzero(groups == g).tolist())
        return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    rng = np.random.default_rng(seed)
    owners: list[list[int]] = [[] for _ in order]
    for node in range(num_nodes):
        owners[node % len(order)].append(node)
    for g, nodes in zip(order, owners, strict=True):
        size = int(np.sum(groups == g))
        if size < len(nodes):  # array_split would leave a node without data
            raise ValueError(f"group {str(g)!r} has {size} examples but would be split across {len(nodes)} nodes; "
                             f"lower --nodes")
    parts = [[] for _ in range(num_nodes)]
    for g, nodes in zip(order, owners, strict=True):
        idx = rng.permutation(np.flatnonzero(groups == g))
        for node, chunk in zip(nodes, np.array_split(idx, len(nodes)), strict=True):
            parts[node].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition(kind: str, *, labels: np.ndarray, groups: Sequence[str] | None, num_nodes: int, seed: int,
              alpha: float = 1.0) -> list[np.ndarray]:
    if kind == "iid":
        return iid(len(labels), num_nodes, seed=seed)
    if kind == "dirichlet":
        return dirichlet(labels, num_nodes, alpha=alpha, seed=seed)
    if kind == "group":
        if groups is None:
            raise ValueError("--partition group needs a group column (--group-col)")
        return by_group(groups, num_nodes, seed=seed)
    raise ValueError(f"--partition must be one of {', '.join(PARTITIONS)}, got {kind!r}")
