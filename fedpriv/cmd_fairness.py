"""``fedpriv fairness``: utility and group-fairness report of any saved model on a labelled file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.data import DataError, Schema
from common.fsutil import UnsafeOutputError, atomic_write_text, check_output_file
from fedpriv.options import MAX_LENGTH, int_at_least
from serving.compress import load_classifier
from serving.evaluation import evaluate_file, predictions_csv


def register(sub) -> None:
    p = sub.add_parser("fairness", help="evaluate a saved model's accuracy and group fairness on a file",
                       description="Evaluate a saved classifier (a run's model/ or any Hugging Face directory) "
                       "on a labelled file and report per-group metrics and fairness gaps.")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="labelled file (CSV/TSV/JSONL/Parquet)")
    p.add_argument("--group-col", required=True, help="group column")
    p.add_argument("--text-col", default="text")
    p.add_argument("--label-col", default="label")
    p.add_argument("--out", required=True, help="report JSON path")
    p.add_argument("--predictions-out", help="CSV with one row per example: index, group, label, prediction, score")
    p.add_argument("--max-length", type=MAX_LENGTH, default=128, help="tokens per example (8-512, default 128)")
    p.add_argument("--min-group-size", type=int_at_least(0), default=30, help="smallest group reported (>= 0, default 30)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


ERR_SAME_OUTPUTS = "--out and --predictions-out are the same file ({path}); give two different paths"


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse outputs that would overwrite the data, a file of the model, each other, a link or a device."""
    inputs: list[tuple[str, str | Path | None]] = [("the --data file", args.data)]
    model_dir = Path(args.model)
    if model_dir.is_dir():
        inputs += [("a file of --model", f) for f in model_dir.iterdir() if f.is_file()]
    outs = [args.out] + ([args.predictions_out] if args.predictions_out else [])
    if len(outs) == 2 and Path(outs[0]).absolute() == Path(outs[1]).absolute():
        raise UnsafeOutputError(ERR_SAME_OUTPUTS.format(path=outs[0]))
    for out in outs:
        others = [("the other output", o) for o in outs if o is not out]
        check_output_file(out, inputs=[*inputs, *others], create_parent=True)


def run(args: argparse.Namespace) -> int:
    try:
        check_outputs(args)
        model, tok = load_classifier(args.model, device=args.device)
        ev = evaluate_file(model, tok, args.data, schema=Schema(args.text_col, args.label_col, args.group_col),
                           max_length=args.max_length, min_group_size=args.min_group_size)
    except (DataError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"fedpriv fairness: {exc}", file=sys.stderr)
        return 2
    report = {"model": str(args.model), "data": str(args.data), "group_col": args.group_col, **ev.report}
    atomic_write_text(args.out, json.dumps(report, indent=2, default=float))
    if args.predictions_out:
        atomic_write_text(args.predictions_out, predictions_csv(ev))
    gaps = (report.get("fairness") or {}).get("gaps") or {}
    eo = gaps.get("equalized_odds_difference")
    eo = eo.get("value") if isinstance(eo, dict) else eo
    print(f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}, "
          f"equalized odds difference {eo if eo is None else round(eo, 4)} -> {args.out}")
    return 0
