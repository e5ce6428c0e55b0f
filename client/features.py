"""Frozen-encoder feature cache: when only the classifier trains, a node runs its encoder once per run.

With train part ``classifier`` (and ``head`` under mean pooling without encoder layers) every trainable
tensor lives in the output layer, so the frozen encoder maps each example to the same feature vector (the
classifier's input: pooled [CLS] output or token mean) in every round. The node computes these features
once, keeps them in this process's memory (never on disk), and trains and evaluates the classifier on them:
a round after the first costs a few small matrix products instead of an encoder pass per epoch.

In a deployment each round may start a fresh ClientApp process, so the node can also keep the features in
its own state directory (``<state-dir>/features/``): encrypted with the dataset's own key (the fedpriv
container format of common.crypto) when the dataset is encrypted, as a checksummed plain ``.npy`` only when the
dataset itself is plaintext on disk. Nothing is ever written outside the state directory, and a file that does not
verify or does not match is ignored and recomputed.

DP semantics do not change: the same Poisson sampling over the same examples, per-example clipping of the
classifier's gradients (which are the only gradients either way), the same noise and the same accounting.
``tests/test_features.py`` checks that cached and uncached training give the same update under a fixed
noise seed. The encoder runs in eval mode on both paths (a frozen feature map has no dropout).

The cache is keyed by the model source, its pooling and a SHA-256 of the node's token ids and labels, so a
different dataset, split, cleaning or ``max-length`` is a different entry; it holds a few entries (one
process may serve several virtual nodes in a simulation).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from client.node import key_source_for
from common import crypto
from common.config import NodeConfig
from common.data import Encoded
from common.fsutil import atomic_write_bytes
from common.inference import EvalResult, encode_features, frozen_encoder, predict, predict_features

log = logging.getLogger("fedpriv.client")

MAX_ENTRIES = 16  # a few MB each (n x hidden float32): enough for every virtual node of a simulation
_CACHE: OrderedDict[tuple, Any] = OrderedDict()


def _digest(enc: Encoded) -> str:
    h = hashlib.sha256()
    for ids in enc.input_ids:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    h.update(np.asarray(enc.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def cached_features(model, enc: Encoded, *, source: str, device, pad_id: int = 0, store_dir: Path | None = None,
                    key_source: crypto.KeySource | None = None):
    """Features of ``enc`` under ``model``'s frozen encoder, computed on the first call and then reused;
    ``None`` when the encoder trains (the caller then trains or predicts on tokens).

    With ``store_dir`` (inside the node's state directory) the features also persist across processes:
    encrypted with ``key_source`` (the dataset's key) when given, else as plain ``.npy`` (only for a dataset
    that is itself plaintext on disk).
    """
    if not frozen_encoder(model):
        return None
    key = (source, str(getattr(model.config, "fedpriv_pooling", "cls")), _digest(enc))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    path = None
    if store_dir is not None:
        name = hashlib.sha256(repr(key).encode()).hexdigest()[:32]
        path = Path(store_dir) / (f"{name}.npy.fpenc" if key_source is not None else f"{name}.npy")
    feats = _read(path, key_source, rows=len(enc), hidden=model.config.hidden_size) if path else None
    if feats is None:
        feats = encode_features(model, enc, device=device, pad_id=pad_id)
        if path is not None:
            _write(path, feats, key_source)
    _CACHE[key] = feats
    while len(_CACHE) > MAX_ENTRIES:
        _CACHE.popitem(last=False)
    return feats


def _read(path: Path, key_source, *, rows: int, hidden: int):
    import torch

    if not path.is_file():
        return None
    try:
        if key_source is not None:  # AES-GCM verifies every chunk
            raw = bytes(crypto.decrypt_to_memory(path, key_source=key_source))
        else:  # SHA-256 of the .npy bytes, then the bytes
            blob = path.read_bytes()
            raw = blob[32:]
            if hashlib.sha256(raw).digest() != blob[:32]:
                raise ValueError("checksum mismatch")
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (crypto.ContainerError, ValueError, OSError) as exc:
        log.warning("ignoring feature cache %s (%s); recomputing", path.name, exc)
        return None
    if arr.shape != (rows, hidden) or arr.dtype != np.float32 or not np.isfinite(arr).all():
        log.warning("ignoring feature cache %s (shape %s); recomputing", path.name, arr.shape)
        return None
    return torch.from_numpy(arr)


def _write(path: Path, feats, key_source) -> None:
    buf = io.BytesIO()
    np.save(buf, feats.numpy().astype(np.float32), allow_pickle=False)
    blob = buf.getvalue()
    if key_source is not None:
        blob = crypto.encrypt_bytes(blob, key_source=key_source, inner_name="features.npy")
    else:
        blob = hashlib.sha256(blob).digest() + blob
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(path, blob, mode=0o600)


def node_store(node: NodeConfig, name: str) -> dict[str, Any]:
    """Where a node keeps its features between processes: ``<state-dir>/features``, sealed with the dataset's
    key when the dataset is encrypted (keyword arguments for :func:`cached_features`)."""
    return {"store_dir": node.resolved_state_dir(name) / "features", "key_source": key_source_for(node)}


def clear_cache() -> None:
    _CACHE.clear()


def predict_node(model, enc: Encoded, *, source: str, device, store_dir: Path | None = None,
                 key_source: crypto.KeySource | None = None) -> EvalResult:
    """Predict ``enc`` from cached features when the encoder is frozen, else with a full forward pass."""
    feats = cached_features(model, enc, source=source, device=device, store_dir=store_dir, key_source=key_source)
    if feats is None:
        return predict(model, enc, device=device)
    return predict_features(model, feats, enc.labels, device=device)
