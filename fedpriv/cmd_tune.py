"""``fedpriv tune``: hyperparameter search (Optuna TPE), every trial a short local federation.

The search logic is in :mod:`simulations.tune`; this module parses flags, prepares the simulated nodes once
(as ``fedpriv simulate`` does), prints the privacy warning for private data, and writes the outputs:
``best.toml``, ``trials.jsonl``, ``tune.json``, ``trials.png`` and, on private data, ``ledgers/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common.config import ConfigError, NodeConfig
from common.data import DataError
from fedpriv.cmd_simulate import (
    add_data_arguments,
    add_privacy_arguments,
    add_run_arguments,
    build_config,
    setup_logging,
    sim_options,
    validate_options,
)
from server.plots import plot_trials
from simulations import tune
from simulations.runner import apply_env, prepare_nodes
from simulations.tune import TuneError

ERR_OUT_EXISTS = "--out {out} already exists and is not empty; choose a new directory (a search is not resumed)"
ERR_NO_BEST = "no trial completed ({failed} failed); see trials.jsonl for the reasons"


def _count_noise_epsilon(opts, cfg) -> float:
    """ε of the simulated nodes' noised evaluation counts (0: exact or withheld): theirs, or less on request."""
    node = (opts.count_noise_epsilon if opts.count_noise_epsilon is not None
            else NodeConfig(epsilon=opts.epsilon).count_epsilon_per_round)
    return min(node, cfg.count_noise_epsilon) if node > 0 and cfg.count_noise_epsilon > 0 else node


def register(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="search learning rate, epochs, clipping norm, trainable part and batch size (Optuna TPE)",
        description="Run a seeded Optuna TPE search in which every trial is a short local federation (the "
        "fedpriv simulate runner), and write the best configuration as a run-config file that "
        "`fedpriv simulate --run-config-file` and `flwr run --run-config` accept. Tunes on data marked public "
        "or synthetic (default: the synthetic demo data); private data needs --data-is private --private-ok, "
        "and every trial's training is then accounted in the nodes' ledgers.",
    )
    add_data_arguments(p)
    d = p.add_argument_group("what the data is")
    d.add_argument("--data-is", choices=("public", "synthetic", "private"),
                   help="required with --data: public or synthetic data is tuned on freely; private data spends "
                        "the nodes' budget on every trial (needs --private-ok). Default for the demo data: synthetic")
    d.add_argument("--private-ok", action="store_true",
                   help="accept that tuning on private data spends the nodes' privacy budget (accounted, ledgered)")
    s = p.add_argument_group("search")
    s.add_argument("--trials", type=int, default=10, help="trials (default 10)")
    s.add_argument("--metric", help="what to maximise, from the last round: eval_accuracy, eval_macro_f1 (need "
                                    "--eval-data), accuracy, macro_f1 (default: eval_accuracy with --eval-data, "
                                    "else accuracy)")
    s.add_argument("--space", metavar="FILE.toml|FILE.json",
                   help="search space overrides: key = {low, high[, log]}, {choices = [...]} or a fixed value "
                        "(see docs/tuning.md)")
    s.add_argument("--tune-epsilon", type=float,
                   help="private data: ε the whole search may spend per node (default: half of --epsilon)")
    f = p.add_argument_group("federation (every trial)")
    f.add_argument("--nodes", type=int, default=4, help="simulated institutions (default 4)")
    f.add_argument("--rounds", type=int, default=2, help="server rounds per trial (default 2)")
    f.add_argument("--partition", choices=("iid", "dirichlet", "group"), default="iid")
    f.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration for --partition dirichlet")
    f.add_argument("--seed", type=int, help="seed of the data split, the trials and the sampler (default 0)")
    f.add_argument("--out", help="output directory, must be new or empty (default runs/tune-<time>)")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="minilm (default, offline), tiny, or a local Hugging Face directory")
    m.add_argument("--max-length", type=int, help="tokens per example (default 64)")
    m.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    add_privacy_arguments(p)
    add_run_arguments(p, run_config_help="run config keys every trial shares (searched keys are overridden by "
                      "the search)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _tune(args)
    except (ConfigError, DataError, TuneError, FileNotFoundError) as exc:
        print(f"fedpriv tune: {exc}", file=sys.stderr)
        return 2


def _warn(text: str) -> None:
    print(f"fedpriv tune: warning: {text}", file=sys.stderr)


def _tune(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = str(Path("runs") / time.strftime("tune-%Y%m%d-%H%M%S"))
    validate_options(args)
    cfg = build_config(args)
    policy = tune.tuning_policy(cfg, data=args.data or "", data_is=args.data_is, private_ok=args.private_ok,
                                trials=args.trials, metric=args.metric, epsilon=args.epsilon,
                                tune_epsilon=args.tune_epsilon)
    kind, private, metric = policy.kind, policy.private, policy.metric
    tune_epsilon = policy.tune_epsilon
    space = tune.load_space(args.space, base=cfg)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise tune.TuneError(ERR_OUT_EXISTS.format(out=out))

    from rich.console import Console


    apply_env()
    setup_logging(verbose=args.verbose)
    console = Console(stderr=True, quiet=args.quiet)
    opts = sim_options(args)
    out.mkdir(parents=True, exist_ok=True)
    with console.status("preparing node data..."):
        cfg, nodes_dir = prepare_nodes(cfg, opts, out)
    for text in policy.warnings(trials=args.trials, rounds=cfg.num_server_rounds, delta=opts.delta,
                                state=nodes_dir / "node-*" / "state",
                                count_noise_epsilon=_count_noise_epsilon(opts, cfg)):
        _warn(text)
    searched = [d.key for d in space.dims if d.low is not None or d.choices]
    console.print(f"[bold]fedpriv tune[/]: {args.trials} trials x {cfg.num_server_rounds} rounds on {opts.nodes} "
                  f"nodes, model {cfg.model}, metric {metric}, searching {', '.join(searched) or 'nothing'}; "
                  f"data {opts.data or 'synthetic demo'} ({kind}), DP {'on' if cfg.dp else 'off'} -> {out}")

    objective = tune.FederationObjective(base=cfg, out=out, nodes_dir=nodes_dir, num_nodes=opts.nodes,
                                         metric=metric, private=private, trials=args.trials,
                                         tune_epsilon=tune_epsilon)
    trials_path = out / "trials.jsonl"
    status = None

    def on_trial(rec: tune.TrialRecord) -> None:
        nonlocal status
        tune.append_trial(trials_path, rec)
        if status is not None:
            status.stop()
        value = f"{metric} {rec.value:.4f}" if rec.value is not None else f"[red]failed[/]: {rec.reason}"
        eps = f", ε this trial {max(rec.epsilon_trial.values()):.3g}" if rec.epsilon_trial else ""
        console.print(f"trial {rec.trial}/{args.trials}: {_fmt_params(rec.params, searched)} -> {value}{eps} "
                      f"({rec.seconds:.0f}s)")
        if rec.trial < args.trials:
            status = console.status(f"trial {rec.trial + 1}/{args.trials}: federating...")
            status.start()

    start = time.perf_counter()
    if not args.quiet:
        status = console.status(f"trial 1/{args.trials}: federating...")
        status.start()
    try:
        result = tune.search(objective, space=space, base=cfg, trials=args.trials, seed=cfg.seed, on_trial=on_trial)
    finally:
        if status is not None:
            status.stop()
    return _finish(console, result, args=args, cfg=cfg, out=out, policy=policy, searched=searched, space=space,
                   seconds=time.perf_counter() - start)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _fmt_params(params: dict, keys: list[str]) -> str:
    return " ".join(f"{k}={_fmt(params[k])}" for k in keys if k in params)


def _finish(console, result, *, args, cfg, out: Path, policy: tune.TuningPolicy, searched: list[str], space,
            seconds: float) -> int:
    from rich.table import Table

    kind, private, metric = policy.kind, policy.private, policy.metric
    budget, tune_epsilon = policy.budget, policy.tune_epsilon
    recs = result.records
    plot_trials([r.value for r in recs], out / "trials.png", metric=metric,
                title=f"fedpriv tune: {metric} per trial ({kind} data)")
    table = Table(title=f"fedpriv tune: {len(recs)} trials, {metric} after {cfg.num_server_rounds} rounds")
    for col in ("trial", "status", metric, *searched, "ε trial", "ε total", "s"):
        table.add_column(col, justify="right")
    for r in recs:
        mark = " *" if result.best is not None and r.trial == result.best.trial else ""
        table.add_row(f"{r.trial}{mark}", r.status, "—" if r.value is None else f"{r.value:.4f}",
                      *[_fmt(r.params.get(k)) for k in searched],
                      f"{max(r.epsilon_trial.values()):.3g}" if r.epsilon_trial else "—",
                      f"{max(r.epsilon.values()):.3g}" if r.epsilon else "—", f"{r.seconds:.0f}")
    console.print(table)

    spent = policy.spent(out / "nodes", recs)
    ledger_counts: dict[str, int] = {}
    if private:
        ledger_counts = tune.combine_ledgers([out / "trials" / f"trial-{r.trial:03d}" for r in recs],
                                             out / "ledgers")
    summary = {
        "data": args.data or "", "data_is": kind, "trials": args.trials, "rounds": cfg.num_server_rounds,
        "nodes": args.nodes, "metric": metric, "seed": cfg.seed, "model": cfg.model, "dp": cfg.dp,
        "space": [{k: v for k, v in vars(d).items() if k != "kind"} for d in space.dims],
        "node_budget_epsilon": budget, "tune_epsilon": tune_epsilon if private else None,
        "epsilon_spent_on_tuning": spent if private else None, "ledger_entries": ledger_counts,
        "best": result.best.to_json() if result.best is not None else None, "seconds": seconds,
    }
    (out / "tune.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    if result.best is None:
        print(f"fedpriv tune: {ERR_NO_BEST.format(failed=len(recs))}", file=sys.stderr)
        return 1
    best = result.best
    left = policy.left
    values = tune.best_run_config(cfg, best.params, epsilon=left)
    comments = [
        f"fedpriv tune: best of {len(recs)} trials is trial {best.trial}: {metric} = {best.value:.4f} after "
        f"{cfg.num_server_rounds} round(s) on {args.nodes} nodes ({kind} data, seed {cfg.seed}); all trials in "
        "trials.jsonl",
        "use: fedpriv simulate --run-config-file best.toml ...   or   flwr run . --run-config best.toml",
        "num-server-rounds is not set: the trials were short; choose the rounds of the real run",
    ]
    if private:
        comments.append(f"epsilon: tuning spent up to ε={spent:.4g} of each node's budget {budget:g} (trials' "
                        f"releases are in the nodes' ledgers, capped at the tuning budget {tune_epsilon:g}); the "
                        f"final run is asked to stay within the remaining {left:.4g} (basic composition; δ adds "
                        "up too)")
    tune.write_run_config_toml(out / "best.toml", values, comments=comments)
    console.print(f"best: trial {best.trial}, {metric} {best.value:.4f}: {_fmt_params(best.params, searched)}")
    if private:
        console.print(f"privacy: tuning spent ε up to {spent:.4g} per node (budget {budget:g}); node ledgers "
                      f"{out / 'nodes' / 'node-*' / 'state' / 'ledger.jsonl'}, coordinator's copies "
                      f"{out / 'ledgers'}")
    console.print(f"done in {seconds:.0f}s. Outputs in [bold]{out}[/]: best.toml, trials.jsonl, tune.json, "
                  f"trials.png, trials/ (the best trial keeps its model/){', ledgers/' if private else ''}")
    return 0
