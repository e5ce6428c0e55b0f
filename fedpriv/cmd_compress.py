"""``fedpriv compress``: int8-quantize and/or prune a saved model; report size, CPU latency and fairness."""

from __future__ import annotations

import argparse
import sys

from common.data import DataError
from serving.compress import (
    PRUNE_SCOPES,
    QUANTIZE_CHOICES,
    REPORT_HTML,
    REPORT_JSON,
    REPORT_MD,
    CompressError,
    CompressRequest,
    compress,
    summary_rows,
)


def register(sub) -> None:
    p = sub.add_parser("compress", help="int8-quantize and/or prune a saved model for CPU serving",
                       description="Write a smaller copy of a saved classifier (int8 dynamic quantization of "
                       "Linear and Embedding weights, L1 magnitude pruning of Linear weights) that "
                       "fedpriv's loader reads, with a before/after report of size on disk, CPU latency and, "
                       "given --eval-data, accuracy, macro-F1 and fairness gaps.")
    p.add_argument("--model", required=True, help="saved float classifier directory (a run's model/)")
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty unless --force)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="int8 dynamic quantization (runs on CPU only)")
    p.add_argument("--prune", type=float, metavar="AMOUNT",
                   help="fraction of Linear weights to zero by magnitude, in [0, 1)")
    p.add_argument("--prune-scope", choices=PRUNE_SCOPES, default="global",
                   help="one magnitude threshold over all Linear layers (global) or AMOUNT in each layer")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (its contents are deleted)")
    p.add_argument("--eval-data", metavar="FILE", help="labelled file (CSV/TSV/JSONL/Parquet) for accuracy and fairness before/after")
    p.add_argument("--text-col", default="text")
    p.add_argument("--label-col", default="label")
    p.add_argument("--group-col", default="", help="group column for the fairness gaps")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--min-group-size", type=int, default=30)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads while timing (default 1, stable on a shared machine; 0: torch's default)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per model and batch size")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    req = CompressRequest(model=args.model, out=args.out, quantize=args.quantize, prune=args.prune,
                          prune_scope=args.prune_scope, force=args.force, eval_data=args.eval_data,
                          text_col=args.text_col, label_col=args.label_col, group_col=args.group_col,
                          max_length=args.max_length, min_group_size=args.min_group_size, threads=args.threads,
                          repeats=args.repeats)
    try:
        report = compress(req)
    except CompressError as exc:
        for line in exc.problems:
            print(f"fedpriv compress: {line}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"fedpriv compress: {exc}", file=sys.stderr)
        return 2
    _print_table(report)
    print(f"wrote {report['out']} ({REPORT_JSON}, {REPORT_MD}, {REPORT_HTML})")
    return 0


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table


    lat = report["latency"]
    t = Table(title=f"fedpriv compress: {report['model']} -> {report['out']}",
              caption=f"CPU, {lat['torch_threads']} torch thread(s), median of {lat['repeats']} repeats; "
              "compression can widen group gaps")
    for col, justify in (("figure", "left"), ("before", "right"), ("after", "right"), ("change", "right")):
        t.add_column(col, justify=justify)
    for row in summary_rows(report):
        t.add_row(*row)
    Console().print(t)
