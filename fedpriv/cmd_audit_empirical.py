"""``fedpriv audit empirical``: a one-run canary audit that bounds a node's DP-SGD ε from below.

Reached as ``fedpriv audit empirical ...`` (fedpriv/cli.py routes it here; ``fedpriv audit RUN_DIR`` is the
ledger audit) or as ``fedpriv audit-empirical ...``.
"""

from __future__ import annotations

import argparse
import json
import sys

from audit.empirical import AuditSettings, plot_scores, run_audit
from common.data import DataError, Schema, load_dataset, observed_labels
from fedpriv.options import MAX_LENGTH, NON_NEGATIVE, OPEN_UNIT, POSITIVE, int_at_least
from simulations.synthetic import make_synthetic


def register(sub) -> None:
    p = sub.add_parser(
        "audit-empirical", prog="fedpriv audit empirical",
        help="empirical ε lower bound of DP-SGD training from one run with canaries (also: fedpriv audit empirical)",
        description="Insert canaries (each with probability 1/2) into one node's training data, train once with "
        "the node's DP-SGD code, guess membership from the canaries' scores and turn the correct guesses into an "
        "ε lower bound at 95%% confidence (Steinke, Nasr, Jagielski 2023). A lower bound above the theoretical ε "
        "reveals a bug (exit 1); a bound below it certifies nothing.")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="public or synthetic training data to add canaries to (default: demo data)")
    d.add_argument("--text-col", default="text")
    d.add_argument("--label-col", default="label")
    d.add_argument("--examples", type=int_at_least(1), default=300, help="demo-data examples when --data is not given (300)")
    c = p.add_argument_group("canaries and guesses")
    c.add_argument("--canaries", type=int_at_least(2), default=200, help="number of canaries m (default 200)")
    c.add_argument("--words-per-canary", type=int_at_least(1), default=4, help="unused vocabulary words per canary (4)")
    c.add_argument("--guesses-in", type=int_at_least(0), help="guess 'in' for this many top scores (default m/5)")
    c.add_argument("--guesses-out", type=int_at_least(0), help="guess 'out' for this many bottom scores (default m/5)")
    c.add_argument("--score", choices=("embedding", "loss"), default="embedding",
                   help="embedding (white-box: how far the canary's word embeddings moved; needs full) or loss")
    c.add_argument("--confidence", type=OPEN_UNIT, default=0.95)
    m = p.add_argument_group("training (one node, the ClientApp's DP-SGD code)")
    m.add_argument("--model", default="tiny", help="tiny (default), minilm, or a local Hugging Face directory")
    m.add_argument("--train-part", choices=("full", "head", "lora", "classifier"), default="full")
    m.add_argument("--epochs", type=int_at_least(1), default=5)
    m.add_argument("--batch-size", type=int_at_least(1), default=32)
    m.add_argument("--lr", type=NON_NEGATIVE, default=1e-3, dest="learning_rate")
    m.add_argument("--max-length", type=MAX_LENGTH, default=32)
    m.add_argument("--device", default="auto")
    pr = p.add_argument_group("privacy")
    pr.add_argument("--epsilon", type=POSITIVE, default=8.0, help="target ε the noise is calibrated to (default 8)")
    pr.add_argument("--noise-multiplier", type=NON_NEGATIVE,
                    help="use this σ instead of calibrating (0 = a non-private control run)")
    pr.add_argument("--delta", type=OPEN_UNIT, default=1e-5)
    pr.add_argument("--clip", type=POSITIVE, default=1.0, dest="clipping_norm", help="clipping norm C (default 1)")
    pr.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    pr.add_argument("--seed", type=int, default=0, help="seed of canaries, coin flips and sampling")
    pr.add_argument("--noise-seed", type=int, help="seed the DP noise (default: OS entropy)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="OUT", help="write the JSON result here")
    o.add_argument("--plot", metavar="OUT.png", help="histogram of canary scores, included vs left out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path


    if args.data:
        schema = Schema(args.text_col, args.label_col, "")
        try:
            base = load_dataset(args.data, schema=schema, labels=observed_labels(args.data, schema=schema))
        except (DataError, OSError) as exc:
            print(f"fedpriv audit empirical: {exc}", file=sys.stderr)
            return 2
    else:
        base = make_synthetic(args.examples, seed=args.seed)
    s = AuditSettings(
        canaries=args.canaries, words_per_canary=args.words_per_canary, guesses_in=args.guesses_in,
        guesses_out=args.guesses_out, score=args.score, model=args.model, train_part=args.train_part,
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        clipping_norm=args.clipping_norm, epsilon=args.epsilon, noise_multiplier=args.noise_multiplier,
        delta=args.delta, accountant=args.accountant, max_length=args.max_length, confidence=args.confidence,
        seed=args.seed, noise_seed=args.noise_seed, device=args.device)
    try:
        res = run_audit(s, base=base, progress=lambda msg: print(f"audit: {msg}", file=sys.stderr))
    except ValueError as exc:
        print(f"fedpriv audit empirical: {exc}", file=sys.stderr)
        return 2
    theo = "inf (no noise)" if res.theoretical_epsilon is None else f"{res.theoretical_epsilon:.4f}"
    print(f"canaries {res.canaries} ({res.included} included), guesses {res.guesses}, correct {res.correct}")
    print(f"ε lower bound (95%): {res.epsilon_lower_bound:.4f}   theoretical ε: {theo}   "
          f"(σ={res.noise_multiplier:.4g}, q={res.sample_rate:.4g}, {res.steps} steps, δ={s.delta:g})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res.to_json(), indent=2) + "\n")
    if args.plot:
        plot_scores(res, Path(args.plot))
    if not res.consistent:
        print("FAILED: the empirical lower bound exceeds the theoretical ε: the training leaks more than its "
              "accounting claims", file=sys.stderr)
        return 1
    print("consistent: the lower bound does not exceed the theoretical ε (a lower bound finds bugs; it does not "
          "certify privacy)")
    return 0
