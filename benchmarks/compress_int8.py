"""int8 vs float32 side by side: weight bytes on disk, CPU latency per example, accuracy on a labelled file.

Both int8 variants are written to disk and loaded back through ``common.model.load_classifier`` (what
``fedpriv compress --quantize int8`` produces and what serving would load):

* ``int8``: Linear layers qint8 (dynamic) and embeddings 8-bit per row, the ``fedpriv compress`` default;
* ``int8_linear_only``: Linear layers only (embeddings stay float32), for comparison.

Latency is measured on CPU only, all models side by side on the same inputs (the first 64 rows of the file, or
built-in sentences), batch 1 and batch 32, median after warm-up. Quantized models run on CPU only; on a GPU
machine the float model is timed on CPU here too, so the ratio compares like with like.

    python benchmarks/compress_int8.py                  # offline MiniLM with an untrained head: size, latency
    python benchmarks/compress_int8.py --model RUN/model --eval-data dev.tsv --text-col sentence --label-col label

Targets (issue "fedpriv compress"): int8 >= 2x smaller, >= 1.5x faster, accuracy within 1 point.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SIZE_RATIO = 2.0
TARGET_SPEEDUP = 1.5
TARGET_ACCURACY_DROP = 0.01


def _untrained_minilm(out: Path, labels: tuple[str, ...]) -> Path:
    from common.model import ModelSpec, build_model, load_tokenizer, save_pretrained

    model = build_model(ModelSpec(source="minilm", labels=labels, train_part="full"))
    return save_pretrained(model, load_tokenizer("minilm"), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="saved float classifier directory (default: offline MiniLM, head untrained)")
    ap.add_argument("--eval-data", help="labelled file for accuracy")
    ap.add_argument("--text-col", default="text")
    ap.add_argument("--label-col", default="label")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    from common.data import Schema, load_dataset, observed_labels, sort_labels
    from serving.compress import (
        builtin_texts,
        load_classifier,
        measure_latency,
        quantize_int8,
        save_compressed,
        weight_files,
    )
    from serving.evaluation import evaluate_file, model_labels

    schema = Schema(args.text_col, args.label_col)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.model:
            model_dir = Path(args.model)
        else:
            labels = tuple(sort_labels(observed_labels(args.eval_data, schema=schema))) if args.eval_data \
                else ("negative", "positive")
            model_dir = _untrained_minilm(tmp / "float32", labels)
        fmodel, tok = load_classifier(model_dir, device="cpu")
        dirs = {"float32": model_dir}
        for name, embeddings in (("int8", True), ("int8_linear_only", False)):
            dirs[name] = save_compressed(quantize_int8(fmodel, embeddings=embeddings), tok, tmp / name,
                                         manifest={"source_model": str(model_dir)})
        models = {"float32": fmodel, **{n: load_classifier(d, device="cpu")[0] for n, d in dirs.items() if n != "float32"}}

        if args.eval_data:
            texts = load_dataset(args.eval_data, schema=schema, labels=model_labels(fmodel)).texts[:64]
        else:
            texts = builtin_texts()
        lat = measure_latency(models, tok, texts, warmup=args.warmup, repeats=args.repeats,
                              max_length=args.max_length, threads=args.threads)
        res: dict = {
            "model": str(args.model or "offline MiniLM-L6 (head untrained)"),
            "eval_data": args.eval_data,
            "device": "cpu",
            "torch_threads": lat["torch_threads"],
            "latency_inputs": f"{len(texts)} texts, max length {args.max_length}, median of {args.repeats} "
                              f"after {args.warmup} warm-up",
            "quantized_engine": torch.backends.quantized.engine,
            "torch": torch.__version__,
        }
        preds = {}
        for name, model in models.items():
            row = {"weight_bytes": sum(weight_files(dirs[name]).values()),
                   "ms_per_example_batch_1": lat["batch_1"][name], "ms_per_example_batch_32": lat["batch_32"][name]}
            if args.eval_data:
                ev = evaluate_file(model, tok, args.eval_data, schema=schema, max_length=args.max_length,
                                   device=torch.device("cpu"))
                row.update(accuracy=ev.report["accuracy"], macro_f1=ev.report["macro_f1"])
                preds[name] = ev.y_pred
            res[name] = row
    base = res["float32"]
    for name in ("int8", "int8_linear_only"):
        r = res[name]
        cmp = {"size_ratio": base["weight_bytes"] / r["weight_bytes"],
               "speedup_batch_1": base["ms_per_example_batch_1"] / r["ms_per_example_batch_1"],
               "speedup_batch_32": base["ms_per_example_batch_32"] / r["ms_per_example_batch_32"]}
        if args.eval_data:
            cmp["accuracy_delta"] = r["accuracy"] - base["accuracy"]
            cmp["macro_f1_delta"] = r["macro_f1"] - base["macro_f1"]
            cmp["prediction_agreement"] = float((preds[name] == preds["float32"]).mean())
        cmp["targets_met"] = {
            "size_ratio>=2": cmp["size_ratio"] >= TARGET_SIZE_RATIO,
            "speedup>=1.5 (batch 1 and 32)": min(cmp["speedup_batch_1"], cmp["speedup_batch_32"]) >= TARGET_SPEEDUP,
            "accuracy within 1 point": (cmp["accuracy_delta"] >= -TARGET_ACCURACY_DROP) if args.eval_data else None,
        }
        res[f"{name}_vs_float32"] = cmp
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
