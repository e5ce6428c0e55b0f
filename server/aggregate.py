"""Validate node updates and aggregate them.

Validation (before anything is averaged): the reply must carry exactly the expected tensor names, each with
the expected shape, a float32 dtype, only finite values, and (optionally) an update norm
``||new - global||_2`` within a bound. Rejected replies are recorded, never aggregated.

Aggregation works on the validated updates in a fixed order (sorted by node name) so that a run is
reproducible: FedAvg weighted by training examples (McMahan et al. 2017), coordinate-wise median
(Yin et al. 2018), trimmed mean (Yin et al. 2018), or Krum (Blanchard et al. 2017). The robust rules call
Flower's own implementations in ``flwr.serverapp.strategy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.model import from_array_record, to_array_record

REJECT_KEYS = "tensor names differ from the global model: missing {missing}, unexpected {extra}"
REJECT_SHAPE = "tensor {name!r} has shape {got}, expected {expected}"
REJECT_DTYPE = "tensor {name!r} has dtype {got}, expected float32"
REJECT_NONFINITE = "tensor {name!r} holds {count} NaN/Inf values"
REJECT_NORM = "update norm {norm:.4g} exceeds max-update-norm {bound:.4g}"
REJECT_WEIGHT = "num-examples must be a positive integer, got {value!r}"


@dataclass
class Update:
    node: str
    arrays: dict[str, np.ndarray]
    num_examples: int


def validate_update(arrays: dict[str, np.ndarray], global_arrays: dict[str, np.ndarray], *,
                    num_examples: object, max_update_norm: float = 0.0) -> str | None:
    """Return None when the update is acceptable, else the reason it is rejected."""
    if not isinstance(num_examples, int | np.integer) or isinstance(num_examples, bool) or int(num_examples) <= 0:
        return REJECT_WEIGHT.format(value=num_examples)
    missing = sorted(set(global_arrays) - set(arrays))
    extra = sorted(set(arrays) - set(global_arrays))
    if missing or extra:
        return REJECT_KEYS.format(missing=missing[:5], extra=extra[:5])
    sq = 0.0
    for name, ref in global_arrays.items():
        a = arrays[name]
        if a.shape != ref.shape:
            return REJECT_SHAPE.format(name=name, got=tuple(a.shape), expected=tuple(ref.shape))
        if a.dtype != np.float32:
            return REJECT_DTYPE.format(name=name, got=str(a.dtype))
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        if bad:
            return REJECT_NONFINITE.format(name=name, count=bad)
        d = a.astype(np.float64) - ref.astype(np.float64)
        sq += float(np.dot(d.ravel(), d.ravel()))
    norm = float(np.sqrt(sq))
    if max_update_norm > 0 and norm > max_update_norm:
        return REJECT_NORM.format(norm=norm, bound=max_update_norm)
    return None


def fedavg(updates: list[Update]) -> dict[str, np.ndarray]:
    """Example-weighted mean, accumulated in float64, returned as float32."""
    if not updates:
        raise ValueError("no updates to aggregate")
    total = float(sum(u.num_examples for u in updates))
    out: dict[str, np.ndarray] = {}
    for name in updates[0].arrays:
        acc = np.zeros(updates[0].arrays[name].shape, dtype=np.float64)
        for u in updates:
            acc += u.arrays[name].astype(np.float64) * (u.num_examples / total)
        out[name] = acc.astype(np.float32)
    return out


def _flower_aggregate(kind: str, updates: list[Update], *, trim_beta: float, krum_byzantine: int):
    """Run one of Flower's robust strategies' ``aggregate_train`` on the validated updates."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum


    if kind == "fedmedian":
        strategy = FedMedian()
    elif kind == "trimmed-mean":
        strategy = FedTrimmedAvg(beta=trim_beta)
    elif kind == "krum":
        strategy = Krum(num_malicious_nodes=krum_byzantine)
    else:
        raise ValueError(f"unknown aggregation {kind!r}")
    replies = []
    for i, u in enumerate(updates):
        content = RecordDict({"arrays": to_array_record(u.arrays),
                              "metrics": MetricRecord({"num-examples": int(u.num_examples)})})
        replies.append(_reply_message(content, src_node_id=i + 1))
    arrays, _ = strategy.aggregate_train(1, replies)
    if arrays is None:
        raise ValueError(f"{kind} aggregation returned no model")
    assert isinstance(arrays, ArrayRecord)
    return {k: v.astype(np.float32) for k, v in from_array_record(arrays).items()}


def _reply_message(content, *, src_node_id: int):
    """A reply-shaped Message for feeding Flower strategies outside a Grid round.

    The metadata is given explicitly: building an instruction ``Message`` first would read
    ``TaskIdentity.run_id``/``node_id``, which are only set inside a running Flower task.
    """
    from flwr.app import Message, Metadata

    metadata = Metadata(
        run_id=0,
        message_id="",
        src_node_id=src_node_id,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=3600.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def aggregate(kind: str, updates: list[Update], *, trim_beta: float = 0.2, krum_byzantine: int = 0):
    updates = sorted(updates, key=lambda u: u.node)
    if kind == "fedavg":
        return fedavg(updates)
    return _flower_aggregate(kind, updates, trim_beta=trim_beta, krum_byzantine=krum_byzantine)


def update_norm(arrays: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum((arrays[k].astype(np.float64) - ref[k].astype(np.float64)) ** 2))
                             for k in ref)))
