"""`fedpriv compress`: int8 quantization and magnitude pruning of a saved tiny BERT, the loader, the report, errors."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import Schema
from common.fsutil import ERR_OUT_NOT_DIR, ERR_OUT_SYMLINK
from fedpriv.cli import main
from serving.compress import (
    ERR_FORCE_FOREIGN,
    ERR_MODEL_MISSING,
    ERR_MODEL_NO_CONFIG,
    ERR_NEEDS_EVAL,
    ERR_NOTHING,
    ERR_OUT_HOLDS_INPUT,
    ERR_OUT_NOT_EMPTY,
    ERR_PRUNE_RANGE,
    ERR_QUANTIZED_DEVICE,
    MARKER,
    QUANTIZED_WEIGHTS,
    REPORT_HTML,
    REPORT_JSON,
    REPORT_MD,
    CompressError,
    CompressRequest,
    check_request,
    compress,
    gap_widened,
    linear_sparsity,
    load_classifier,
    load_compressed,
    prune_linear,
    quantize_int8,
    save_compressed,
    weight_files,
)
from serving.evaluation import evaluate_file

CPU = torch.device("cpu")
# int8 rounding may flip a row that sits on the decision boundary; the trained toy model has few such rows.
MIN_AGREEMENT = 0.9
# Logits of the written-and-reloaded int8 model vs the in-memory one: the same int8 kernels on the same weights.
ROUND_TRIP_TOL = 1e-6
FAST = ["--repeats", "1"]  # latency figures must exist, not be precise


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory, make_model, toy_encoded) -> Path:
    """A tiny BERT (top layer + head) trained on the toy set until it predicts both classes right, saved."""
    from client.train import TrainSettings, train_local
    from common.model import load_tokenizer, save_pretrained

    model = make_model("head", 1)
    torch.manual_seed(0)  # dropout
    train_local(model, toy_encoded, settings=TrainSettings(epochs=12, batch_size=8, max_physical_batch_size=8,
                                                           learning_rate=5e-3, weight_decay=0.0, warmup_ratio=0.1,
                                                           seed=0), device=CPU)
    out = tmp_path_factory.mktemp("float") / "model"
    save_pretrained(model, load_tokenizer("tiny"), out)
    return out


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory, toy_texts) -> Path:
    texts, labels = toy_texts
    path = tmp_path_factory.mktemp("data") / "held.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["review", "stars", "site"])
        w.writeheader()
        for i, (t, y) in enumerate(zip(texts, labels.tolist(), strict=True)):
            w.writerow({"review": t, "stars": ("negative", "positive")[y], "site": ("north", "south")[i % 3 == 0]})
    return path


SCHEMA = Schema("review", "stars", "site")


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory, float_dir, eval_file) -> Path:
    out = tmp_path_factory.mktemp("int8") / "model"
    assert main(["compress", "--model", str(float_dir), "--out", str(out), "--quantize", "int8",
                 "--eval-data", str(eval_file), "--text-col", "review", "--label-col", "stars",
                 "--group-col", "site", "--min-group-size", "5", *FAST]) == 0
    return out


def _linear_zeros_of_int8(model) -> tuple[int, int]:
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    layers = [m for m in model.modules() if isinstance(m, QLinear)]
    return (sum(int((m.weight().dequantize() == 0).sum()) for m in layers), sum(m.weight().numel() for m in layers))


# ------------------------------------------------------------------------------------------- quantization


def test_int8_dir_loads_with_the_project_loader_and_predicts_like_the_float_model(float_dir, int8_dir, eval_file):
    fmodel, ftok = load_classifier(float_dir, device="cpu")
    qmodel, qtok = load_classifier(int8_dir)  # auto: a quantized model always lands on CPU
    assert qmodel.config.id2label == fmodel.config.id2label
    assert qtok.get_vocab() == ftok.get_vocab()
    assert sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in qmodel.modules()) == \
        sum(isinstance(m, torch.nn.Linear) for m in fmodel.modules())
    assert not any(isinstance(m, torch.nn.Embedding) for m in qmodel.modules())
    before = evaluate_file(fmodel, ftok, eval_file, schema=SCHEMA, min_group_size=5, device=CPU)
    after = evaluate_file(qmodel, qtok, eval_file, schema=SCHEMA, min_group_size=5, device=CPU)
    assert set(before.y_pred.tolist()) == {0, 1}  # the float model is not constant, so agreement means something
    assert np.mean(before.y_pred == after.y_pred) >= MIN_AGREEMENT


def test_int8_round_trip_gives_the_in_memory_quantized_logits(float_dir, int8_dir, toy_encoded):
    from common.inference import predict

    fmodel, _ = load_classifier(float_dir, device="cpu")
    reloaded, _ = load_classifier(int8_dir, device="cpu")
    a = predict(quantize_int8(fmodel), toy_encoded, device=CPU).scores
    b = predict(reloaded, toy_encoded, device=CPU).scores
    assert np.abs(a - b).max() <= ROUND_TRIP_TOL


def test_int8_dir_is_smaller_on_disk_and_stores_no_float_weights(float_dir, int8_dir):
    before, after = weight_files(float_dir), weight_files(int8_dir)
    assert list(after) == [QUANTIZED_WEIGHTS]
    # Tiny BERT: 2.0M embedding + 0.07M Linear weights; 8 bits instead of 32 -> about 4x (measured 3.5x).
    assert sum(after.values()) < sum(before.values()) / 3
    marker = json.loads((int8_dir / MARKER).read_text())
    assert marker["quantization"] == "int8" and marker["quantized_modules"] == ["Linear", "Embedding"]


def test_linear_only_int8_also_shrinks_and_loads(tmp_path, float_dir):
    fmodel, tok = load_classifier(float_dir, device="cpu")
    q = quantize_int8(fmodel, embeddings=False)
    save_compressed(q, tok, tmp_path / "q", manifest={})
    again, _ = load_classifier(tmp_path / "q")
    assert any(isinstance(m, torch.nn.Embedding) for m in again.modules())
    assert sum(weight_files(tmp_path / "q").values()) < sum(weight_files(float_dir).values())


def test_int8_model_stays_on_cpu_where_a_gpu_is_present(int8_dir, eval_file, monkeypatch):
    """With CUDA reported present, ``auto`` loads and evaluates the int8 model on CPU (the GPU path of a float
    model would move it there); the quantized kernels have no CUDA implementation."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model, tok = load_classifier(int8_dir)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    ev = evaluate_file(model, tok, eval_file, schema=SCHEMA, min_group_size=5)  # no device: must pick CPU
    assert ev.report["num_examples"] == 32


def test_fairness_command_reads_an_int8_dir(tmp_path, int8_dir, eval_file, capsys):
    rc = main(["fairness", "--model", str(int8_dir), "--data", str(eval_file), "--group-col", "site",
               "--text-col", "review", "--label-col", "stars", "--out", str(tmp_path / "f.json")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "f.json").read_text())["num_examples"] == 32


def test_quantized_model_refuses_a_gpu_device(int8_dir):
    with pytest.raises(ValueError) as exc:
        load_compressed(int8_dir, device="cuda")
    assert str(exc.value) == ERR_QUANTIZED_DEVICE.format(path=int8_dir, device="cuda")


# ---------------------------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.9])
def test_pruning_reaches_the_requested_sparsity_in_linear_weights(make_model, scope, amount):
    model = make_model("full")
    embeddings_before = model.bert.embeddings.word_embeddings.weight.clone()
    stats = prune_linear(model, amount=amount, scope=scope)
    measured = linear_sparsity(model)
    assert stats["sparsity_after"] == measured["sparsity"]
    # global: exactly round(amount * N) weights; layer: round(amount * n) per layer, so within 1/n of amount.
    assert measured["sparsity"] == pytest.approx(amount, abs=1e-3)
    if scope == "layer":
        assert all(abs(s - amount) <= 1e-3 + 1 / 64 for s in measured["per_layer"].values())
    assert not any(name.endswith("_orig") for name, _ in model.named_parameters())  # made permanent
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, embeddings_before)


def test_pruned_only_dir_is_a_float_dir_with_the_sparsity(tmp_path, float_dir, eval_file):
    out = tmp_path / "pruned"
    assert main(["compress", "--model", str(float_dir), "--out", str(out), "--prune", "0.5", "--prune-scope",
                 "layer", *FAST]) == 0
    assert list(weight_files(out)) == ["model.safetensors"]
    model, _ = load_classifier(out, device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert linear_sparsity(model)["sparsity"] == pytest.approx(0.5, abs=1e-3)
    rep = json.loads((out / REPORT_JSON).read_text())
    assert rep["pruning"]["sparsity_after"] == pytest.approx(0.5, abs=1e-3) and rep["quantization"] is None
    assert rep["evaluation"] is None


def test_prune_then_quantize_keeps_the_zeros(tmp_path, float_dir):
    out = tmp_path / "both"
    assert main(["compress", "--model", str(float_dir), "--out", str(out), "--prune", "0.4", "--quantize",
                 "int8", *FAST]) == 0
    model, _ = load_classifier(out)
    zeros, total = _linear_zeros_of_int8(model)
    assert zeros / total >= 0.4 - 1e-3  # symmetric int8 maps 0.0 to exactly 0


# ----------------------------------------------------------------------------------------------- report


def test_report_lists_every_before_and_after_figure(int8_dir, capsys, check_html):
    rep = json.loads((int8_dir / REPORT_JSON).read_text())
    assert rep["size"]["before_bytes"] > rep["size"]["after_bytes"] > 0
    assert rep["size"]["ratio"] == pytest.approx(rep["size"]["before_bytes"] / rep["size"]["after_bytes"])
    lat = rep["latency"]
    assert lat["device"] == "cpu" and lat["torch_threads"] >= 1 and lat["repeats"] == 1
    for b in (1, 32):
        assert lat[f"batch_{b}"]["before"] > 0 and lat[f"batch_{b}"]["after"] > 0
        assert lat[f"batch_{b}"]["speedup"] == pytest.approx(lat[f"batch_{b}"]["before"] / lat[f"batch_{b}"]["after"])
    ev = rep["evaluation"]
    assert ev["num_examples"] == 32 and ev["group_col"] == "site"
    gap_names = {"demographic_parity_difference", "demographic_parity_ratio", "equalized_odds_difference",
                 "equalized_odds_ratio", "equal_opportunity_difference", "equal_opportunity_ratio",
                 "accuracy_difference", "worst_group_accuracy"}
    for side in ("before", "after"):
        assert 0 <= ev[side]["accuracy"] <= 1 and 0 <= ev[side]["macro_f1"] <= 1
        assert set(ev[side]["gaps"]) == gap_names
    assert ev["difference"]["accuracy"] == pytest.approx(ev["after"]["accuracy"] - ev["before"]["accuracy"])
    assert ev["difference"]["macro_f1"] == pytest.approx(ev["after"]["macro_f1"] - ev["before"]["macro_f1"])
    for name in gap_names:
        b, a, d = ev["before"]["gaps"][name], ev["after"]["gaps"][name], ev["difference"]["gaps"][name]
        assert d == (None if a is None or b is None else pytest.approx(a - b))
    assert any("compression can widen group gaps" in n.lower() for n in rep["notes"])
    assert any("cpu only" in n.lower() for n in rep["notes"])
    md = (int8_dir / REPORT_MD).read_text()
    for row in ("weights on disk", "batch 1", "batch 32", "accuracy", "macro-F1", *gap_names, "torch thread"):
        assert row in md
    assert "Compression can widen group gaps" in md
    assert check_html(int8_dir / REPORT_HTML) == []


def test_command_prints_the_table(tmp_path, float_dir, capsys):
    assert main(["compress", "--model", str(float_dir), "--out", str(tmp_path / "q"), "--quantize", "int8",
                 "--threads", "1", *FAST]) == 0
    out = capsys.readouterr().out
    assert "weights on disk" in out and "batch 32" in out and "1 torch thread" in out
    assert json.loads((tmp_path / "q" / REPORT_JSON).read_text())["latency"]["torch_threads"] == 1


@pytest.mark.parametrize(("name", "change", "worse"), [
    ("equalized_odds_difference", 0.05, True), ("equalized_odds_difference", -0.05, False),
    ("demographic_parity_ratio", -0.1, True), ("worst_group_accuracy", -0.02, True),
    ("worst_group_accuracy", 0.02, False), ("accuracy_difference", None, False),
])
def test_gap_widened_knows_which_direction_is_worse(name, change, worse):
    assert gap_widened(name, change) is worse


# ----------------------------------------------------------------------------------------------- errors


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_missing_model_dir_is_named(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["compress", "--model", str(missing), "--out", str(tmp_path / "o"), "--quantize", "int8"]) == 2
    assert _err(capsys) == [f"fedpriv compress: {ERR_MODEL_MISSING.format(path=missing)}"]
    assert not (tmp_path / "o").exists()


def test_dir_without_config_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compress", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--prune", "0.1"]) == 2
    assert _err(capsys) == [f"fedpriv compress: {ERR_MODEL_NO_CONFIG.format(path=tmp_path / 'empty')}"]


@pytest.mark.parametrize("amount", ["1.0", "-0.1", "1.5", "nan"])
def test_prune_outside_the_range_is_refused_with_the_value(tmp_path, float_dir, capsys, amount):
    assert main(["compress", "--model", str(float_dir), "--out", str(tmp_path / "o"), "--prune", amount]) == 2
    assert _err(capsys) == [f"fedpriv compress: {ERR_PRUNE_RANGE.format(value=float(amount))}"]
    assert not (tmp_path / "o").exists()


def test_nothing_requested_is_refused(tmp_path, float_dir, capsys):
    assert main(["compress", "--model", str(float_dir), "--out", str(tmp_path / "o")]) == 2
    assert _err(capsys) == [f"fedpriv compress: {ERR_NOTHING}"]


def test_non_empty_out_is_refused_unless_force(tmp_path, float_dir, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compress", "--model", str(float_dir), "--out", str(out), "--quantize", "int8"]) == 2
    assert _err(capsys) == [f"fedpriv compress: {ERR_OUT_NOT_EMPTY.format(path=out)}"]
    assert (out / "keep.txt").read_text() == "mine"
    # --force never deletes a directory that is not an earlier compress output (e.g. --out ~/Documents)
    assert main(["compress", "--model", str(float_dir), "--out", str(out), "--quantize", "int8", "--force", *FAST]) == 2
    assert _err(capsys) == [f"fedpriv compress: {ERR_FORCE_FOREIGN.format(path=out)}"]
    assert (out / "keep.txt").read_text() == "mine"
    # an earlier output is replaced
    (out / "keep.txt").unlink()
    assert main(["compress", "--model", str(float_dir), "--out", str(out), "--prune", "0.2", *FAST]) == 0
    (out / "keep.txt").write_text("stale")
    assert main(["compress", "--model", str(float_dir), "--out", str(out), "--quantize", "int8", "--force", *FAST]) == 0
    assert not (out / "keep.txt").exists() and (out / QUANTIZED_WEIGHTS).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or old copies left behind


def test_empty_out_dir_is_accepted(tmp_path, float_dir):
    (tmp_path / "o").mkdir()
    assert main(["compress", "--model", str(float_dir), "--out", str(tmp_path / "o"), "--prune", "0.2", *FAST]) == 0


def test_out_holding_the_model_is_refused_even_with_force(tmp_path, float_dir, capsys):
    parent = float_dir.parent
    assert main(["compress", "--model", str(float_dir), "--out", str(parent), "--quantize", "int8", "--force"]) == 2
    assert _err(capsys) == [f"fedpriv compress: {ERR_FORCE_FOREIGN.format(path=parent)}",
                            f"fedpriv compress: {ERR_OUT_HOLDS_INPUT.format(path=parent, what='model', inner=float_dir)}"]
    assert (float_dir / "config.json").is_file()


def _earlier_output(path: Path) -> Path:
    """A directory that --force may replace: it holds the compression marker (and a file to watch)."""
    path.mkdir()
    (path / MARKER).write_text(json.dumps({"format": 1, "quantization": None}))
    (path / "keep.txt").write_text("mine")
    return path


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "fifo", "file", "device"])
def test_force_never_writes_through_or_over_what_is_not_a_directory(tmp_path, float_dir, capsys, kind):
    """The same refusals and messages as the other commands (common.fsutil), even with --force."""
    out = tmp_path / "o"
    if kind == "symlink":  # to an earlier output: --force would replace the directory it points to
        out.symlink_to(_earlier_output(tmp_path / "elsewhere"))
        message = ERR_OUT_SYMLINK.format(out=out)
    elif kind == "dangling symlink":
        out.symlink_to(tmp_path / "nowhere")
        message = ERR_OUT_SYMLINK.format(out=out)
    elif kind == "fifo":
        os.mkfifo(out)
        message = ERR_OUT_NOT_DIR.format(out=out, kind="a FIFO (named pipe)")
    elif kind == "file":
        out.write_text("mine")
        message = ERR_OUT_NOT_DIR.format(out=out, kind="a regular file")
    else:
        out = Path("/dev/null")
        message = ERR_OUT_NOT_DIR.format(out=out, kind="a character device")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["compress", "--model", str(float_dir), "--out", str(out), "--quantize", "int8", "--force",
                 *FAST]) == 2
    assert _err(capsys) == [f"fedpriv compress: --out {message}"]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    if kind == "symlink":
        assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "mine"


def test_force_never_replaces_its_own_inputs(tmp_path, float_dir, eval_file, capsys):
    """Even an earlier compress output (which --force may replace) is refused when it is --model or holds
    --eval-data."""
    import shutil

    model = tmp_path / "pruned"  # a pruned-only output is a float model: it may be compressed again
    shutil.copytree(float_dir, model)
    (model / MARKER).write_text(json.dumps({"format": 1, "quantization": None}))
    assert main(["compress", "--model", str(model), "--out", str(model), "--quantize", "int8", "--force"]) == 2
    assert _err(capsys) == [f"fedpriv compress: {ERR_OUT_HOLDS_INPUT.format(path=model, what='model', inner=model)}"]
    held = _earlier_output(tmp_path / "earlier")
    shutil.copy(eval_file, held / "held.csv")
    assert main(["compress", "--model", str(float_dir), "--out", str(held), "--quantize", "int8", "--force",
                 "--eval-data", str(held / "held.csv"), "--text-col", "review", "--label-col", "stars"]) == 2
    assert _err(capsys) == [f"fedpriv compress: {ERR_OUT_HOLDS_INPUT.format(path=held, what='evaluation file', inner=held / 'held.csv')}"]
    assert (model / "config.json").is_file() and (held / "held.csv").read_bytes() == eval_file.read_bytes()


def test_every_problem_is_reported_at_once_before_any_work(tmp_path):
    req = CompressRequest(model=str(tmp_path / "nope"), out=str(tmp_path / "o"), prune=2.0, group_col="site")
    with pytest.raises(CompressError) as exc:
        check_request(req)
    assert exc.value.problems == [ERR_MODEL_MISSING.format(path=tmp_path / "nope"), ERR_PRUNE_RANGE.format(value=2.0),
                                  ERR_NEEDS_EVAL.format(flag="group-col", value="site")]
    with pytest.raises(CompressError):
        compress(req)
    assert list(tmp_path.iterdir()) == []


def test_compressing_an_int8_dir_again_is_refused(tmp_path, int8_dir, capsys):
    assert main(["compress", "--model", str(int8_dir), "--out", str(tmp_path / "o"), "--prune", "0.1"]) == 2
    assert "already int8-quantized" in capsys.readouterr().err


def test_out_holding_the_working_directory_is_refused(tmp_path, float_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compress", "--model", str(float_dir), "--out", ".", "--quantize", "int8", "--force"]) == 2
    assert _err(capsys) == [f"fedpriv compress: {ERR_OUT_HOLDS_INPUT.format(path=Path('.'), what='working directory', inner=tmp_path)}"]


def test_a_bad_eval_file_is_named_and_nothing_is_written(tmp_path, float_dir, eval_file, capsys):
    out = tmp_path / "o"
    assert main(["compress", "--model", str(float_dir), "--out", str(out), "--quantize", "int8",
                 "--eval-data", str(eval_file), "--text-col", "comment", "--label-col", "stars"]) == 2
    err = capsys.readouterr().err
    assert "missing column 'comment'" in err and str(eval_file) in err
    assert list(tmp_path.iterdir()) == []
