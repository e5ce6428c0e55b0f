"""Evaluate any saved classifier (a run's ``model/`` or a Hugging Face directory) on a labelled file.

Used by ``fedpriv fairness`` and ``fedpriv compress``. This is a central evaluation: the file is read where
the command runs, so use it on data you may look at (a held-out or public set), not on a node's private data.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.data import Schema, encode, load_dataset
from common.fairness import fairness_report, group_confusions
from common.inference import predict
from common.metrics import classification_metrics, confusion_matrix
from common.model import choose_device


@dataclass
class Evaluation:
    labels: list[str]
    groups: list[str]
    y_true: np.ndarray
    y_pred: np.ndarray
    scores: np.ndarray  # [n, C]
    loss: float
    report: dict[str, Any]


def model_labels(model) -> list[str]:
    id2label = model.config.id2label
    return [str(id2label[i]) for i in range(model.config.num_labels)]


def evaluate_file(model, tokenizer, path: str | Path, *, schema: Schema, max_length: int = 128,
                  min_group_size: int = 30, device=None, key_source=None) -> Evaluation:
    """Predict every row of ``path`` and compute utility and (with a group column) fairness metrics."""

    labels = model_labels(model)
    ds = load_dataset(path, schema=schema, labels=labels, key_source=key_source)
    enc = encode(ds, tokenizer, max_length=max_length)
    # An int8 model from `fedpriv compress` runs on CPU only, also where a GPU is present.
    quantized = bool(getattr(model, "fedpriv_quantized_modules", None))
    res = predict(model, enc, device=device or choose_device("cpu" if quantized else "auto"))
    groups = ds.groups if ds.groups is not None else ["all"] * len(ds)
    cm = confusion_matrix(res.y_true, res.y_pred, num_classes=len(labels))
    report: dict[str, Any] = {
        "model_labels": labels,
        "num_examples": len(ds),
        "loss": res.loss_sum / max(len(ds), 1),
        **classification_metrics(cm, labels=labels),
    }
    cms = group_confusions(res.y_true, res.y_pred, groups, num_classes=len(labels))
    report["fairness"] = fairness_report(cms, labels=labels, min_group_size=min_group_size)
    return Evaluation(labels=labels, groups=list(groups), y_true=res.y_true, y_pred=res.y_pred,
                      scores=res.scores, loss=report["loss"], report=report)


def predictions_csv(ev: Evaluation) -> str:
    """One row per example: index, group, label, prediction, score.

    ``score`` is the predicted probability of the positive class (index 1) for binary tasks and of the
    predicted class otherwise.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "group", "label", "prediction", "score"])
    binary = len(ev.labels) == 2
    for i in range(len(ev.y_true)):
        score = ev.scores[i, 1] if binary else ev.scores[i, ev.y_pred[i]]
        w.writerow([i, ev.groups[i], ev.labels[int(ev.y_true[i])], ev.labels[int(ev.y_pred[i])], f"{float(score):.6f}"])
    return buf.getvalue()
