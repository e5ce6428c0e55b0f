"""Typed rows of ``metrics.jsonl``: one line per round, written by :meth:`RoundRow.to_json` (through
:meth:`server.rundir.RunDir.append_row`) and read by :meth:`RoundRow.from_json` (through
:meth:`server.rundir.RunDir.read_rows`).

The JSON keys and their meanings are the on-disk contract and stay as they were: ``round``, ``run``,
``status`` (``ok`` or ``failed``, with ``reason``), ``nodes_sampled``, ``nodes_trained``, ``bytes_down``,
``bytes_up``, ``refusals``, ``rejected``, ``errors``, ``nodes`` (per-node training metrics and status),
``epsilon`` (node -> cumulative ε), ``central_epsilon`` (central DP only), ``eval_nodes``,
``num_examples_val``, the federated evaluation (``loss``, ``accuracy``, ``macro_f1``, ``classification``,
``fairness``), the server-held evaluation with the prefix ``eval_`` (present only with ``eval-data``),
``fairness_violations`` (only with thresholds and a fairness report), ``train_loss``, ``seconds``,
``selection`` and ``stopped`` (only in the round that stopped the run). Keys this version does not know are
kept on a rewrite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.fairness import FairnessReport

_EVAL_KEYS = ("loss", "accuracy", "macro_f1", "classification", "fairness")
_ROW_KEYS = ("round", "run", "status", "reason", "nodes_sampled", "nodes_trained", "bytes_down", "bytes_up",
             "refusals", "rejected", "errors", "nodes", "epsilon", "central_epsilon", "eval_nodes",
             "num_examples_val", "fairness_violations", "train_loss", "seconds", "selection", "stopped")


@dataclass
class Evaluation:
    """One evaluation of the global model: federated (summed node counts) or on the server-held set.

    ``accuracy`` and ``macro_f1`` are None when no example was evaluated; ``classification`` (see
    :func:`common.metrics.classification_metrics`) and ``fairness`` are then absent (None).
    """

    loss: float | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    classification: dict[str, Any] | None = None
    fairness: FairnessReport | None = None

    def to_json(self, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {f"{prefix}loss": self.loss, f"{prefix}accuracy": self.accuracy,
                               f"{prefix}macro_f1": self.macro_f1}
        if self.classification is not None:
            out[f"{prefix}classification"] = self.classification
        if self.fairness is not None:
            out[f"{prefix}fairness"] = self.fairness.to_json()
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], prefix: str = "") -> Evaluation:
        fair = obj.get(f"{prefix}fairness")
        return cls(loss=obj.get(f"{prefix}loss"), accuracy=obj.get(f"{prefix}accuracy"),
                   macro_f1=obj.get(f"{prefix}macro_f1"), classification=obj.get(f"{prefix}classification"),
                   fairness=FairnessReport.from_json(fair) if fair else None)


@dataclass
class RoundRow:
    """One round of a run, as in ``metrics.jsonl`` (see the module docstring for each key)."""

    round: int
    run: str
    status: str = "ok"
    reason: str | None = None  # why the round failed
    nodes_sampled: int = 0
    nodes_trained: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    refusals: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    central_epsilon: float | None = None
    eval_nodes: int = 0
    num_examples_val: int = 0
    federated: Evaluation = field(default_factory=Evaluation)
    held_out: Evaluation | None = None  # the server-held evaluation set (``eval-data``), keys ``eval_*``
    fairness_violations: list[dict[str, Any]] | None = None
    train_loss: float | None = None
    seconds: float = 0.0
    selection: dict[str, Any] | None = None
    stopped: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read

    @property
    def fairness(self) -> FairnessReport | None:
        """The federated fairness report of the round (None when nothing was evaluated)."""
        return self.federated.fairness

    def metric(self, key: str) -> float | None:
        """A finite scalar metric by its JSON key (``accuracy``, ``eval_macro_f1``, ``loss``, ``train_loss``...)."""
        v = self.to_json().get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return None
        return float(v)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "round": self.round, "run": self.run, "status": self.status, "nodes_sampled": self.nodes_sampled,
            "nodes_trained": self.nodes_trained, "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
            "refusals": self.refusals, "rejected": self.rejected, "errors": self.errors, "nodes": self.nodes,
            "epsilon": self.epsilon, "eval_nodes": self.eval_nodes, "num_examples_val": self.num_examples_val,
            "train_loss": self.train_loss, "seconds": self.seconds,
        }
        optional = {"reason": self.reason, "central_epsilon": self.central_epsilon,
                    "fairness_violations": self.fairness_violations, "selection": self.selection,
                    "stopped": self.stopped or None}
        out.update({k: v for k, v in optional.items() if v is not None})
        out.update(self.federated.to_json())
        if self.held_out is not None:
            out.update(self.held_out.to_json("eval_"))
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> RoundRow:
        held = "eval_accuracy" in obj or "eval_loss" in obj
        known = set(_ROW_KEYS) | set(_EVAL_KEYS) | ({f"eval_{k}" for k in _EVAL_KEYS} if held else set())
        return cls(
            round=int(obj["round"]), run=str(obj.get("run", "")), status=str(obj.get("status", "ok")),
            reason=obj.get("reason"), nodes_sampled=int(obj.get("nodes_sampled", 0)),
            nodes_trained=int(obj.get("nodes_trained", 0)), bytes_down=int(obj.get("bytes_down", 0)),
            bytes_up=int(obj.get("bytes_up", 0)), refusals=list(obj.get("refusals") or []),
            rejected=list(obj.get("rejected") or []), errors=list(obj.get("errors") or []),
            nodes=dict(obj.get("nodes") or {}), epsilon=dict(obj.get("epsilon") or {}),
            central_epsilon=obj.get("central_epsilon"), eval_nodes=int(obj.get("eval_nodes", 0)),
            num_examples_val=int(obj.get("num_examples_val", 0)), federated=Evaluation.from_json(obj),
            held_out=Evaluation.from_json(obj, "eval_") if held else None,
            fairness_violations=obj.get("fairness_violations"), train_loss=obj.get("train_loss"),
            seconds=float(obj.get("seconds", 0.0)), selection=obj.get("selection"),
            stopped=str(obj.get("stopped") or ""), extra={k: v for k, v in obj.items() if k not in known})
