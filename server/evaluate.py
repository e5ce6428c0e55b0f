"""The evaluate step: nodes return per-group confusion counts (never predictions or the model), the server
validates and sums them and computes utility and fairness from the sums; optionally it also evaluates the
global model on a server-held dataset (``eval-data``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.cleaning import CleaningConfig, clean_dataset
from common.config import RunConfig
from common.data import Schema, encode, load_dataset
from common.fairness import FairnessReport, fairness_report, group_confusions
from common.inference import encode_features, frozen_encoder, predict, predict_features
from common.metrics import classification_metrics
from common.model import load_tokenizer, to_array_record
from server.rows import Evaluation
from server.rundir import RunDir
from server.validate import ReplyRejected, parse_eval_reply, reply_info

log = logging.getLogger("fedpriv.server")


class CentralEval:
    """A server-held evaluation set (``--eval-data``), evaluated centrally every round."""

    def __init__(self, cfg: RunConfig, model_source: str) -> None:
        ds = load_dataset(cfg.eval_data, schema=Schema(cfg.text_col, cfg.label_col, cfg.group_col),
                          labels=cfg.label_names)
        self.cleaning: dict[str, Any] | None = None  # run-config ``clean``: cleaned like the nodes' data
        if cfg.clean:
            ds, self.cleaning = clean_dataset(ds, config=CleaningConfig.from_spec(cfg.clean))
        self.enc = encode(ds, load_tokenizer(model_source), max_length=cfg.max_length)
        self.groups = ds.groups if ds.groups is not None else ["all"] * len(ds)
        self.features = None  # frozen encoder: the set's features, computed on the first round

    def evaluate(self, model, device) -> tuple[float, dict[str, np.ndarray]]:
        if frozen_encoder(model):  # only the classifier changes between rounds: encode the set once
            if self.features is None:
                self.features = encode_features(model, self.enc, device=device)
            res = predict_features(model, self.features, self.enc.labels, device=device)
        else:
            res = predict(model, self.enc, device=device)
        cms = group_confusions(res.y_true, res.y_pred, self.groups, num_classes=model.config.num_labels)
        return res.loss_sum / max(res.num_examples, 1), cms


def evaluation_from_counts(cms: dict[str, np.ndarray], cfg: RunConfig, *, loss: float | None) -> Evaluation:
    """Utility and fairness from summed per-group confusion matrices (accuracy None when nothing was counted)."""
    if not cms or int(sum(int(np.asarray(m).sum()) for m in cms.values())) == 0:
        return Evaluation(loss=loss)
    labels = list(cfg.label_names)
    cls = classification_metrics(np.asarray(sum(cms.values())), labels=labels)
    fair = fairness_report(cms, labels=labels, min_group_size=cfg.min_group_size)
    return Evaluation(loss=loss, accuracy=cls["accuracy"], macro_f1=cls["macro_f1"], classification=cls,
                      fairness=FairnessReport.from_json(fair))


@dataclass
class FederatedEval:
    """The summed, validated evaluation replies of one round."""

    counts: dict[str, np.ndarray] = field(default_factory=dict)
    loss_sum: float = 0.0
    loss_examples: int = 0  # examples behind loss_sum (nodes that sent their exact loss)
    num_examples: int = 0
    nodes_asked: int = 0
    bytes_down: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def evaluate_federated(grid, cfg: RunConfig, rundir: RunDir, *, run_id: str, rnd: int,
                       arrays: dict[str, np.ndarray], config) -> FederatedEval:
    """Send the global model to every connected node for evaluation; validate and sum their counts.

    A reply that fails validation (:func:`server.validate.parse_eval_reply`) is recorded in ``rejected``
    (``phase: "evaluate"``) and left out of the sums; a count release's ledger entry is stored even then.
    """
    from flwr.app import Message, MessageType, RecordDict

    record = to_array_record(arrays)
    ids = sorted(int(i) for i in grid.get_node_ids())
    msgs = [Message(RecordDict({"arrays": record, "config": config}), dst_node_id=nid,
                    message_type=MessageType.EVALUATE) for nid in ids]
    out = FederatedEval(nodes_asked=len(msgs), bytes_down=int(record.count_bytes()) * len(msgs))
    for reply in grid.send_and_receive(msgs, timeout=cfg.round_timeout):
        src = int(reply.metadata.src_node_id)
        if reply.has_error():
            out.errors.append({"node_id": src, "reason": str(reply.error.reason), "phase": "evaluate"})
            continue
        name = f"node-{src}"
        try:
            info = reply_info(reply)
            name = str(info.get("node", name))
            entry = info.get("ledger_entry")
            if entry:  # a count release the node already paid for: recorded even if its counts are bad
                rundir.store_ledger_entry(name, entry, None)
            metrics = dict(reply.content["metrics"]) if "metrics" in reply.content else {}
            counts = parse_eval_reply(info, metrics, labels=list(cfg.label_names))
        except ReplyRejected as exc:
            out.rejected.append({"node": name, "reason": str(exc), "phase": "evaluate"})
            log.warning("run=%s round=%d node=%s evaluation rejected: %s", run_id, rnd, name, exc)
            continue
        for g, cm in counts.groups.items():
            out.counts[g] = out.counts[g] + cm if g in out.counts else cm
        if counts.loss_sum is not None:
            out.loss_sum += counts.loss_sum
            out.loss_examples += counts.num_examples
        out.num_examples += counts.num_examples
    return out
