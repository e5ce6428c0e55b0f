"""``fedpriv status RUN_DIR``: rounds done, nodes seen, ε per node, last accuracy and fairness gap."""

from __future__ import annotations

import argparse
import json
import sys

from server.status import summarise


def register(sub) -> None:
    p = sub.add_parser("status", help="summarise a run directory")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def _f(v, d: int = 4) -> str:
    return "—" if v is None else f"{v:.{d}f}"


def run(args: argparse.Namespace) -> int:
    try:
        s = summarise(args.run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fedpriv status: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"run {s['run_id']} in {s['run_dir']}: {s['rounds_done']}/{s['rounds_planned']} rounds"
          f"{' (finished)' if s['finished'] else ''}; last accuracy {_f(s['last_accuracy'])}"
          + (f", eval accuracy {_f(s['last_eval_accuracy'])}" if s["last_eval_accuracy"] is not None else "")
          + f", equalized odds difference {_f(s['last_equalized_odds_difference'])}")
    if s["failed_rounds"]:
        print(f"failed rounds: {s['failed_rounds']}")
    for name, n in sorted(s["nodes"].items()):
        print(f"  {name}: trained {n['rounds_trained']} rounds, ε {_f(n.get('epsilon'), 3)}"
              + (f" of {_f(n['budget'], 3)} (left {_f(n.get('epsilon_left'), 3)})" if n.get("budget") else "")
              + (f", noise multiplier {_f(n['noise_multiplier'], 3)}" if n.get("noise_multiplier") else "")
              + f", refused {n['refusals']}, rejected {n['rejected']}")
        if n.get("warning"):
            print(f"    warning: {n['warning']}")
    return 0
