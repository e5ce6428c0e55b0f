"""``fedpriv simulate``: a local federation on Flower's simulation engine."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from common.config import ConfigError, RunConfig, parse_kv_string
from common.data import DataError
from common.model import resolve_source
from server.rows import RoundRow
from server.rundir import RUN_MARKER, RunDir
from simulations.crossval import fold_configs, summarize, write_summary
from simulations.runner import (
    SimOptions,
    apply_env,
    check_fingerprint,
    data_fingerprint,
    node_key_dir,
    plan_nodes,
    prepare_nodes,
    record_fingerprint,
)
from simulations.runner import run as run_sim
from simulations.stop import MSG_INTERRUPTED, SimulationInterrupted, exit_now

ERR_OPTION = "{option} must be {allowed}, got {value}"
ERR_OUT_NOT_DIR = "--out {out} exists and is not a directory; give a directory for the run"
ERR_FRESH_NOT_RUN = ("--out {out} is not a fedpriv run directory (it has no {marker} marker); --fresh deletes only "
                     "run directories fedpriv created. Nothing was deleted: choose a new --out")
ERR_FRESH_LINK = "--out {out} is a symbolic link; --fresh deletes only a real run directory. Nothing was deleted"
ERR_FRESH_CWD = ("--out {out} contains the current directory; --fresh will not delete it. Nothing was deleted: "
                 "run from elsewhere or choose another --out")
ERR_OUT_FOREIGN = ("--out {out} is a non-empty directory that fedpriv did not create (no {marker} marker); "
                   "refusing to write a run into it: choose a new or empty directory")
ERR_NOTHING_TRAINED = "no round trained (all {failed} rounds run failed); the model is unchanged. Reasons:"


def register(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a whole federation on this machine (Flower simulation engine)",
        description="Split a dataset (default: built-in synthetic demo data) across N simulated institutions "
        "and fine-tune a BERT classifier together with FedAvg and per-node DP-SGD.",
    )
    add_data_arguments(p)
    f = p.add_argument_group("federation")
    f.add_argument("--nodes", type=int, default=4, help="simulated institutions (default 4)")
    f.add_argument("--rounds", type=int, help="server rounds (default 3)")
    f.add_argument("--partition", choices=("iid", "dirichlet", "group"), default="iid")
    f.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration for --partition dirichlet")
    f.add_argument("--seed", type=int, help="seed of every random choice (default 0)")
    f.add_argument("--out", help="run directory (default runs/sim-<time>); an existing one is resumed")
    f.add_argument("--fresh", action="store_true",
                   help="delete an existing --out first instead of resuming: only a run directory fedpriv created "
                   "(its .fedpriv-run marker), after every other check passed (docs/safety.md)")
    f.add_argument("--folds", type=int, default=0, metavar="K",
                   help="K-fold cross-validation: K federations, fold k of every node's data held out in "
                   "OUT/fold-k; mean and spread in OUT/cv.json (with DP the folds share each node's budget)")
    m = p.add_argument_group("model and training")
    m.add_argument("--model", help="minilm (default, offline), tiny, or a local Hugging Face directory")
    m.add_argument("--train-part", choices=("auto", "full", "head", "lora", "classifier"),
                   help="what trains (default auto: classifier, the output layer on the frozen encoder, under DP; "
                   "full without DP); recipes: docs/models.md")
    m.add_argument("--pooling", choices=("auto", "cls", "mean", "mean-layers"),
                   help="what the classifier reads (default auto: the model's own, mean for MiniLM; mean-layers: "
                   "every layer's token mean, averaged)")
    m.add_argument("--top-k-layers", type=int, help="with --train-part head: also train the top k layers (default 0)")
    m.add_argument("--local-epochs", type=int, help="local epochs per round (default: the train part's recipe)")
    m.add_argument("--batch-size", type=int, help="(expected) batch size (default: the train part's recipe)")
    m.add_argument("--lr", type=float, dest="learning_rate", help="AdamW learning rate (default: by train part)")
    m.add_argument("--max-length", type=int, help="tokens per example (default 64)")
    m.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    sel = p.add_argument_group("model selection and early stopping")
    sel.add_argument("--patience", type=int,
                     help="stop after this many rounds without improvement of --stop-metric (default 0: never); "
                     "keeps best/")
    sel.add_argument("--min-delta", type=float, help="an improvement must exceed this (default 0)")
    sel.add_argument("--stop-metric", help="auto (eval_accuracy with --eval-data, else accuracy), or any metric "
                     "key such as macro_f1, eval_macro_f1, loss (keys ending in loss are minimised)")
    sel.add_argument("--keep-best", action="store_true", default=None,
                     help="keep best/ (the best round by --stop-metric) beside model/ even without early stopping")
    add_privacy_arguments(p)
    add_run_arguments(p, run_config_help="more run config keys (see docs/configuration.md), or a TOML file of them (as "
                      "`fedpriv tune` writes)")
    p.set_defaults(func=run)


def add_run_arguments(p, *, run_config_help: str) -> None:
    """--run-config/--run-config-file, --quiet and --verbose (``fedpriv simulate`` and ``fedpriv tune``)."""
    p.add_argument("--run-config", "--run-config-file", default="", metavar='"k=v ..." | FILE.toml',
                   help=run_config_help)
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--verbose", action="store_true", help="log what every component does (INFO)")


def add_data_arguments(p) -> None:
    """The data flags (``fedpriv simulate`` and ``fedpriv tune``)."""
    d = p.add_argument_group("data")
    d.add_argument("--data", help="dataset file (CSV/TSV/JSONL/Parquet) to split across nodes; default: demo data")
    d.add_argument("--eval-data", help="server-held evaluation file, evaluated centrally every round")
    d.add_argument("--text-col", help="text column name (default text)")
    d.add_argument("--label-col", help="label column name (default label)")
    d.add_argument("--group-col", help="group column for fairness metrics (demo data: group)")
    d.add_argument("--synthetic-size", type=int, default=8000, help="examples of demo data (default 8000)")
    d.add_argument("--synthetic-skew", type=float, default=0.4, help="group label skew of the demo data")
    d.add_argument("--clean", metavar="RULES",
                   help="text cleaning on every node (and on --eval-data) before its split: comma list of "
                   "unicode, whitespace, urls, emails, handles, dedup, or all (default: none); "
                   "counts go to RUN_DIR/cleaning.json")


def add_privacy_arguments(p) -> None:
    """The simulated nodes' privacy flags (``fedpriv simulate`` and ``fedpriv tune``)."""
    pr = p.add_argument_group("privacy")
    pr.add_argument("--no-dp", action="store_true", help="train without DP-SGD (no privacy guarantee)")
    pr.add_argument("--epsilon", type=float, default=8.0, help="every simulated node's ε budget (default 8)")
    pr.add_argument("--delta", type=float, default=1e-5, help="every simulated node's δ (default 1e-5)")
    pr.add_argument("--encrypt", action="store_true", help="encrypt each node's partition (one key per node)")
    pr.add_argument("--count-noise-epsilon", type=float, default=None,
                    help="ε per round of each node's noised evaluation counts (default: the node default, 0.1; "
                    "0 = send no counts, or exact counts with --share-exact-metrics)")
    pr.add_argument("--share-exact-metrics", action="store_true",
                    help="the simulated institutions opt in to sending exact statistics outside the DP "
                    "guarantee (train loss/accuracy, evaluation loss; exact counts with --count-noise-epsilon 0)")
    pr.add_argument("--allow-fixed-noise-seed", action="store_true",
                    help="the simulated institutions honour --run-config noise-seed=N (reproducible runs that "
                    "carry no privacy guarantee; fedpriv audit fails them)")


def _bad(option: str, allowed: str, value) -> ConfigError:
    return ConfigError(ERR_OPTION.format(option=option, allowed=allowed, value=value))


def validate_options(args: argparse.Namespace) -> None:
    """The data, federation and privacy flags (shared with ``fedpriv tune``), before any work: one
    :class:`ConfigError` naming the flag, the accepted range and the value received."""
    import math

    def finite(x: float) -> bool:
        return math.isfinite(x)

    if args.nodes < 1:
        raise _bad("--nodes", ">= 1", args.nodes)
    if getattr(args, "alpha", None) is not None and not (finite(args.alpha) and args.alpha > 0):
        raise _bad("--alpha", "> 0 and finite", args.alpha)
    if not (finite(args.epsilon) and args.epsilon > 0):
        raise _bad("--epsilon", "> 0 and finite", args.epsilon)
    if not (finite(args.delta) and 0 < args.delta < 1):
        raise _bad("--delta", "> 0 and < 1", args.delta)
    if args.count_noise_epsilon is not None and not (finite(args.count_noise_epsilon)
                                                     and args.count_noise_epsilon >= 0):
        raise _bad("--count-noise-epsilon", ">= 0 and finite (0 = no counts, or exact ones with "
                   "--share-exact-metrics)", args.count_noise_epsilon)
    if args.synthetic_size < 1:
        raise _bad("--synthetic-size", ">= 1", args.synthetic_size)
    if not (finite(args.synthetic_skew) and 0 <= args.synthetic_skew < 1):
        raise _bad("--synthetic-skew", ">= 0 and < 1", args.synthetic_skew)
    folds = getattr(args, "folds", 0)
    if folds is not None and (folds < 0 or folds == 1):
        raise _bad("--folds", "0 (off) or >= 2", folds)
    if args.data and not Path(args.data).is_file():
        raise FileNotFoundError(f"--data {args.data}: no such file")
    if getattr(args, "eval_data", None) and not Path(args.eval_data).is_file():
        raise FileNotFoundError(f"--eval-data {args.eval_data}: no such file")


def _flag_names(message: str) -> str:
    """Add the flag to a run-config error about a key that has one (``config key 'num-server-rounds'``)."""
    for attr, key in FLAG_KEYS.items():
        if f"config key {key!r}" in message:
            flag = "--" + attr.replace("_", "-").replace("learning-rate", "lr")
            return message.replace(f"config key {key!r}", f"{flag} (config key {key!r})", 1)
    return message


def sim_options(args: argparse.Namespace):
    """:class:`simulations.runner.SimOptions` from the data, federation and privacy flags."""

    return SimOptions(nodes=args.nodes, data=args.data or "", synthetic_size=args.synthetic_size,
                      synthetic_skew=args.synthetic_skew, partition=args.partition, alpha=args.alpha,
                      epsilon=args.epsilon, delta=args.delta, encrypt=args.encrypt,
                      count_noise_epsilon=args.count_noise_epsilon,
                      share_exact_metrics=args.share_exact_metrics,
                      allow_fixed_noise_seed=args.allow_fixed_noise_seed)


def setup_logging(*, verbose: bool) -> None:
    """fedpriv's own log lines to stderr (WARNING, or INFO with --verbose); quiet Flower and transformers."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    fp_log = logging.getLogger("fedpriv")
    fp_log.addHandler(handler)
    fp_log.setLevel(logging.INFO if verbose else logging.WARNING)
    fp_log.propagate = False
    os.environ.setdefault("FLWR_LOG_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


FLAG_KEYS = {
    "eval_data": "eval-data", "text_col": "text-col", "label_col": "label-col", "group_col": "group-col",
    "rounds": "num-server-rounds", "seed": "seed", "out": "out", "model": "model", "train_part": "train-part",
    "pooling": "pooling", "top_k_layers": "top-k-layers", "local_epochs": "local-epochs", "batch_size": "batch-size",
    "learning_rate": "learning-rate", "max_length": "max-length", "device": "device", "clean": "clean",
    "patience": "early-stopping-patience", "min_delta": "early-stopping-min-delta",
    "stop_metric": "early-stopping-metric", "keep_best": "keep-best",
}


def load_run_config_arg(text: str) -> dict[str, object]:
    """``--run-config``: ``"k=v k2=v2"`` or a TOML file with top-level keys (as ``fedpriv tune`` writes)."""

    if not text:
        return {}
    path = Path(text)
    if text.endswith(".toml") and "=" not in text and not path.is_file():
        raise FileNotFoundError(f"run config file {text} does not exist")
    if text.endswith(".toml") and path.is_file():
        import tomllib

        data = tomllib.loads(path.read_text())
        flat: dict[str, object] = {}

        def walk(prefix: str, obj: dict) -> None:
            for k, v in obj.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict):
                    walk(key + ".", v)
                else:
                    flat[key] = v

        walk("", data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data))
        return flat
    return dict(parse_kv_string(text))


def build_config(args: argparse.Namespace):
    """Defaults < --run-config < explicit flags."""

    values: dict[str, object] = {}
    values.update(load_run_config_arg(args.run_config))
    for attr, key in FLAG_KEYS.items():
        v = getattr(args, attr, None)
        if v is not None:
            values[key] = v
    if args.no_dp:
        values["dp"] = False
    if "out" not in values:
        values["out"] = str(Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S"))
    return RunConfig.from_mapping(values)


def run(args: argparse.Namespace) -> int:
    try:
        validate_options(args)
        cfg = build_config(args)
        check_out_dir(Path(cfg.out), fresh=args.fresh)
        try:
            resolve_source(cfg.model)  # a missing model directory fails here, before any file is written
        except FileNotFoundError as exc:
            raise ConfigError(f"--model {cfg.model}: {exc}") from None
        opts = sim_options(args)
        plan = plan_nodes(cfg, opts)  # loads and splits the data: every data error before anything is written
        fingerprint = data_fingerprint(plan.cfg, opts)
        if not args.fresh:
            check_fingerprint(Path(cfg.out), fingerprint)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"fedpriv simulate: {_flag_names(str(exc))}", file=sys.stderr)
        return 2
    return _simulate(cfg, args, opts, plan, fingerprint)


def check_out_dir(out: Path, *, fresh: bool) -> None:
    """``--out`` may be new, an empty directory, or a run directory fedpriv created; ``--fresh`` deletes only
    the last kind, never a link, the current directory or one of its parents. Raises :class:`ConfigError`."""

    if out.is_symlink() and fresh:
        raise ConfigError(ERR_FRESH_LINK.format(out=out))
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(ERR_OUT_NOT_DIR.format(out=out))
    marked = RunDir(out).is_marked()
    if fresh:
        if not marked:
            raise ConfigError(ERR_FRESH_NOT_RUN.format(out=out, marker=RUN_MARKER))
        cwd = Path.cwd().resolve()
        if out.resolve() == cwd or out.resolve() in cwd.parents:
            raise ConfigError(ERR_FRESH_CWD.format(out=out))
    elif not marked and any(out.iterdir()):
        raise ConfigError(ERR_OUT_FOREIGN.format(out=out, marker=RUN_MARKER))


def _delete_run(out: Path) -> None:
    """--fresh, after :func:`check_out_dir`: the run directory and its simulated node keys (outside it)."""
    import shutil

    keys = node_key_dir(out)
    if out.exists():
        shutil.rmtree(out)
    if keys.is_dir():
        shutil.rmtree(keys)


def _simulate(cfg, args: argparse.Namespace, opts, plan, fingerprint) -> int:
    from rich.console import Console


    apply_env()
    console = Console(stderr=True)
    out = Path(cfg.out)
    if args.fresh:
        _delete_run(out)
    RunDir(out).mark()
    record_fingerprint(out, fingerprint)
    setup_logging(verbose=args.verbose)
    with console.status("preparing node data..."):
        cfg, nodes_dir = prepare_nodes(cfg, opts, out, plan)
    shown = cfg.resolved()  # auto and recipe values as the server will send them
    console.print(f"[bold]fedpriv simulate[/]: {opts.nodes} nodes, {cfg.num_server_rounds} rounds, model "
                  f"{cfg.model} ({shown.train_part}, batch {shown.batch_size}, {shown.local_epochs} local "
                  f"epoch{'s' if shown.local_epochs > 1 else ''}), DP {'on, ε=' + str(opts.epsilon) if cfg.dp else 'off'}, "
                  f"data {opts.data or 'synthetic demo'} -> {out}")
    start = time.perf_counter()
    try:
        if args.folds:
            return _cross_validate(cfg, args, opts, nodes_dir, console, start)
        display = RoundDisplay(console, cfg, quiet=args.quiet)
        committed = _committed_round(out)
        run_sim(cfg, nodes_dir=nodes_dir, num_nodes=opts.nodes, progress=display)
    except SimulationInterrupted as exc:  # Ray is down and no process of the run is left: exit at once
        exit_now(128 + int(getattr(signal, exc.signal_name, signal.SIGINT)),
                 f"fedpriv simulate: {MSG_INTERRUPTED.format(signal=exc.signal_name, out=out)}")
    display.finish()
    failure = nothing_trained(out, after_round=committed)
    if failure:
        print(f"fedpriv simulate: {failure}", file=sys.stderr)
        return 1
    stopped = _stop_reason(out)
    if stopped:
        console.print(f"[yellow]{stopped}[/]")
    best = " best/," if (out / "best").is_dir() else ""
    console.print(f"done in {time.perf_counter() - start:.0f}s. Outputs in [bold]{out}[/]: metrics.jsonl, "
                  f"model/,{best} report.md, report.html, ledgers/")
    return 0


def _cross_validate(cfg, args: argparse.Namespace, opts, nodes_dir: Path, console, start: float) -> int:
    """Run one federation per fold on the same node folders, then summarise mean and spread across folds."""
    from rich.table import Table


    out = Path(cfg.out)
    configs = fold_configs(cfg, folds=args.folds, budget=opts.epsilon, out=out)
    for k, fold_cfg in enumerate(configs):
        console.print(f"[bold]fold {k + 1}/{args.folds}[/] -> {fold_cfg.out}"
                      + (f" (nodes stay within ε {fold_cfg.epsilon:.3g} in total)" if fold_cfg.dp else ""))
        display = RoundDisplay(console, fold_cfg, quiet=args.quiet)
        committed = _committed_round(Path(fold_cfg.out))
        run_sim(fold_cfg, nodes_dir=nodes_dir, num_nodes=opts.nodes, progress=display)
        display.finish()
        failure = nothing_trained(Path(fold_cfg.out), after_round=committed)
        if failure:
            print(f"fedpriv simulate: fold {k}: {failure}", file=sys.stderr)
            return 1
    summary = summarize(out, args.folds)
    path = write_summary(out, summary)
    table = Table(title=f"{args.folds}-fold cross-validation (last round of each fold)")
    for col in ("metric", "mean", "std", "min", "max"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, st in summary["metrics"].items():
        table.add_row(key, *(f"{st[c]:.4f}" for c in ("mean", "std", "min", "max")))
    console.print(table)
    if summary["epsilon_total"]:
        console.print("ε spent over all folds: " + ", ".join(
            f"{n} {e:.3f}" for n, e in sorted(summary["epsilon_total"].items())))
    console.print(f"done in {time.perf_counter() - start:.0f}s. Outputs in [bold]{out}[/]: {path.name}, "
                  f"fold-0/ .. fold-{args.folds - 1}/ (each a run directory), nodes/")
    return 0


def _committed_round(run_dir: Path) -> int:
    """The last committed round of ``run_dir`` (0 for a new run)."""
    import json

    try:
        return int(json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def nothing_trained(run_dir: Path, *, after_round: int) -> str:
    """Why no round after ``after_round`` trained ("" when one did, or when no round was left to run).

    A round "trained" when its status is ok (enough nodes sent a usable update). The reasons are the rounds'
    own (too few updates) and every distinct node refusal, rejection and error, one per line after the first.
    """
    rows = [r for r in RunDir(run_dir).read_metrics() if int(r.get("round", 0)) > after_round]
    if not rows or any(r.get("status") == "ok" for r in rows):
        return ""
    reasons: list[str] = []
    for r in rows:
        for kind in ("refusals", "rejected", "errors"):
            for item in r.get(kind) or []:
                who = item.get("node") or f"node id {item.get('node_id')}"
                text = f"{who}: {' '.join(str(item.get('reason', '')).split())[:300]}"
                if text not in reasons:
                    reasons.append(text)
        if r.get("reason") and str(r["reason"]) not in reasons:
            reasons.append(str(r["reason"]))
    head = ERR_NOTHING_TRAINED.format(failed=len(rows))
    return "\n".join([head, *(f"  {x}" for x in reasons[:12])])


def _stop_reason(run_dir: Path) -> str:
    """Why the run stopped early, from metrics.jsonl ("" when it ran every round)."""

    return next((r.stopped for r in RunDir(run_dir).read_rows() if r.stopped), "")


class RoundDisplay:
    """Progress and a per-round table, driven by events from the ServerApp thread."""

    def __init__(self, console, cfg, *, quiet: bool) -> None:
        self.console = console
        self.cfg = cfg
        self.quiet = quiet
        self.status = None
        self.rows: list[RoundRow] = []

    def __call__(self, event: str, payload: dict) -> None:
        if self.quiet:
            return
        if event == "round_start":
            self._stop_status()
            self.status = self.console.status(f"round {payload['round']}/{self.cfg.num_server_rounds}: "
                                              "training and evaluating on the nodes...")
            self.status.start()
        elif event == "resume":
            self.console.print(f"resuming after round {payload['round']}")
        elif event == "round_end":
            self._stop_status()
            row = RoundRow.from_json(payload)
            self.rows.append(row)
            self.console.print(self._line(row))

    def _stop_status(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    @staticmethod
    def _fmt(v, d=3) -> str:
        return "—" if v is None else f"{v:.{d}f}"

    def _line(self, r: RoundRow) -> str:
        eps = r.epsilon
        gap = r.fairness.headline() if r.fairness is not None else None
        parts = [f"round {r.round:>2}", f"status {r.status}", f"acc {self._fmt(r.federated.accuracy)}",
                 f"macro-F1 {self._fmt(r.federated.macro_f1)}", f"loss {self._fmt(r.federated.loss)}"]
        if r.held_out is not None:
            parts.append(f"eval acc {self._fmt(r.held_out.accuracy)}")
        if eps:
            parts.append(f"ε max {max(eps.values()):.2f}")
        if gap is not None:
            parts.append(f"EO gap {gap:.3f}")
        if r.refusals:
            parts.append(f"[yellow]{len(r.refusals)} refused[/]")
        if r.rejected or r.errors:
            parts.append(f"[red]{len(r.rejected) + len(r.errors)} failed[/]")
        parts.append(f"{r.seconds:.0f}s")
        return " | ".join(parts)

    def finish(self) -> None:
        self._stop_status()
        if self.quiet or not self.rows:
            return
        from rich.table import Table

        t = Table(title="fedpriv simulate: per-round results")
        for col in ("round", "status", "accuracy", "macro-F1", "loss", "eval acc", "max ε", "EO gap", "nodes"):
            t.add_column(col, justify="right")
        for r in self.rows:
            eps = r.epsilon
            g = r.fairness.headline() if r.fairness is not None else None
            t.add_row(str(r.round), r.status, self._fmt(r.federated.accuracy), self._fmt(r.federated.macro_f1),
                      self._fmt(r.federated.loss), self._fmt(r.held_out.accuracy if r.held_out else None),
                      self._fmt(max(eps.values()) if eps else None, 2), self._fmt(g), str(r.nodes_trained))
        self.console.print(t)
