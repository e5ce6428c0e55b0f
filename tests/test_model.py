"""Tiny model building, trainable-part selection, exact weight transport, saving and loading."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from common.model import (
    ERR_MODEL_DIR,
    TINY_CONFIG,
    ModelSpec,
    build_model,
    choose_device,
    from_array_record,
    load_trainable,
    resolve_source,
    save_pretrained,
    select_trainable,
    to_array_record,
    trainable_names,
    trainable_state,
)
from serving.compress import load_classifier

LAYERS = TINY_CONFIG["num_hidden_layers"]
LORA_TOL = 1e-5  # merged W + (alpha/r)·BA vs the adapter path: float32 rounding only
HEAD = {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}


def perturb(model, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trainable tensor (LoRA B starts at zero, which would make merging trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def batch(tokenizer, texts=("the staff was great", "the app was useless and slow", "ok")):
    from common.data import Encoded
    from common.inference import tensors

    enc = Encoded(input_ids=[tokenizer(t)["input_ids"] for t in texts], labels=np.zeros(len(texts), np.int64))
    ids, mask, _ = tensors(enc, tokenizer.pad_token_id)
    return ids, mask


def logits(model, ids, mask):
    from common.inference import forward

    model.eval()
    with torch.no_grad():
        return forward(model, ids, mask, torch.device("cpu"))


# --------------------------------------------------------------------------------------------- building


def test_tiny_model_builds_from_config(make_model):
    model = make_model("full")
    from transformers import BertForSequenceClassification

    assert isinstance(model, BertForSequenceClassification)
    assert model.config.hidden_size == TINY_CONFIG["hidden_size"] and len(model.bert.encoder.layer) == LAYERS
    assert model.config.num_labels == 2 and model.config.id2label == {0: "negative", 1: "positive"}


def test_tiny_model_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(99)
    before = torch.rand(1)
    torch.manual_seed(99)
    a = build_model(ModelSpec("tiny", ("a", "b"), train_part="head", top_k_layers=0))
    after = torch.rand(1)
    b = build_model(ModelSpec("tiny", ("a", "b"), train_part="head", top_k_layers=0))
    assert torch.equal(before, after)  # building consumed nothing from the global generator
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unknown_source_and_part(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        resolve_source(str(tmp_path / "nowhere"))
    assert str(e.value) == ERR_MODEL_DIR.format(path=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path)
    model = build_model(ModelSpec("tiny", ("a", "b"), train_part="full"))
    with pytest.raises(ValueError, match="train part must be one of full, head, lora, classifier; got 'all'"):
        select_trainable(model, ModelSpec("tiny", ("a", "b"), train_part="all"))


def test_choose_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_device("auto").type == expected
    assert choose_device("").type == expected
    assert choose_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():  # this project's CI and dev boxes
        assert choose_device("auto") == torch.device("cpu")


# --------------------------------------------------------------------------------------------- train parts


def test_full_trains_everything(make_model):
    model = make_model("full")
    assert set(trainable_names(model)) == {n for n, _ in model.named_parameters()}


def test_head_is_classifier_and_pooler_only(make_model):
    model = make_model("head", 0)
    assert set(trainable_names(model)) == HEAD


def test_classifier_is_the_output_layer_only(make_model):
    model = make_model("classifier", 0)
    assert set(trainable_names(model)) == {"classifier.weight", "classifier.bias"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (TINY_CONFIG["hidden_size"] + 1)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_head_with_top_k_layers(make_model, k):
    model = make_model("head", k)
    names = set(trainable_names(model))
    top = set(range(max(LAYERS - k, 0), LAYERS))
    layer_of = {n: int(re.match(r"bert\.encoder\.layer\.(\d+)\.", n).group(1)) for n in names
                if n.startswith("bert.encoder.layer.")}
    assert names == HEAD | set(layer_of)
    assert set(layer_of.values()) == top
    # every tensor of a chosen layer trains, none of the others or of the embeddings
    all_layer = {n for n, _ in model.named_parameters() if n.startswith("bert.encoder.layer.")}
    assert {n for n in all_layer if int(n.split(".")[3]) in top} == set(layer_of)


def test_lora_is_adapters_and_classifier_only(make_model):
    model = make_model("lora")
    names = trainable_names(model)
    adapters = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    classifier = {n for n in names if ".classifier." in n}
    assert set(names) == adapters | classifier
    assert len(adapters) == 2 * 2 * LAYERS  # A and B, for query and value, in every layer
    assert all(re.search(r"\.attention\.self\.(query|value)\.lora_[AB]\.", n) for n in adapters)
    assert {n.rsplit(".", 1)[1] for n in classifier} == {"weight", "bias"} and len(classifier) == 2
    assert not any("pooler" in n for n in names)


# --------------------------------------------------------------------------------------------- transport


@pytest.mark.parametrize(("part", "k"), [("full", 0), ("head", 0), ("head", 1), ("lora", 0), ("classifier", 0)])
def test_trainable_state_round_trips_exactly_through_array_record(make_model, flower, part, k):
    src = make_model(part, k)
    perturb(src, seed=1)
    state = trainable_state(src)
    assert all(v.dtype == np.float32 for v in state.values())
    record = to_array_record(state)
    assert isinstance(record, flower.ArrayRecord)
    # through Flower's own byte serialisation of each Array, as it goes over the wire
    wire = flower.ArrayRecord({k: flower.Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data)
                               for k, a in record.items()})
    back = from_array_record(wire)
    assert list(back) == list(state)
    dst = make_model(part, k)
    load_trainable(dst, back)
    again = trainable_state(dst)
    assert all(np.array_equal(again[n], state[n]) for n in state)
    # and the frozen part was not touched
    frozen_src = {n: p for n, p in make_model(part, k).named_parameters() if not p.requires_grad}
    assert all(torch.equal(p, frozen_src[n]) for n, p in dst.named_parameters() if not p.requires_grad)


class WithScalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.5))
        self.lin = torch.nn.Linear(3, 2)


def test_scalar_parameters_keep_their_shape(flower):
    m = WithScalar()
    state = trainable_state(m)
    assert state["scale"].shape == ()
    back = from_array_record(to_array_record(state))
    assert back["scale"].shape == () and np.array_equal(back["scale"], np.float32(1.5))
    back["scale"] = np.asarray(-2.0, dtype=np.float32)
    load_trainable(m, back)
    assert m.scale.item() == -2.0 and m.scale.shape == ()


def test_opacus_prefixes_are_stripped():
    from opacus import GradSampleModule

    m = WithScalar()
    m.scale.requires_grad_(False)  # Opacus has no per-sample rule for a bare parameter
    wrapped = GradSampleModule(m)
    assert list(trainable_state(wrapped)) == ["lin.weight", "lin.bias"]
    load_trainable(wrapped, trainable_state(m))


def test_load_trainable_rejects_missing_extra_and_misshapen_without_changing_the_model(make_model):
    model = make_model("head", 0)
    before = trainable_state(model)
    good = {k: v + 1 for k, v in before.items()}

    missing = {k: v for k, v in good.items() if k != "classifier.bias"}
    with pytest.raises(ValueError, match=r"missing \['classifier.bias'\], unexpected \[\]"):
        load_trainable(model, missing)
    extra = good | {"bert.embeddings.word_embeddings.weight": np.zeros((1,), np.float32)}
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['bert.embeddings.word_embeddings.weight'\]"):
        load_trainable(model, extra)
    misshapen = good | {"classifier.weight": good["classifier.weight"].T}
    with pytest.raises(ValueError, match=r"tensor 'classifier.weight' has shape \(64, 2\), model expects \(2, 64\)"):
        load_trainable(model, misshapen)
    after = trainable_state(model)
    assert all(np.array_equal(after[k], before[k]) for k in before), "a rejected load changed the model"


# --------------------------------------------------------------------------------------------- saving


@pytest.mark.parametrize(("part", "k"), [("head", 1), ("full", 0)])
def test_saved_model_loads_with_transformers_and_gives_identical_logits(make_model, tokenizer, tmp_path,
                                                                        part, k):
    from transformers import BertForSequenceClassification

    model = make_model(part, k)
    perturb(model, seed=2)
    names_before = trainable_names(model)
    ids, mask = batch(tokenizer)
    expected = logits(model, ids, mask)
    save_pretrained(model, tokenizer, tmp_path / "m")
    loaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "m"))
    assert torch.equal(logits(loaded, ids, mask), expected)
    assert loaded.config.id2label == {0: "negative", 1: "positive"}
    assert trainable_names(model) == names_before  # saving does not change the caller's model
    clf, tok = load_classifier(tmp_path / "m", device="cpu")
    assert torch.equal(logits(clf, ids, mask), expected)
    assert tok(["the staff was great"])["input_ids"] == tokenizer(["the staff was great"])["input_ids"]


def test_lora_save_merges_adapters(make_model, tokenizer, tmp_path):
    from transformers import BertForSequenceClassification

    model = make_model("lora")
    perturb(model, seed=3, scale=0.2)
    state_before = trainable_state(model)
    ids, mask = batch(tokenizer)
    peft_logits = logits(model, ids, mask)
    base_logits = logits(make_model("full"), ids, mask)
    assert (peft_logits - base_logits).abs().max() > 100 * LORA_TOL  # the adapters matter here
    save_pretrained(model, tokenizer, tmp_path / "m")
    loaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "m"))
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    torch.testing.assert_close(logits(loaded, ids, mask), peft_logits, rtol=0, atol=LORA_TOL)
    # the PEFT model the caller holds still has its adapters and gives the same logits
    after = trainable_state(model)
    assert list(after) == list(state_before) and all(np.array_equal(after[k], state_before[k]) for k in after)
    assert torch.equal(logits(model, ids, mask), peft_logits)
