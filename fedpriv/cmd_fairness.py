"""``fedpriv fairness``: utility and group-fairness report of any saved model on a labelled file."""

from __future__ import annotations

import argparse
import json
import sys

from common.data import DataError, Schema
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
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--min-group-size", type=int, default=30)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path


    try:
        model, tok = load_classifier(args.model, device=args.device)
        ev = evaluate_file(model, tok, args.data, schema=Schema(args.text_col, args.label_col, args.group_col),
                           max_length=args.max_length, min_group_size=args.min_group_size)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"fedpriv fairness: {exc}", file=sys.stderr)
        return 2
    report = {"model": str(args.model), "data": str(args.data), "group_col": args.group_col, **ev.report}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=float))
    if args.predictions_out:
        Path(args.predictions_out).write_text(predictions_csv(ev))
    gaps = (report.get("fairness") or {}).get("gaps") or {}
    eo = gaps.get("equalized_odds_difference")
    eo = eo.get("value") if isinstance(eo, dict) else eo
    print(f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}, "
          f"equalized odds difference {eo if eo is None else round(eo, 4)} -> {args.out}")
    return 0
