"""``fedpriv ledger verify LEDGER --pubkey KEY``: check a privacy ledger's chain and signatures."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser("ledger", help="privacy ledger tools")
    lsub = p.add_subparsers(dest="ledger_command", metavar="COMMAND")
    v = lsub.add_parser("verify", help="verify a ledger's hash chain and Ed25519 signatures",
                        description="Exit 0 when every entry verifies; otherwise print one line per problem, "
                        "naming the entry, and exit 1.")
    v.add_argument("ledger", metavar="LEDGER", help="ledger JSONL file (a node's ledger.jsonl or RUN_DIR/ledgers/X.jsonl)")
    v.add_argument("--pubkey", required=True, metavar="KEY", help="the node's Ed25519 public key (PEM)")
    v.add_argument("--expected-head", metavar="HEX", help="trusted hash of the last entry (detects truncation)")
    v.add_argument("--expected-count", type=int, metavar="N", help="trusted number of entries")
    v.add_argument("--json", action="store_true", help="print a JSON result")
    v.set_defaults(func=verify)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from common.ledger import load_public_key, verify_ledger

    if not Path(args.ledger).is_file():
        print(f"fedpriv ledger: {args.ledger}: no such file", file=sys.stderr)
        return 2
    try:
        key = load_public_key(args.pubkey)
    except (OSError, ValueError) as exc:
        print(f"fedpriv ledger: cannot load public key {args.pubkey}: {exc}", file=sys.stderr)
        return 2
    res = verify_ledger(args.ledger, key, expected_head=args.expected_head, expected_count=args.expected_count)
    if args.json:
        print(json.dumps({"ok": res.ok, "entries": len(res.entries), "head": res.head,
                          "problems": [str(p) for p in res.problems]}, indent=2))
    elif res.ok:
        last = res.entries[-1] if res.entries else {}
        print(f"{args.ledger}: OK, {len(res.entries)} entries, head {res.head[:16]}..., "
              f"ε after last entry {last.get('epsilon', 'n/a')}")
    else:
        for p in res.problems:
            print(f"{args.ledger}: {p}", file=sys.stderr)
    return 0 if res.ok else 1
