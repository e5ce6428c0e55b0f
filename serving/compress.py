"""Shrink a saved classifier for CPU serving: int8 dynamic quantization and L1 magnitude pruning, with a report.

What ``--quantize int8`` does (PyTorch eager dynamic quantization, ``torch.ao.quantization.quantize_dynamic``):

* every ``nn.Linear`` (attention, feed-forward, pooler, classifier) gets ``qint8`` weights with one symmetric
  per-tensor scale, and its input activations are quantized to ``quint8`` on the fly, per batch (Jacob et al.
  2018). The matrix products then run in int8 (fbgemm/x86 or qnnpack kernels) on CPU;
* every ``nn.Embedding`` (word, position, token type) gets 8-bit weights with a float scale and offset per row
  (weight-only; the lookup returns float). In MiniLM-L6 the embeddings are 52% of the weights, so quantizing the
  Linear layers alone shrinks the files by only 1.55x.

The quantized model is a regular ``torch.nn.Module`` that runs on CPU only (quantized kernels have no CUDA
implementation). Its directory holds ``config.json``, the tokenizer, the quantized ``state_dict`` as
``model-int8.pt`` (int8 tensors, loaded with ``torch.load(weights_only=True)``) and the marker
``fedpriv-compression.json``; :func:`load_classifier` sees the marker, rebuilds the float BERT from
``config.json``, applies the same quantization and loads the saved state.

What ``--prune AMOUNT`` does: L1 (magnitude) unstructured pruning of the ``nn.Linear`` weights
(``torch.nn.utils.prune``; biases and embeddings are left alone), made permanent. ``scope="global"`` zeroes the
``AMOUNT`` fraction of smallest-magnitude weights over all Linear layers together (layers end up with different
sparsities); ``scope="layer"`` zeroes that fraction in each layer. Zeros are stored densely: pruning alone does
not shrink the files or speed up dense kernels; it is recorded as sparsity in the report. With both, pruning
comes first; symmetric int8 keeps every zero exactly zero.

References
----------
B. Jacob et al., "Quantization and training of neural networks for efficient integer-arithmetic-only
inference", CVPR 2018.
S. Han, J. Pool, J. Tran, W. Dally, "Learning both weights and connections for efficient neural networks",
NeurIPS 2015.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.data import Encoded, Schema, load_dataset
from common.fsutil import UnsafeOutputError, check_output_dir
from common.inference import forward, tensors
from common.model import (
    ERR_MODEL_DIR,
    choose_device,
    classifier_class,
    load_pretrained_classifier,
    save_pretrained,
)
from server.htmlreport import markdown_to_html, md_escape
from serving.evaluation import evaluate_file, model_labels

MARKER = "fedpriv-compression.json"
QUANTIZED_WEIGHTS = "model-int8.pt"
REPORT_JSON = "compress_report.json"
REPORT_MD = "compress_report.md"
REPORT_HTML = "compress_report.html"  # REPORT_MD rendered by server.htmlreport
FORMAT_VERSION = 1
QUANTIZE_CHOICES = ("int8",)
PRUNE_SCOPES = ("global", "layer")
# Files whose bytes count as "size on disk" (weights only: config and tokenizer are the same before and after).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
LATENCY_BATCH_SIZES = (1, 32)

ERR_MODEL_MISSING = "model directory {path} does not exist (--model)"
ERR_MODEL_NO_CONFIG = "model directory {path} has no config.json (--model); expected a saved classifier such as RUN_DIR/model"
ERR_ALREADY_QUANTIZED = "model directory {path} is already int8-quantized (--model); compress the float model instead"
ERR_QUANTIZE = "quantization (--quantize) must be one of {choices}; got {value!r}"
ERR_PRUNE_RANGE = "prune amount (--prune) must be a fraction in [0, 1); got {value}"
ERR_PRUNE_SCOPE = "prune scope (--prune-scope) must be one of {choices}; got {value!r}"
ERR_NOTHING = "nothing to do: give --quantize int8 and/or --prune AMOUNT (a fraction in [0, 1))"
ERR_OUT_NOT_EMPTY = "output directory {path} exists and is not empty (--out); choose another path or pass --force to replace it"
ERR_FORCE_FOREIGN = ("--force replaces only an earlier `fedpriv compress` output (a directory holding "
                     f"{MARKER}); {{path}} is not one: choose an empty or new --out")
ERR_OUT_HOLDS_INPUT = "output directory {path} (--out) is or contains the input {what} {inner}; choose another --out"
ERR_EVAL_MISSING = "evaluation file {path} does not exist (--eval-data)"
ERR_NEEDS_EVAL = "--{flag} {value!r} needs --eval-data"
ERR_REPEATS = "latency repeats (--repeats) must be >= 1; got {value}"
ERR_THREADS = "torch threads (--threads) must be >= 0 (0 keeps torch's default); got {value}"
ERR_MAX_LENGTH = "max length (--max-length) must be >= 2; got {value}"
ERR_QUANTIZED_DEVICE = "{path} holds an int8-quantized model, which runs on CPU only; got device {device!r} (use cpu or auto)"
ERR_MARKER = "{path}: unsupported compression marker (format {value!r}, quantized modules {modules!r}); this fedpriv reads format {expected}"

NOTE_GAPS = ("Compression can widen group gaps: quantization and pruning error is not spread evenly over groups, "
             "so a model whose overall accuracy barely moves can lose more on a small or atypical group. Compare "
             "the fairness gaps before and after, not only accuracy.")
NOTE_CPU = ("The int8 model runs on CPU only (PyTorch's quantized kernels have no CUDA implementation); "
            "load_classifier places it on CPU even when a GPU is present.")
NOTE_BATCH = ("Dynamic int8 quantization scales the activations per batch, so an example's int8 prediction can "
              "depend on the other examples (and padding) in its batch; the float model's does not.")
NOTE_SPARSE = ("Pruned weights are stored densely (zeros included): sparsity alone does not shrink the files or "
               "speed up dense CPU kernels.")

# PyTorch 2.13 deprecates eager quantization (torch.ao.quantization, quantized tensor creation and the typed
# storages used to load quantized tensors) in favour of torchao, which is not a dependency here. These three
# warnings are silenced only while quantizing or loading a quantized state dict; nothing else is.
_QUANTIZATION_WARNINGS = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor"),
    (UserWarning, r"TypedStorage is deprecated"),
)


class CompressError(ValueError):
    """The request cannot be carried out; ``problems`` lists every reason found (each names the flag)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class CompressRequest:
    """One ``fedpriv compress`` invocation, validated by :func:`check_request` before any work."""

    model: str  # saved float classifier directory (config.json, weights, tokenizer)
    out: str  # directory to write; must not exist or be empty unless ``force``
    quantize: str | None = None  # "int8" or None
    prune: float | None = None  # fraction of Linear weights to zero, in [0, 1); None: no pruning
    prune_scope: str = "global"  # "global": one threshold over all Linear layers; "layer": per layer
    force: bool = False  # replace a non-empty ``out`` (its old contents are deleted once the new one is written)
    eval_data: str | None = None  # labelled file for accuracy, macro-F1 and fairness before/after
    text_col: str = "text"
    label_col: str = "label"
    group_col: str = ""  # empty: no fairness gaps
    max_length: int = 128  # tokens per example, for evaluation and latency
    min_group_size: int = 30  # groups below this are flagged in the fairness report
    threads: int = 1  # torch intra-op threads while timing (1: stable on a shared machine); 0 keeps torch's default
    repeats: int = 10  # timed repeats per model and batch size (after warm-up)
    warmup: int = 2  # untimed runs per model and batch size


# ------------------------------------------------------------------------------------------------ validation


def _is_within(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The compression marker of a model directory, or None when it has none."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def _out_dir_problems(out: Path, *, force: bool) -> list[str]:
    """An existing non-empty ``--out`` is replaced only with ``force`` and only if it is an earlier output."""
    if not out.is_dir() or not any(out.iterdir()):
        return []
    if not force:
        return [ERR_OUT_NOT_EMPTY.format(path=out)]
    if not (out / MARKER).is_file():  # --force deletes the old directory: never one that is not a compress output
        return [ERR_FORCE_FOREIGN.format(path=out)]
    return []


def request_problems(req: CompressRequest) -> list[str]:
    """Every problem of ``req`` (empty when it can run). Looks at the file system; changes nothing."""
    problems: list[str] = []
    model = Path(req.model).expanduser()
    if not model.is_dir():
        problems.append(ERR_MODEL_MISSING.format(path=model))
    elif not (model / "config.json").is_file():
        problems.append(ERR_MODEL_NO_CONFIG.format(path=model))
    elif (read_marker(model) or {}).get("quantization"):
        problems.append(ERR_ALREADY_QUANTIZED.format(path=model))
    if req.quantize is not None and req.quantize not in QUANTIZE_CHOICES:
        problems.append(ERR_QUANTIZE.format(choices=", ".join(QUANTIZE_CHOICES), value=req.quantize))
    if req.prune is not None and not (0.0 <= req.prune < 1.0):
        problems.append(ERR_PRUNE_RANGE.format(value=req.prune))
    if req.prune_scope not in PRUNE_SCOPES:
        problems.append(ERR_PRUNE_SCOPE.format(choices=", ".join(PRUNE_SCOPES), value=req.prune_scope))
    if req.quantize is None and req.prune is None:
        problems.append(ERR_NOTHING)
    out = Path(req.out).expanduser()
    try:  # even with --force: never through or over a symbolic link, never over a file, device or FIFO
        check_output_dir(out)
    except UnsafeOutputError as exc:
        problems.append(f"--out {exc}")
    else:
        problems += _out_dir_problems(out, force=req.force)
    inputs = [("model", model)] + ([("evaluation file", Path(req.eval_data).expanduser())] if req.eval_data else [])
    inputs.append(("working directory", Path.cwd()))
    for what, inner in inputs:
        if inner.exists() and _is_within(inner, out):
            problems.append(ERR_OUT_HOLDS_INPUT.format(path=out, what=what, inner=inner))
    if req.eval_data:
        if not Path(req.eval_data).expanduser().is_file():
            problems.append(ERR_EVAL_MISSING.format(path=Path(req.eval_data).expanduser()))
    elif req.group_col:
        problems.append(ERR_NEEDS_EVAL.format(flag="group-col", value=req.group_col))
    if req.repeats < 1:
        problems.append(ERR_REPEATS.format(value=req.repeats))
    if req.threads < 0:
        problems.append(ERR_THREADS.format(value=req.threads))
    if req.max_length < 2:
        problems.append(ERR_MAX_LENGTH.format(value=req.max_length))
    return problems


def check_request(req: CompressRequest) -> None:
    """Raise :class:`CompressError` listing every problem of ``req``, before anything is loaded or written."""
    problems = request_problems(req)
    if problems:
        raise CompressError(problems)


# ------------------------------------------------------------------------------------------- the transforms


@contextlib.contextmanager
def _quantization_warnings_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        for category, message in _QUANTIZATION_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def _qconfig_spec(modules: Sequence[str]) -> dict:
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, float_qparams_weight_only_qconfig

    known = {"Linear": (torch.nn.Linear, default_dynamic_qconfig),
             "Embedding": (torch.nn.Embedding, float_qparams_weight_only_qconfig)}
    return dict(known[name] for name in modules)


def quantize_int8(model, *, embeddings: bool = True):
    """An int8 copy of ``model`` on CPU (``model`` itself is unchanged).

    Parameters
    ----------
    model : torch.nn.Module
        A float classifier.
    embeddings : bool, default True
        Also quantize ``nn.Embedding`` weights (8-bit, one float scale and offset per row). False quantizes the
        ``nn.Linear`` layers only.

    Returns
    -------
    torch.nn.Module
        The quantized model in eval mode, CPU only. Its attribute ``fedpriv_quantized_modules`` lists the module
        kinds quantized (``["Linear"]`` or ``["Linear", "Embedding"]``), as recorded in the marker.
    """
    import torch

    modules = ["Linear", "Embedding"] if embeddings else ["Linear"]
    with _quantization_warnings_silenced():
        from torch.ao.quantization import quantize_dynamic

        q = quantize_dynamic(copy.deepcopy(model).to("cpu").eval(), _qconfig_spec(modules), dtype=torch.qint8)
    q.fedpriv_quantized_modules = modules
    return q


def _linear_layers(model) -> list[tuple[str, Any]]:
    import torch

    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def linear_sparsity(model) -> dict[str, Any]:
    """Zeros in the ``nn.Linear`` weights of a float model.

    Returns
    -------
    dict
        ``weights`` (count), ``zeros`` (count), ``sparsity`` (zeros / weights) and ``per_layer``
        ({module name: sparsity}).
    """
    total = zeros = 0
    per_layer: dict[str, float] = {}
    for name, m in _linear_layers(model):
        n, z = m.weight.numel(), int((m.weight == 0).sum())
        total, zeros = total + n, zeros + z
        per_layer[name] = z / n
    return {"weights": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0, "per_layer": per_layer}


def prune_linear(model, *, amount: float, scope: str = "global") -> dict[str, Any]:
    """Zero the ``amount`` fraction of smallest-magnitude ``nn.Linear`` weights in place, permanently.

    Parameters
    ----------
    model : torch.nn.Module
        Float model, changed in place.
    amount : float in [0, 1)
        Fraction of weights to zero: of all Linear weights together (``scope="global"``) or of each layer
        (``scope="layer"``; each layer rounds ``amount * size`` to the nearest count, as ``torch.nn.utils.prune``).
    scope : {"global", "layer"}

    Returns
    -------
    dict
        ``amount``, ``scope``, ``sparsity_before`` and ``sparsity_after`` (over all Linear weights),
        ``weights``, ``zeros``, ``layer_sparsity_min`` / ``_max`` and ``per_layer`` ({module name: sparsity}).
    """
    import torch
    from torch.nn.utils import prune

    if not (0.0 <= amount < 1.0):
        raise ValueError(ERR_PRUNE_RANGE.format(value=amount))
    if scope not in PRUNE_SCOPES:
        raise ValueError(ERR_PRUNE_SCOPE.format(choices=", ".join(PRUNE_SCOPES), value=scope))
    before = linear_sparsity(model)["sparsity"]
    layers = [m for _, m in _linear_layers(model)]
    with torch.no_grad():
        if scope == "global":
            prune.global_unstructured([(m, "weight") for m in layers], pruning_method=prune.L1Unstructured,
                                      amount=amount)
        else:
            for m in layers:
                prune.l1_unstructured(m, "weight", amount=amount)
        for m in layers:
            prune.remove(m, "weight")  # weight = weight_orig * mask, as a plain parameter again
    after = linear_sparsity(model)
    per = after["per_layer"]
    return {"amount": amount, "scope": scope, "sparsity_before": before, "sparsity_after": after["sparsity"],
            "weights": after["weights"], "zeros": after["zeros"],
            "layer_sparsity_min": min(per.values(), default=0.0), "layer_sparsity_max": max(per.values(), default=0.0),
            "per_layer": per}


# ---------------------------------------------------------------------------------------- saving and loading


def weight_files(directory: str | Path) -> dict[str, int]:
    """``{file name: bytes}`` of the weight files directly in ``directory`` (see ``WEIGHT_SUFFIXES``)."""
    d = Path(directory)
    return {p.name: p.stat().st_size for p in sorted(d.iterdir())
            if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)}


def save_compressed(model, tokenizer, out_dir: str | Path, *, manifest: Mapping[str, Any]) -> Path:
    """Write a directory that :func:`load_classifier` loads.

    A quantized model (one made by :func:`quantize_int8`) is written as ``config.json`` + ``model-int8.pt``
    (its quantized ``state_dict``); a float one through :func:`common.model.save_pretrained`. Both get the
    tokenizer and the marker ``fedpriv-compression.json`` (``manifest`` plus the format fields).
    """
    import torch


    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modules = getattr(model, "fedpriv_quantized_modules", None)
    if modules:
        model.config.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        torch.save(model.state_dict(), out / QUANTIZED_WEIGHTS)
    else:
        save_pretrained(model, tokenizer, out)
    marker = {"format": FORMAT_VERSION, "quantization": "int8" if modules else None,
              "quantized_modules": list(modules or []), "weights": QUANTIZED_WEIGHTS if modules else None,
              "quantized_engine": torch.backends.quantized.engine if modules else None,
              "torch_version": torch.__version__, **dict(manifest)}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def load_compressed(path: str | Path, *, device: str = "auto"):
    """Load a directory written by :func:`save_compressed`; returns ``(model, tokenizer)`` in eval mode.

    An int8 model is rebuilt from ``config.json`` (float BERT), quantized the same way and given the saved
    state; it always lands on CPU (``device`` must be ``auto`` or ``cpu``). A pruned-only model is an ordinary
    Hugging Face directory and goes to ``device``.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig

    # fedpriv's class: the stored pooling (config.json ``fedpriv_pooling``) comes back with the model.
    classifier = classifier_class()
    path = Path(path)
    marker = read_marker(path) or {}
    modules = marker.get("quantized_modules") or []
    if marker.get("format") != FORMAT_VERSION or not set(modules) <= {"Linear", "Embedding"}:
        raise ValueError(ERR_MARKER.format(path=path / MARKER, value=marker.get("format"), modules=modules,
                                           expected=FORMAT_VERSION))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not marker.get("quantization"):
        model = classifier.from_pretrained(str(path))
        return model.to(choose_device(device)).eval(), tokenizer
    if device not in ("", "auto", "cpu"):
        raise ValueError(ERR_QUANTIZED_DEVICE.format(path=path, device=device))
    cfg = BertConfig.from_pretrained(str(path))
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG untouched
        model = classifier(cfg).eval()
    with _quantization_warnings_silenced():
        from torch.ao.quantization import quantize_dynamic

        model = quantize_dynamic(model, _qconfig_spec(modules), dtype=torch.qint8)
        state = torch.load(path / (marker.get("weights") or QUANTIZED_WEIGHTS), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.fedpriv_quantized_modules = list(modules)
    return model.eval(), tokenizer


def load_classifier(path: str | Path, *, device: str = "auto"):
    """Load any saved classifier directory: a run's ``model/``, any HF dir, or a ``fedpriv compress`` output.

    A directory holding ``fedpriv-compression.json`` is rebuilt by :func:`load_compressed` (an int8 one always
    lands on CPU); any other goes through :func:`common.model.load_pretrained_classifier`.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(ERR_MODEL_DIR.format(path=path))
    if (path / MARKER).is_file():
        return load_compressed(path, device=device)
    return load_pretrained_classifier(path, device=device)


# ------------------------------------------------------------------------------------------------ measuring

# Built-in latency inputs when no evaluation file is given: 32 review-like sentences of 6 to 40 words.
_SUBJECTS = ("the staff", "the film", "the new app", "our visit", "the service", "the second half", "the plot",
             "the clinic")
_PHRASES = ("was great", "felt slow and clumsy", "was better than expected", "did not work at all",
            "kept us waiting for far too long", "was a pleasant surprise")


def builtin_texts(n: int = 32) -> list[str]:
    out = []
    for i in range(n):
        words = [f"{_SUBJECTS[i % len(_SUBJECTS)]} {_PHRASES[i % len(_PHRASES)]}"]
        words += [f"and {_SUBJECTS[(i + k) % len(_SUBJECTS)]} {_PHRASES[(i + 2 * k) % len(_PHRASES)]}"
                  for k in range(1, i % 6 + 1)]
        out.append(" ".join(words) + " .")
    return out


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[int]:
    import torch

    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def measure_latency(models: Mapping[str, Any], tokenizer, texts: Sequence[str], *,
                    batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES, warmup: int = 2, repeats: int = 10,
                    max_length: int = 128, threads: int = 0) -> dict[str, Any]:
    """CPU latency per example of several models, measured side by side on the same inputs.

    For each batch size, every repeat runs each model once on the same batch (the order alternates between
    repeats, so slow drift on a shared machine hits all models alike); ``warmup`` untimed rounds come first.
    Batch 1 cycles through ``texts``; larger batches take the first ``b`` texts (cycled when fewer). Padding is
    to the longest example of the batch, as in evaluation.

    Returns
    -------
    dict
        ``device`` ("cpu"), ``torch_threads``, ``warmup``, ``repeats``, ``max_length``, ``num_texts`` and
        ``batch_<b>``: ``{model name: median milliseconds per example}`` for each batch size.
    """
    import torch


    if not texts:
        raise ValueError("latency needs at least one input text")
    cpu = torch.device("cpu")
    ids_all = [list(x) for x in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    pad = tokenizer.pad_token_id or 0

    def batch(b: int, i: int):
        start = i if b == 1 else 0  # batch 1 walks through the texts; a full batch is always the same
        rows = [ids_all[(start + k) % len(ids_all)] for k in range(b)]
        ids, mask, _ = tensors(Encoded(input_ids=rows, labels=[0] * b), pad)
        return ids, mask

    names = list(models)
    for m in models.values():
        m.to(cpu).eval()
    out: dict[str, Any] = {"device": "cpu", "warmup": warmup, "repeats": repeats, "max_length": max_length,
                           "num_texts": len(texts)}
    with _torch_threads(threads) as used, torch.inference_mode():
        out["torch_threads"] = used
        for b in batch_sizes:
            times: dict[str, list[float]] = {n: [] for n in names}
            for i in range(warmup + repeats):
                ids, mask = batch(b, i)
                for name in (names if i % 2 == 0 else names[::-1]):
                    t0 = time.perf_counter()
                    forward(models[name], ids, mask, cpu)
                    dt = time.perf_counter() - t0
                    if i >= warmup:
                        times[name].append(dt)
            out[f"batch_{b}"] = {n: 1000.0 * statistics.median(ts) / b for n, ts in times.items()}
    return out


def _gap_values(report: Mapping[str, Any]) -> dict[str, float | None]:
    return {name: (g.get("value") if isinstance(g, dict) else g)
            for name, g in ((report.get("fairness") or {}).get("gaps") or {}).items()}


def gap_widened(name: str, change: float | None) -> bool:
    """Whether a change of gap ``name`` is for the worse (differences up; ratios and worst-group accuracy down)."""
    if change is None:
        return False
    lower_is_worse = name.endswith("_ratio") or name == "worst_group_accuracy"
    return change < 0 if lower_is_worse else change > 0


def _diff(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def compare_evaluations(before, after, *, with_fairness: bool) -> dict[str, Any]:
    """Accuracy, macro-F1 and fairness gaps of two :class:`serving.evaluation.Evaluation` of the same file.

    Returns ``before`` / ``after`` / ``difference`` (after - before) blocks, ``prediction_agreement`` (share of
    rows predicted alike) and ``widened_gaps`` (names of gaps that got worse, see :func:`gap_widened`).
    """
    import numpy as np

    def block(ev) -> dict[str, Any]:
        r = ev.report
        out = {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "loss": r["loss"]}
        if with_fairness:
            out["gaps"] = _gap_values(r)
            out["small_groups"] = list((r.get("fairness") or {}).get("small_groups") or [])
        return out

    b, a = block(before), block(after)
    diff: dict[str, Any] = {k: _diff(a[k], b[k]) for k in ("accuracy", "macro_f1", "loss")}
    widened: list[str] = []
    if with_fairness:
        diff["gaps"] = {k: _diff(a["gaps"].get(k), v) for k, v in b["gaps"].items()}
        widened = [k for k, d in diff["gaps"].items() if gap_widened(k, d)]
    n = len(before.y_pred)
    agree = float(np.mean(np.asarray(before.y_pred) == np.asarray(after.y_pred))) if n else None
    return {"num_examples": n, "before": b, "after": a, "difference": diff, "prediction_agreement": agree,
            "widened_gaps": widened}


# ---------------------------------------------------------------------------------------------- the command


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``, deleting an existing ``out`` only now that the new one is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def compress(req: CompressRequest) -> dict[str, Any]:
    """Compress ``req.model`` into ``req.out``, measure before and after, and write the reports.

    The new directory is written next to ``req.out`` and moved into place only when it is complete (and loads
    back through :func:`load_classifier`, which is what the "after" figures measure).

    Returns
    -------
    dict
        The report also written to ``compress_report.json`` (see docs/compression.md).
    """
    import torch
    import transformers


    check_request(req)
    model_dir, out = Path(req.model).expanduser(), Path(req.out).expanduser().resolve()
    before_model, tokenizer = load_classifier(model_dir, device="cpu")
    schema = Schema(req.text_col, req.label_col, req.group_col)
    if req.eval_data:  # read and validate the file before any compression work
        ds = load_dataset(req.eval_data, schema=schema, labels=model_labels(before_model))
        texts, text_source = ds.texts[:64], f"first {min(len(ds), 64)} rows of {req.eval_data}"
    else:
        texts, text_source = builtin_texts(), "32 built-in sentences (no --eval-data)"
    work = copy.deepcopy(before_model)
    pruning = prune_linear(work, amount=req.prune, scope=req.prune_scope) if req.prune is not None else None
    after_candidate = quantize_int8(work) if req.quantize == "int8" else work
    manifest = {"source_model": str(model_dir), "quantize": req.quantize, "prune": req.prune,
                "prune_scope": req.prune_scope if req.prune is not None else None,
                "linear_sparsity": pruning["sparsity_after"] if pruning else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # plain mkdir, so the directory gets the usual permissions (umask), unlike mkdtemp's 0700
    try:
        save_compressed(after_candidate, tokenizer, tmp, manifest=manifest)
        del work, after_candidate
        after_model, _ = load_classifier(tmp, device="cpu")  # measure exactly what was written
        latency = measure_latency({"before": before_model, "after": after_model}, tokenizer, texts,
                                  warmup=req.warmup, repeats=req.repeats, max_length=req.max_length,
                                  threads=req.threads)
        latency["inputs"] = text_source
        for b in LATENCY_BATCH_SIZES:
            row = latency[f"batch_{b}"]
            row["speedup"] = row["before"] / row["after"] if row["after"] > 0 else None

        evaluation = None
        if req.eval_data:
            kw = {"schema": schema, "max_length": req.max_length, "min_group_size": req.min_group_size,
                  "device": torch.device("cpu")}
            ev_before = evaluate_file(before_model, tokenizer, req.eval_data, **kw)
            ev_after = evaluate_file(after_model, tokenizer, req.eval_data, **kw)
            evaluation = {"data": str(req.eval_data), "text_col": req.text_col, "label_col": req.label_col,
                          "group_col": req.group_col or None, "min_group_size": req.min_group_size,
                          **compare_evaluations(ev_before, ev_after, with_fairness=bool(req.group_col))}

        size_before, size_after = weight_files(model_dir), weight_files(tmp)
        sb, sa = sum(size_before.values()), sum(size_after.values())
        notes = [NOTE_GAPS]
        if req.quantize:
            notes += [NOTE_CPU, NOTE_BATCH]
        if req.prune is not None:
            notes.append(NOTE_SPARSE)
        if evaluation is not None and not req.group_col:
            notes.append("No --group-col: fairness gaps were not computed.")
        report = {
            "model": str(model_dir),
            "out": str(out),
            "request": {k: v for k, v in asdict(req).items() if k not in ("model", "out")},
            "quantization": None if not req.quantize else {
                "method": "torch.ao.quantization.quantize_dynamic",
                "modules": after_model.fedpriv_quantized_modules,
                "linear": "qint8 weights (per-tensor symmetric), activations quantized per batch at run time",
                "embedding": "8-bit weights, float scale and offset per row (weight-only)",
                "engine": torch.backends.quantized.engine,
                "runs_on": "cpu",
            },
            "pruning": pruning,
            "size": {"before_bytes": sb, "after_bytes": sa, "ratio": sb / sa if sa else None,
                     "before_files": size_before, "after_files": size_after},
            "latency": latency,
            "evaluation": evaluation,
            "notes": notes,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / REPORT_MD).write_text(render_markdown(report))
        (tmp / REPORT_HTML).write_text(render_html(report))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


# ------------------------------------------------------------------------------------------------ rendering


def _fmt(x: float | None, digits: int = 4, *, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def summary_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(figure, before, after, change)`` rows shared by the Markdown report and the terminal table."""
    size, lat = report["size"], report["latency"]
    rows = [("weights on disk (MB)", _fmt(size["before_bytes"] / 1e6, 2), _fmt(size["after_bytes"] / 1e6, 2),
             f"{_fmt(size['ratio'], 2)}x smaller" if (size["ratio"] or 0) >= 1 else f"{_fmt(size['ratio'], 2)}x")]
    for b in LATENCY_BATCH_SIZES:
        r = lat[f"batch_{b}"]
        rows.append((f"CPU latency, batch {b} (ms/example)", _fmt(r["before"], 2), _fmt(r["after"], 2),
                     f"speedup {_fmt(r['speedup'], 2)}x"))
    ev = report.get("evaluation")
    if ev:
        for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
            rows.append((label, _fmt(ev["before"][key]), _fmt(ev["after"][key]),
                         _fmt(ev["difference"][key], signed=True)))
        for name, before in (ev["before"].get("gaps") or {}).items():
            change = ev["difference"]["gaps"].get(name)
            flag = " (worse)" if gap_widened(name, change) else ""
            rows.append((name, _fmt(before), _fmt(ev["after"]["gaps"].get(name)),
                         _fmt(change, signed=True) + flag))
        rows.append(("prediction agreement", "", _fmt(ev["prediction_agreement"]), ""))
    pr = report.get("pruning")
    if pr:
        rows.append(("Linear weight sparsity", _fmt(pr["sparsity_before"]), _fmt(pr["sparsity_after"]),
                     f"layers {_fmt(pr['layer_sparsity_min'], 3)}-{_fmt(pr['layer_sparsity_max'], 3)}"))
    return rows


def render_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown report: what was done, the before/after table, how latency was measured, the notes."""
    req, lat = report["request"], report["latency"]
    done = []
    if report.get("quantization"):
        done.append(f"int8 dynamic quantization of {' and '.join(report['quantization']['modules'])} modules "
                    f"(engine {report['quantization']['engine']}, CPU only)")
    if report.get("pruning"):
        p = report["pruning"]
        done.append(f"L1 magnitude pruning of Linear weights, amount {p['amount']} ({p['scope']}): "
                    f"sparsity {p['sparsity_after']:.4f}")
    lines = [f"# Compression report: {md_escape(report['model'])}", "", f"Output: `{report['out']}`", "",
             "Done: " + "; ".join(done) + ".", "",
             "| figure | before | after | change |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(report)]
    ev = report.get("evaluation")
    lines += ["", f"Latency: CPU, {lat['torch_threads']} torch thread(s), median of {lat['repeats']} repeats after "
              f"{lat['warmup']} warm-up runs, both models side by side on the same inputs ({lat['inputs']}), "
              f"max length {lat['max_length']}. Size: bytes of the weight files only."]
    if ev:
        lines += ["", f"Evaluation: {ev['num_examples']} rows of `{ev['data']}`"
                  + (f", groups from column `{ev['group_col']}`." if ev.get("group_col") else ".")]
        if ev.get("widened_gaps"):
            lines += ["", "**Gaps that got worse:** " + ", ".join(ev["widened_gaps"]) + "."]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}; "
              f"request: quantize={req['quantize']}, prune={req['prune']}.", ""]
    return "\n".join(lines)


def render_html(report: Mapping[str, Any]) -> str:
    """The Markdown report as a standalone HTML page (``compress_report.html``)."""
    return markdown_to_html(render_markdown(report), title=f"fedpriv compression report {report['model']}")
