"""Batched prediction with a BERT classifier (shared by nodes, the server's central evaluation and the CLI)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.data import Encoded
from common.model import trainable_names


def tensors(enc: Encoded, pad_id: int):
    import torch

    t = max((len(x) for x in enc.input_ids), default=1)
    n = len(enc)
    ids = torch.full((n, t), pad_id, dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.long)
    for i, x in enumerate(enc.input_ids):
        ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask, torch.as_tensor(enc.labels, dtype=torch.long)


def forward(model, ids, mask, device):
    import torch

    b, t = ids.shape
    ids = ids.to(device)
    mask = mask.to(device)
    # Explicit token types and positions: Opacus needs them for per-sample gradients of BERT embeddings.
    return model(
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=torch.zeros((b, t), dtype=torch.long, device=device),
        position_ids=torch.arange(t, dtype=torch.long, device=device).unsqueeze(0).expand(b, t).contiguous(),
    ).logits


@dataclass
class EvalResult:
    loss_sum: float
    num_examples: int
    y_true: np.ndarray
    y_pred: np.ndarray
    scores: np.ndarray  # [n, C] softmax probabilities


def predict(model, enc: Encoded, *, device, batch_size: int = 64, pad_id: int = 0) -> EvalResult:
    """Predict in batches without gradients; returns labels, predictions, probabilities and summed loss."""
    import torch

    model.to(device)
    model.eval()
    n = len(enc)
    preds: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    loss_sum = 0.0
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            part = Encoded(input_ids=enc.input_ids[lo: lo + batch_size], labels=enc.labels[lo: lo + batch_size])
            ids, mask, y = tensors(part, pad_id)
            logits = forward(model, ids, mask, device).float().cpu()
            loss_sum += float(loss_fn(logits, y))
            p = torch.softmax(logits, dim=-1)
            probs.append(p.numpy())
            preds.append(p.argmax(-1).numpy())
    c = model.config.num_labels if hasattr(model, "config") else 2
    return EvalResult(
        loss_sum=loss_sum,
        num_examples=n,
        y_true=np.asarray(enc.labels, dtype=np.int64),
        y_pred=np.concatenate(preds).astype(np.int64) if preds else np.zeros(0, dtype=np.int64),
        scores=np.concatenate(probs) if probs else np.zeros((0, c)),
    )


# ------------------------------------------------------------------ frozen encoder: features, head-only predict


def frozen_encoder(model) -> bool:
    """True when every trainable tensor is the classifier's (train part ``classifier``; ``head`` with mean
    pooling and no encoder layers) and the model can return its features."""
    names = trainable_names(model)
    return bool(names) and hasattr(model, "features") and all(n.startswith("classifier.") for n in names)


def encode_features(model, enc: Encoded, *, device, batch_size: int = 64, pad_id: int = 0):
    """The classifier's input for every example of ``enc``: a float32 CPU tensor [n, hidden], in order.

    Runs the model's encoder in eval mode without gradients, in batches of similar length (padding per batch;
    masked positions do not change the result, so sorting only saves padded compute).
    """
    import torch

    was_training = model.training
    model.to(device)
    model.eval()
    order = np.argsort([len(x) for x in enc.input_ids], kind="stable")
    out = torch.zeros((len(enc), model.config.hidden_size))
    with torch.no_grad():
        for lo in range(0, len(enc), batch_size):
            idx = order[lo: lo + batch_size]
            part = Encoded(input_ids=[enc.input_ids[i] for i in idx], labels=np.asarray(enc.labels)[idx])
            ids, mask, _ = tensors(part, pad_id)
            b, t = ids.shape
            f = model.features(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                token_type_ids=torch.zeros((b, t), dtype=torch.long, device=device),
                position_ids=torch.arange(t, dtype=torch.long, device=device).unsqueeze(0).expand(b, t).contiguous(),
            )
            out[torch.as_tensor(idx)] = f.float().cpu()
    model.train(was_training)
    return out


def predict_features(model, features, labels, *, device, batch_size: int = 1024) -> EvalResult:
    """:func:`common.inference.predict` on cached features: the classifier alone, same outputs."""
    import torch

    model.eval()
    head = model.classifier.to(device)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    preds, probs, loss_sum = [], [], 0.0
    with torch.no_grad():
        for lo in range(0, len(y), batch_size):
            logits = head(features[lo: lo + batch_size].to(device)).float().cpu()
            loss_sum += float(loss_fn(logits, y[lo: lo + batch_size]))
            p = torch.softmax(logits, dim=-1)
            probs.append(p.numpy())
            preds.append(p.argmax(-1).numpy())
    c = model.config.num_labels
    return EvalResult(loss_sum=loss_sum, num_examples=len(y), y_true=np.asarray(labels, dtype=np.int64),
                      y_pred=np.concatenate(preds).astype(np.int64) if preds else np.zeros(0, dtype=np.int64),
                      scores=np.concatenate(probs) if probs else np.zeros((0, c)))
