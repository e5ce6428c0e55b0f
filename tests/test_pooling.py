"""Pooling as a model property: auto picks the model's own (never mean-layers), mean pooling is a masked mean,
mean-layers the layers' average of it, the pooler never trains under either, and a saved model pools (and predicts) the same after loading, through fedpriv's loaders, `fedpriv
compress`'s loader and plain transformers with trust_remote_code."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from common.model import (
    REMOTE_CODE_FILE,
    ModelSpec,
    build_model,
    load_pretrained_classifier,
    minilm_path,
    resolve_pooling,
    save_pretrained,
    trainable_names,
)
from serving.compress import load_classifier
from tests.test_model import batch, logits, perturb

LABELS = ("negative", "positive")


def mean_model(part: str = "classifier", k: int = 0, pooling: str = "mean"):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return build_model(ModelSpec("tiny", LABELS, train_part=part, top_k_layers=k, pooling=pooling))


def test_auto_pooling_is_the_models_own(tmp_path):
    assert resolve_pooling("auto", "minilm") == "mean"  # sentence-transformers: 1_Pooling mean tokens
    assert resolve_pooling("auto", "tiny") == "cls"
    assert resolve_pooling("cls", "minilm") == "cls"  # explicit wins
    assert resolve_pooling("mean-layers", "minilm") == "mean-layers"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert resolve_pooling("auto", str(plain)) == "cls"
    (plain / "config.json").write_text(json.dumps({"model_type": "bert", "fedpriv_pooling": "mean"}))
    assert resolve_pooling("auto", str(plain)) == "mean"  # a directory fedpriv saved keeps its pooling
    (plain / "config.json").write_text(json.dumps({"model_type": "bert", "fedpriv_pooling": "mean-layers"}))
    assert resolve_pooling("auto", str(plain)) == "mean-layers"
    st = tmp_path / "st"
    (st / "1_Pooling").mkdir(parents=True)
    (st / "config.json").write_text("{}")
    (st / "modules.json").write_text(json.dumps([{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert resolve_pooling("auto", str(st)) == "cls"
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert resolve_pooling("auto", str(st)) == "mean"
    assert (minilm_path() / "modules.json").is_file()
    with pytest.raises(ValueError, match="pooling must be auto, cls, mean or mean-layers; got 'max'"):
        resolve_pooling("max", "tiny")


def test_mean_pooling_is_the_masked_mean_of_the_last_hidden_states(tokenizer):
    model = mean_model()
    model.eval()
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        feats = model.features(input_ids=ids, attention_mask=mask)
        want = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(len(ids))])
        torch.testing.assert_close(feats, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits(model, ids, mask), model.classifier(want), rtol=0, atol=1e-6)
    # not the [CLS] pooler's output
    cls = build_model(ModelSpec("tiny", LABELS, train_part="classifier"))
    assert not torch.allclose(logits(cls, ids, mask), logits(model, ids, mask))


def test_mean_layers_pooling_averages_every_layers_masked_token_mean(tokenizer):
    model = mean_model(pooling="mean-layers")
    model.eval()
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        states = model.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert len(states) == model.config.num_hidden_layers + 1  # the embeddings, then each layer
        per_layer = [torch.stack([h[i, mask[i].bool()].mean(0) for i in range(len(ids))]) for h in states[1:]]
        want = sum(per_layer) / len(per_layer)
        feats = model.features(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(feats, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits(model, ids, mask), model.classifier(want), rtol=0, atol=1e-6)
        # padding does not change an example's features: the same sentence alone, unpadded
        n = int(mask[-1].sum())
        alone = model.features(input_ids=ids[-1:, :n], attention_mask=mask[-1:, :n])
        torch.testing.assert_close(alone[0], feats[-1], rtol=0, atol=1e-5)
    # neither the last layer's mean nor the embeddings' mean (each differs from the layers' average)
    last = mean_model()
    last.eval()
    assert not torch.allclose(logits(last, ids, mask), logits(model, ids, mask))


def test_an_unknown_stored_pooling_is_refused_not_read_as_cls(tokenizer):
    model = mean_model()
    model.config.fedpriv_pooling = "max"
    ids, mask = batch(tokenizer)
    with pytest.raises(ValueError, match="fedpriv_pooling must be one of cls, mean, mean-layers; got 'max'"):
        model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("pooling", ["mean", "mean-layers"])
@pytest.mark.parametrize(("part", "k"), [("head", 0), ("head", 1), ("full", 0)])
def test_the_unused_pooler_never_trains_under_mean_pooling(part, k, pooling):
    names = trainable_names(mean_model(part, k, pooling))
    assert names and not any("pooler" in n for n in names)
    if part == "head" and k == 0:
        assert set(names) == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("pooling", ["mean", "mean-layers"])
def test_a_saved_mean_pooled_model_predicts_the_same_after_loading(tokenizer, tmp_path, pooling):
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    model = mean_model("full", pooling=pooling)
    perturb(model, seed=4)
    ids, mask = batch(tokenizer)
    expected = logits(model, ids, mask)
    out = save_pretrained(model, tokenizer, tmp_path / "m")
    saved = json.loads((out / "config.json").read_text())
    assert saved["fedpriv_pooling"] == pooling and (out / REMOTE_CODE_FILE).is_file()
    for loader in (load_pretrained_classifier, load_classifier):
        loaded, _ = loader(out, device="cpu")
        assert torch.equal(logits(loaded, ids, mask), expected)
    # plain transformers: the class shipped in the directory pools the same way
    remote = AutoModelForSequenceClassification.from_pretrained(str(out), trust_remote_code=True)
    assert torch.equal(logits(remote, ids, mask), expected)
    # plain BertForSequenceClassification ignores the pooling: documented, and visibly different
    plain = BertForSequenceClassification.from_pretrained(str(out))
    assert not torch.allclose(logits(plain, ids, mask), expected)


@pytest.mark.parametrize("pooling", ["mean", "mean-layers"])
def test_compress_keeps_the_pooling(tokenizer, tmp_path, pooling):
    from serving.compress import quantize_int8, save_compressed

    model = mean_model("full", pooling=pooling)
    perturb(model, seed=5)
    ids, mask = batch(tokenizer)
    q = quantize_int8(model)
    expected = logits(q, ids, mask)
    save_compressed(q, tokenizer, tmp_path / "q", manifest={})
    loaded, _ = load_classifier(tmp_path / "q", device="cpu")
    assert loaded.config.fedpriv_pooling == pooling
    assert np.allclose(logits(loaded, ids, mask).numpy(), expected.numpy(), atol=1e-5)


def test_the_default_minilm_builds_mean_pooled():
    model = build_model(ModelSpec("minilm", LABELS, train_part="classifier"))
    assert model.config.fedpriv_pooling == "mean"
    assert trainable_names(model) == ["classifier.weight", "classifier.bias"]
