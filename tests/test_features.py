"""Frozen-encoder feature cache: cached and uncached training give the same update (DP with a fixed noise
seed, and without DP), the encoder runs once per dataset, predictions match, and the cache refuses a model
whose encoder trains."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from client import features as F
from client.train import DpSettings, TrainSettings, train_local
from common.inference import predict
from common.model import ModelSpec, build_model, trainable_state

CPU = torch.device("cpu")
LABELS = ("negative", "positive")
# Cached features are computed in batches of 64 with per-batch padding, the token path pads the whole set:
# the same features up to float32 summation order (~1e-7); after a few AdamW steps the updates agree to 1e-5.
CACHE_ATOL = 1e-5


def model_for(part: str, pooling: str):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return build_model(ModelSpec("tiny", LABELS, train_part=part, top_k_layers=0, pooling=pooling))


def settings(**kw) -> TrainSettings:
    base = dict(epochs=2, batch_size=8, max_physical_batch_size=4, learning_rate=5e-2, weight_decay=0.01,
                warmup_ratio=0.1, seed=3)
    return TrainSettings(**(base | kw))


@pytest.fixture(autouse=True)
def _empty_cache():
    F.clear_cache()
    yield
    F.clear_cache()


@pytest.mark.parametrize(("part", "pooling"), [("classifier", "cls"), ("classifier", "mean"), ("head", "mean"),
                                                ("classifier", "mean-layers")])
@pytest.mark.parametrize("private", [True, False])
def test_cached_and_uncached_training_give_the_same_update(part, pooling, private, toy_encoded):
    # noise and a clip that binds: the DP mechanism is fully exercised, with a fixed noise seed
    dp = DpSettings(noise_multiplier=1.0, clipping_norm=0.05, grad_sample_mode="hooks", noise_seed=11) if private else None
    base = model_for(part, pooling)
    assert F.frozen_encoder(base)
    start = trainable_state(base)
    uncached, cached = model_for(part, pooling), model_for(part, pooling)
    r1 = train_local(uncached, toy_encoded, settings=settings(), device=CPU, dp=dp)
    feats = F.cached_features(cached, toy_encoded, source="tiny", device=CPU)
    r2 = train_local(cached, toy_encoded, settings=settings(), device=CPU, dp=dp, features=feats)
    a, b = trainable_state(uncached), trainable_state(cached)
    assert list(a) == list(b) == list(start)
    moved = max(float(np.abs(a[k] - start[k]).max()) for k in a)
    assert moved > 100 * CACHE_ATOL  # the update is real
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=CACHE_ATOL)
    assert (r1.steps, r1.sample_rate, r1.examples_seen) == (r2.steps, r2.sample_rate, r2.examples_seen)
    assert r1.loss == pytest.approx(r2.loss, abs=1e-5)


def test_the_encoder_runs_once_per_dataset(toy_encoded, monkeypatch):
    model = model_for("classifier", "mean")
    calls = []
    real = F.encode_features

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(F, "encode_features", counting)
    first = F.cached_features(model, toy_encoded, source="tiny", device=CPU)
    again = F.cached_features(model_for("classifier", "mean"), toy_encoded, source="tiny", device=CPU)
    assert again is first and len(calls) == 1
    assert first.shape == (len(toy_encoded), model.config.hidden_size)
    # another dataset (or pooling) is another entry
    half = toy_encoded.__class__(input_ids=toy_encoded.input_ids[:5], labels=toy_encoded.labels[:5])
    F.cached_features(model, half, source="tiny", device=CPU)
    F.cached_features(model_for("classifier", "cls"), toy_encoded, source="tiny", device=CPU)
    assert len(calls) == 3


@pytest.mark.parametrize("pooling", ["mean", "mean-layers"])
def test_predictions_from_cached_features_equal_a_forward_pass(toy_encoded, pooling):
    model = model_for("classifier", pooling)
    with torch.no_grad():
        model.classifier.weight.add_(torch.randn(model.classifier.weight.shape, generator=torch.Generator().manual_seed(0)))
    want = predict(model, toy_encoded, device=CPU)
    got = F.predict_node(model, toy_encoded, source="tiny", device=CPU)
    assert np.array_equal(got.y_pred, want.y_pred)
    np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-5)
    assert got.loss_sum == pytest.approx(want.loss_sum, abs=1e-4)


@pytest.mark.parametrize(("part", "pooling"), [("head", "cls"), ("full", "mean"), ("lora", "mean")])
def test_no_cache_when_the_encoder_trains(part, pooling, toy_encoded):
    model = model_for(part, pooling)
    assert not F.frozen_encoder(model)
    assert F.cached_features(model, toy_encoded, source="tiny", device=CPU) is None
    feats = torch.zeros((len(toy_encoded), model.config.hidden_size))
    with pytest.raises(ValueError, match="cached features need a frozen encoder"):
        train_local(model, toy_encoded, settings=settings(), device=CPU, features=feats)


@pytest.mark.parametrize("encrypted", [True, False])
def test_features_persist_only_in_the_state_dir_sealed_like_the_dataset(toy_encoded, tmp_path, encrypted, monkeypatch):
    from common import crypto

    key = crypto.KeySource.from_key_file(crypto.write_key_file(tmp_path / "k.key", crypto.generate_key())) if encrypted else None
    store = tmp_path / "state" / "features"
    model = model_for("classifier", "mean")
    first = F.cached_features(model, toy_encoded, source="tiny", device=CPU, store_dir=store, key_source=key)
    files = list(store.iterdir())
    assert len(files) == 1 and files[0].name.endswith(".npy.fpenc" if encrypted else ".npy")
    if encrypted:
        assert crypto.is_container(files[0])
        assert first.numpy().tobytes()[:64] not in files[0].read_bytes()
    # a fresh process (empty memory cache) reads the file instead of running the encoder
    F.clear_cache()
    monkeypatch.setattr(F, "encode_features", lambda *a, **k: pytest.fail("encoder ran again"))
    again = F.cached_features(model, toy_encoded, source="tiny", device=CPU, store_dir=store, key_source=key)
    assert torch.equal(again, first)
    # a damaged file is ignored and recomputed, never trusted
    files[0].write_bytes(files[0].read_bytes()[:-3] + b"xyz")
    F.clear_cache()
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        redone = F.cached_features(model, toy_encoded, source="tiny", device=CPU, store_dir=store, key_source=key)
    torch.testing.assert_close(redone, first, rtol=0, atol=1e-6)
