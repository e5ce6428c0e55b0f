"""``fedpriv audit empirical``: a one-run canary audit that tests a DP-SGD training run against its claimed ε.

Reached as ``fedpriv audit empirical ...`` (fedpriv/cli.py routes it here; ``fedpriv audit RUN_DIR`` is the
ledger audit) or as ``fedpriv audit-empirical ...``. Exit codes: 0 pass or inconclusive, 1 fail, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from audit.empirical import ERR_DATA, SCORES, AuditSettings, plot_scores, run_audit
from common.data import DataError, Schema, load_dataset, observed_labels
from simulations.synthetic import make_synthetic

ERR_PREFIX = "fedpriv audit empirical: "
VERDICT_LINES = {
    "fail": "FAIL: the empirical lower bound exceeds the claimed ε: the training leaks more than it claims",
    "inconclusive": ("INCONCLUSIVE: the ceiling is below the claimed ε, so these settings cannot fail the claim; "
                     "use more canaries or guesses (see docs/empirical-audit.md)"),
    "pass": ("PASS: no evidence against the claimed ε (an empirical lower bound finds bugs; it does not certify "
             "privacy)"),
}


def register(sub) -> None:
    p = sub.add_parser(
        "audit-empirical", prog="fedpriv audit empirical",
        help="test a DP-SGD training run against its claimed ε with canaries (also: fedpriv audit empirical)",
        description="Insert canaries (each with probability 1/2) into one node's training data, train once with "
        "the node's DP-SGD code, guess membership from the canaries' scores and turn the correct guesses into an "
        "ε lower bound at 95%% confidence (Steinke, Nasr, Jagielski 2023). The default attack observes "
        "white-box Dirac gradient canaries at every step (Nasr et al. 2021, 2023). Verdict: fail (exit 1) when "
        "the bound exceeds the claimed ε; inconclusive (exit 0) when even all-correct guesses could not; pass "
        "(exit 0) otherwise. See docs/empirical-audit.md.")
    c = p.add_argument_group("canaries and guesses")
    c.add_argument("--score", choices=SCORES, default="dirac",
                   help="dirac (default: per-step likelihood ratio of gradient canaries), dirac-sum (sum of the "
                   "per-step observations), embedding or loss (text canaries in BERT training; much weaker)")
    c.add_argument("--canaries", type=int, help="number of canaries m (default 20000 dirac, 200 text)")
    c.add_argument("--guesses-in", type=int, help="guess 'in' for this many top scores (default: chosen from "
                   "the claim before training (dirac), m/5 (text))")
    c.add_argument("--guesses-out", type=int, help="guess 'out' for this many bottom scores (default: as in)")
    c.add_argument("--confidence", type=float, default=0.95)
    m = p.add_argument_group("training (one node, the ClientApp's DP-SGD code)")
    m.add_argument("--epochs", type=int, help="epochs (default 10 dirac, 5 text)")
    m.add_argument("--batch-size", type=int, help="expected batch size (default n/4 dirac, 32 text)")
    m.add_argument("--steps-per-epoch", type=int, default=4,
                   help="dirac: q = 1/this when --batch-size is not given (default 4)")
    m.add_argument("--lr", type=float, dest="learning_rate",
                   help="learning rate (default: automatic plain SGD (dirac), 1e-3 AdamW (text))")
    m.add_argument("--device", default="auto")
    t = p.add_argument_group("text canaries (--score embedding or loss)")
    t.add_argument("--data", help="public or synthetic training data to add canaries to (default: demo data)")
    t.add_argument("--text-col", default="text")
    t.add_argument("--label-col", default="label")
    t.add_argument("--examples", type=int,
                   help="filler records (dirac, default 1000) or demo-data examples (text, default 300)")
    t.add_argument("--words-per-canary", type=int, default=4, help="unused vocabulary words per canary (4)")
    t.add_argument("--model", default="tiny", help="tiny (default), minilm, or a local Hugging Face directory")
    t.add_argument("--train-part", choices=("full", "head", "lora", "classifier"), default="full")
    t.add_argument("--max-length", type=int, default=32)
    pr = p.add_argument_group("privacy")
    pr.add_argument("--epsilon", type=float, default=8.0, help="target ε the noise is calibrated to (default 8)")
    pr.add_argument("--noise-multiplier", type=float,
                    help="train with this σ instead of calibrating (0 = no noise)")
    pr.add_argument("--claimed-epsilon", type=float, metavar="E",
                    help="audit against this claim (default: the accountant's ε of what ran)")
    pr.add_argument("--delta", type=float, default=1e-5)
    pr.add_argument("--clip", type=float, default=1.0, dest="clipping_norm", help="clipping norm C (default 1)")
    pr.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    pr.add_argument("--seed", type=int, default=0, help="seed of canaries, coin flips and sampling")
    pr.add_argument("--noise-seed", type=int, help="seed the DP noise (default: OS entropy)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="OUT", help="write the JSON result here")
    o.add_argument("--plot", metavar="OUT.png", help="histogram of canary scores, included vs left out")
    p.set_defaults(func=run)


def _fmt(eps: float | None) -> str:
    return "inf (no noise)" if eps is None or math.isinf(eps) else f"{eps:.4f}"


def run(args: argparse.Namespace) -> int:
    dirac = args.score.startswith("dirac")
    s = AuditSettings(
        score=args.score, canaries=args.canaries, guesses_in=args.guesses_in, guesses_out=args.guesses_out,
        epochs=args.epochs, batch_size=args.batch_size, steps_per_epoch=args.steps_per_epoch,
        base_examples=args.examples if dirac and args.examples is not None else 1000,
        learning_rate=args.learning_rate, words_per_canary=args.words_per_canary, model=args.model,
        train_part=args.train_part, max_length=args.max_length, clipping_norm=args.clipping_norm,
        epsilon=args.epsilon, noise_multiplier=args.noise_multiplier, claimed_epsilon=args.claimed_epsilon,
        delta=args.delta, accountant=args.accountant, confidence=args.confidence, seed=args.seed,
        noise_seed=args.noise_seed, device=args.device)
    try:
        if dirac and args.data:
            raise ValueError(ERR_DATA.format(score=args.score))
        s.check()
        base = None
        if not dirac:
            if args.data:
                schema = Schema(args.text_col, args.label_col, "")
                base = load_dataset(args.data, schema=schema, labels=observed_labels(args.data, schema=schema))
            else:
                base = make_synthetic(args.examples or 300, seed=args.seed)
        res = run_audit(s, base=base, progress=lambda msg: print(f"audit: {msg}", file=sys.stderr))
    except (ValueError, DataError, OSError) as exc:
        print(ERR_PREFIX + str(exc).splitlines()[0], file=sys.stderr)
        return 2
    print(f"canaries {res.canaries} ({res.included} included), guesses {res.guesses}, correct {res.correct}")
    print(f"ε lower bound ({s.confidence:.0%}): {res.epsilon_lower_bound:.4f}   ceiling: {res.epsilon_ceiling:.4f}"
          f"   claimed ε: {_fmt(res.epsilon_claimed)}   accountant ε of the run: {_fmt(res.theoretical_epsilon)}"
          f"   (σ={res.noise_multiplier:.4g}, q={res.sample_rate:.4g}, {res.steps} steps, δ={s.delta:g}, "
          f"{res.seconds:.1f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res.to_json(), indent=2) + "\n")
    if args.plot:
        plot_scores(res, Path(args.plot))
    print(f"verdict: {res.verdict}")
    print(VERDICT_LINES[res.verdict], file=sys.stderr if res.verdict == "fail" else sys.stdout)
    return 1 if res.verdict == "fail" else 0
