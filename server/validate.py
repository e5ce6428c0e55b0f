"""Check node replies before the coordinator uses them: a bad reply is rejected with a reason, never trusted.

Training replies: :func:`server.aggregate.validate_update` (tensor names, shapes, dtype, finite values, update
norm, ``num-examples``). Evaluation replies: :func:`parse_eval_reply` (the counts' labels and groups, each
matrix (C, C) non-negative integer counts, their total equal to ``num-examples`` unless the node noised them,
a finite non-negative ``loss-sum``). A rejected reply is recorded in the round's ``rejected`` list and the
round goes on without it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.fairness import group_confusions_from_wire

REJECT_INFO = "reply 'info' is not a JSON object: {problem}"
REJECT_NO_COUNTS = "evaluation reply has no 'counts'"
REJECT_COUNTS_JSON = "evaluation 'counts' is not JSON: {problem}"
REJECT_EVAL_N = "evaluation num-examples must be an integer >= 0, got {value!r}"
REJECT_LOSS_SUM = "evaluation loss-sum must be a finite number >= 0, got {value!r}"
REJECT_NOISE = "count_noise_epsilon must be a finite number >= 0, got {value!r}"


class ReplyRejected(ValueError):
    """A node reply that the coordinator does not use; ``str(exc)`` is the reason recorded in ``rejected``."""


def reply_info(reply) -> dict[str, Any]:
    """The reply's ``info`` record (node name, status, ledger entry, counts) as a dict; ``{}`` when absent.

    Raises
    ------
    ReplyRejected
        When ``info`` is present but not a JSON object.
    """
    if "info" not in reply.content:
        return {}
    try:
        obj = json.loads(str(reply.content["info"]["json"]))
    except (KeyError, ValueError) as exc:
        raise ReplyRejected(REJECT_INFO.format(problem=exc)) from exc
    if not isinstance(obj, dict):
        raise ReplyRejected(REJECT_INFO.format(problem=f"got {type(obj).__name__}"))
    if obj.get("ledger_entry") is not None and not isinstance(obj["ledger_entry"], dict):
        raise ReplyRejected(REJECT_INFO.format(problem="'ledger_entry' is not an object"))
    return obj


def _is_int(v: object) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


@dataclass(frozen=True)
class EvalCounts:
    """One node's validated evaluation reply.

    Attributes
    ----------
    groups : dict of str to numpy.ndarray of int64, shape (C, C)
        Per-group confusion counts on the node's validation split.
    num_examples : int
        Validation examples the node evaluated.
    loss_sum : float or None
        Summed cross-entropy over those examples: an exact statistic, sent only by a node that opted in
        (``share-exact-metrics``) or trains without DP; None otherwise.
    withheld : bool
        The node sent no counts (no count noise and no opt-in to exact counts): nothing to sum, not an error.
    """

    groups: dict[str, np.ndarray]
    num_examples: int
    loss_sum: float | None
    withheld: bool = False


def parse_eval_reply(info: Mapping[str, Any], metrics: Mapping[str, Any], *,
                     labels: list[str]) -> EvalCounts:
    """Validate an evaluation reply's counts and metrics against the federation's labels.

    Parameters
    ----------
    info : mapping
        The reply's ``info`` (see :func:`reply_info`): ``counts`` (JSON text of the wire form of
        :func:`common.fairness.group_confusions_to_wire`) and ``count_noise_epsilon`` (> 0 when the node
        noised its counts, whose total then differs from ``num-examples``).
    metrics : mapping
        The reply's ``metrics``: ``num-examples`` (int >= 0) and, from nodes that send exact statistics,
        ``loss-sum`` (finite, >= 0).
    labels : list of str
        The federation's class names in index order.

    Raises
    ------
    ReplyRejected
        Naming the first problem found (the counts' problems all at once).
    """
    n = metrics.get("num-examples")
    if not _is_int(n) or int(n) < 0:
        raise ReplyRejected(REJECT_EVAL_N.format(value=n))
    loss_sum = metrics.get("loss-sum")
    if loss_sum is not None and (isinstance(loss_sum, bool) or not isinstance(loss_sum, int | float)
                                 or not math.isfinite(loss_sum) or loss_sum < 0):
        raise ReplyRejected(REJECT_LOSS_SUM.format(value=loss_sum))
    if info.get("status") == "withheld" and "counts" not in info:
        return EvalCounts(groups={}, num_examples=int(n), loss_sum=None if loss_sum is None else float(loss_sum),
                          withheld=True)
    noise = info.get("count_noise_epsilon", 0.0)
    if isinstance(noise, bool) or not isinstance(noise, int | float) or not math.isfinite(noise) or noise < 0:
        raise ReplyRejected(REJECT_NOISE.format(value=noise))
    if "counts" not in info:
        raise ReplyRejected(REJECT_NO_COUNTS)
    try:
        wire = json.loads(str(info["counts"]))
    except ValueError as exc:
        raise ReplyRejected(REJECT_COUNTS_JSON.format(problem=exc)) from exc
    try:
        groups = group_confusions_from_wire(wire, labels=labels, num_examples=None if noise > 0 else int(n))
    except ValueError as exc:
        raise ReplyRejected(str(exc)) from exc
    return EvalCounts(groups=groups, num_examples=int(n), loss_sum=None if loss_sum is None else float(loss_sum))
