"""``fedpriv ledger verify LEDGER --pubkey KEY``: check a privacy ledger's hash chain and signatures.

Exit status: 0 when the ledger verifies (one summary line: entries, head, final ε); 1 when it does not (one
line per problem, naming the line and entry); 2 when the ledger or key cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from common.ledger import load_public_key, verify_ledger
from fedpriv.options import int_at_least

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
ERR_NO_FILE = "fedpriv ledger: {file}: no such file"
ERR_KEY = "fedpriv ledger: cannot use public key {file}: {reason}"
ERR_HEAD_ARG = "fedpriv ledger: --expected-head must be 64 hex digits (a SHA-256 entry hash); got {value!r}"


def register(sub) -> None:
    p = sub.add_parser("ledger", help="privacy ledger tools", description="Privacy ledger tools.")
    lsub = p.add_subparsers(dest="ledger_command", metavar="COMMAND")
    v = lsub.add_parser(
        "verify",
        help="verify a ledger's hash chain and Ed25519 signatures",
        description="Check every entry of a privacy ledger: canonical JSON, SHA-256 hash, prev_hash chain, "
        "contiguous index and the node's Ed25519 signature; and the signed head file next to it "
        "(ledger.head) when present. Exit 0 when everything verifies, 1 with one line per problem "
        "otherwise, 2 when a file cannot be read. Removing entries from the end is only visible "
        "against an anchor: the head file, --expected-head or --expected-count.",
    )
    v.add_argument("ledger", metavar="LEDGER",
                   help="ledger JSONL file (a node's state/ledger.jsonl or RUN_DIR/ledgers/NODE.jsonl)")
    v.add_argument("--pubkey", required=True, metavar="KEY",
                   help="the node's Ed25519 public key (PEM), as obtained from the institution")
    v.add_argument("--expected-head", metavar="HEX",
                   help="trusted hash of the last entry (e.g. from the server's copy): detects truncation")
    v.add_argument("--expected-count", type=int_at_least(0), metavar="N", help="trusted number of entries")
    v.add_argument("--segment", action="store_true",
                   help="LEDGER holds a contiguous part of a ledger (e.g. one run's entries), not from entry 0")
    v.add_argument("--json", action="store_true", help="print the result as one JSON object")
    v.set_defaults(func=verify)
    p.set_defaults(func=lambda args: (p.print_help(), EXIT_USAGE)[1])


def final_epsilon(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latest cumulative ε in ``entries`` and the pure-ε releases recorded after it (not in it)."""
    last = None
    for i, e in enumerate(entries):
        if isinstance(e.get("epsilon"), int | float) and not isinstance(e.get("epsilon"), bool):
            last = i
    later = [e for e in entries[(last + 1 if last is not None else 0):] if e.get("kind") == "count-noise"]
    if last is None and not later:
        return None
    out: dict[str, Any] = {"epsilon": None, "delta": None, "accountant": None, "entry": None}
    if last is not None:
        e = entries[last]
        out.update(epsilon=float(e["epsilon"]), delta=e.get("delta"), accountant=e.get("accountant"),
                   entry=e.get("index"))
    out["later_count_releases"] = len(later)
    out["later_count_epsilon"] = sum(float(e.get("epsilon_release") or 0.0) for e in later)
    return out


def _summary(path: str, res) -> str:
    eps = final_epsilon(res.entries)
    text = f"{path}: OK, {res.count} entries, head {res.head[:16]}"
    if eps is None:
        return text + ", no ε recorded"
    if eps["epsilon"] is not None:
        delta = f" at δ={eps['delta']:g}" if isinstance(eps["delta"], int | float) else ""
        acc = f" ({eps['accountant']})" if eps["accountant"] else ""
        text += f", final ε={eps['epsilon']:.4g}{delta}{acc} after entry {eps['entry']}"
    if eps["later_count_releases"]:
        text += (f", plus ε={eps['later_count_epsilon']:.4g} from {eps['later_count_releases']} later "
                 "count-noise release(s)")
    return text


def verify(args: argparse.Namespace) -> int:
    import re
    from pathlib import Path


    if not Path(args.ledger).is_file():
        print(ERR_NO_FILE.format(file=args.ledger), file=sys.stderr)
        return EXIT_USAGE
    if args.expected_head is not None and not re.fullmatch(r"[0-9a-f]{64}", args.expected_head):
        print(ERR_HEAD_ARG.format(value=args.expected_head), file=sys.stderr)
        return EXIT_USAGE
    try:
        key = load_public_key(args.pubkey)
    except (OSError, ValueError) as exc:
        print(ERR_KEY.format(file=args.pubkey, reason=exc), file=sys.stderr)
        return EXIT_USAGE
    res = verify_ledger(args.ledger, key, expected_head=args.expected_head, expected_count=args.expected_count,
                        segment=args.segment)
    if args.json:
        print(json.dumps({"ledger": args.ledger, "ok": res.ok, "entries": res.count, "head": res.head,
                          "final": final_epsilon(res.entries), "problems": [p.to_dict() for p in res.problems],
                          "notes": res.notes}, ensure_ascii=False))
    elif res.ok:
        print(_summary(args.ledger, res))
        for note in res.notes:
            print(f"{args.ledger}: note: {note}")
    else:
        for p in res.problems:
            print(f"{args.ledger}: {p}")
    return EXIT_OK if res.ok else EXIT_INVALID
