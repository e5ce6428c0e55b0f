"""``fedpriv audit RUN_DIR``: verify ledgers and recompute every ε independently."""

from __future__ import annotations

import argparse
import sys

from audit.run import audit_run, coverage, write_reports


def register(sub) -> None:
    p = sub.add_parser("audit", help="verify a run's privacy ledgers and recompute every ε independently",
                       description="Verify hash chains and signatures, compare the server's and nodes' copies and "
                       "metrics.jsonl, recompute ε with Opacus (RDP, PRV) and dp-accounting (PLD), check budgets. "
                       "Exit 0 only when every check passes.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--pubkeys", metavar="DIR", help="trusted public keys <node>.pub obtained from the institutions")
    p.add_argument("--node-ledgers", metavar="DIR", help="the nodes' own ledgers as <node>.jsonl, to compare copies")
    p.add_argument("--json", metavar="OUT", help="write the JSON report here")
    p.add_argument("--html", metavar="OUT", help="write the HTML report here (chart PNG beside it)")
    p.add_argument("--md", metavar="OUT", help="write the Markdown report here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path


    if not Path(args.run_dir).is_dir():
        print(f"fedpriv audit: {args.run_dir}: not a directory", file=sys.stderr)
        return 2
    rep = audit_run(args.run_dir, pubkeys=args.pubkeys, node_ledgers=args.node_ledgers)
    write_reports(rep, json_out=Path(args.json) if args.json else None,
                  html_out=Path(args.html) if args.html else None, md_out=Path(args.md) if args.md else None)
    for node, info in sorted(rep.nodes.items()):
        r = info.get("recomputed_final") or {}
        claimed = info.get("claimed_final")
        print(f"{node}: {coverage(info)}, claimed ε "
              f"{claimed if claimed is None else round(claimed, 4)}, "
              + ", ".join(f"{k} {v:.4f}" for k, v in r.items())
              + (f"; budget {info['budget']:g} held to {info['held_to_budget']}" if info.get("budget") is not None
                 and info.get("held_to_budget") else ""))
    for f in rep.failures:
        print(f"FAILED {f}", file=sys.stderr)
    print(f"audit {'PASSED' if rep.passed else 'FAILED'}: {len(rep.findings) - len(rep.failures)} checks passed, "
          f"{len(rep.failures)} failed")
    return 0 if rep.passed else 1
