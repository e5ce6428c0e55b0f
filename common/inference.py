"""Batched prediction with a BERT classifier (shared by nodes, the server's central evaluation and the CLI)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.data import Encoded


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
