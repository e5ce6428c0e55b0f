"""``fedpriv simulate``: a local federation on Flower's simulation engine."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common.config import ConfigError, RunConfig, parse_kv_string
from common.data import DataError
from server.rundir import RunDir
from simulations.crossval import fold_configs, summarize, write_summary
from simulations.runner import SimOptions, apply_env, prepare_nodes
from simulations.runner import run as run_sim


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
    f.add_argument("--fresh", action="store_true", help="delete an existing --out first instead of resuming")
    f.add_argument("--folds", type=int, default=0, metavar="K",
                   help="K-fold cross-validation: K federations, fold k of every node's data held out in "
                   "OUT/fold-k; mean and spread in OUT/cv.json (with DP the folds share each node's budget)")
    m = p.add_argument_group("model and training")
    m.add_argument("--model", help="minilm (default, offline), tiny, or a local Hugging Face directory")
    m.add_argument("--train-part", choices=("auto", "full", "head", "lora", "classifier"),
                   help="what trains (default auto: classifier, the output layer on the frozen encoder, under DP; "
                   "full without DP); recipes: docs/models.md")
    m.add_argument("--pooling", choices=("auto", "cls", "mean"),
                   help="what the classifier reads (default auto: the model's own, mean for MiniLM)")
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
    add_run_arguments(p, run_config_help="more run config keys (see README), or a TOML file of them (as "
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
    pr.add_argument("--count-noise-epsilon", type=float, default=0.0,
                    help="nodes noise their evaluation counts with this ε per round (0 = exact counts)")


def sim_options(args: argparse.Namespace):
    """:class:`simulations.runner.SimOptions` from the data, federation and privacy flags."""

    return SimOptions(nodes=args.nodes, data=args.data or "", synthetic_size=args.synthetic_size,
                      synthetic_skew=args.synthetic_skew, partition=args.partition, alpha=args.alpha,
                      epsilon=args.epsilon, delta=args.delta, encrypt=args.encrypt,
                      count_noise_epsilon=args.count_noise_epsilon)


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
        cfg = build_config(args)
        return _simulate(cfg, args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"fedpriv simulate: {exc}", file=sys.stderr)
        return 2


def _simulate(cfg, args: argparse.Namespace) -> int:
    import shutil

    from rich.console import Console


    apply_env()
    console = Console(stderr=True)
    out = Path(cfg.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    opts = sim_options(args)
    setup_logging(verbose=args.verbose)
    with console.status("preparing node data..."):
        cfg, nodes_dir = prepare_nodes(cfg, opts, out)
    shown = cfg.resolved()  # auto and recipe values as the server will send them
    console.print(f"[bold]fedpriv simulate[/]: {opts.nodes} nodes, {cfg.num_server_rounds} rounds, model "
                  f"{cfg.model} ({shown.train_part}, batch {shown.batch_size}, {shown.local_epochs} local "
                  f"epoch{'s' if shown.local_epochs > 1 else ''}), DP {'on, ε=' + str(opts.epsilon) if cfg.dp else 'off'}, "
                  f"data {opts.data or 'synthetic demo'} -> {out}")
    start = time.perf_counter()
    if args.folds:
        return _cross_validate(cfg, args, opts, nodes_dir, console, start)
    display = RoundDisplay(console, cfg, quiet=args.quiet)
    run_sim(cfg, nodes_dir=nodes_dir, num_nodes=opts.nodes, progress=display)
    display.finish()
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
        run_sim(fold_cfg, nodes_dir=nodes_dir, num_nodes=opts.nodes, progress=display)
        display.finish()
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


def _stop_reason(run_dir: Path) -> str:
    """Why the run stopped early, from metrics.jsonl ("" when it ran every round)."""

    return next((str(r["stopped"]) for r in RunDir(run_dir).read_metrics() if r.get("stopped")), "")


class RoundDisplay:
    """Progress and a per-round table, driven by events from the ServerApp thread."""

    def __init__(self, console, cfg, *, quiet: bool) -> None:
        self.console = console
        self.cfg = cfg
        self.quiet = quiet
        self.status = None
        self.rows: list[dict] = []

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
            self.rows.append(payload)
            self.console.print(self._line(payload))

    def _stop_status(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    @staticmethod
    def _fmt(v, d=3) -> str:
        return "—" if v is None else f"{v:.{d}f}"

    def _line(self, r: dict) -> str:
        eps = r.get("epsilon") or {}
        gap = None
        fair = r.get("fairness") or {}
        gaps = fair.get("gaps") or {}
        g = gaps.get("equalized_odds_difference")
        gap = g.get("value") if isinstance(g, dict) else g
        parts = [f"round {r['round']:>2}", f"status {r.get('status')}", f"acc {self._fmt(r.get('accuracy'))}",
                 f"macro-F1 {self._fmt(r.get('macro_f1'))}", f"loss {self._fmt(r.get('loss'))}"]
        if "eval_accuracy" in r:
            parts.append(f"eval acc {self._fmt(r.get('eval_accuracy'))}")
        if eps:
            parts.append(f"ε max {max(eps.values()):.2f}")
        if gap is not None:
            parts.append(f"EO gap {gap:.3f}")
        if r.get("refusals"):
            parts.append(f"[yellow]{len(r['refusals'])} refused[/]")
        if r.get("rejected") or r.get("errors"):
            parts.append(f"[red]{len(r.get('rejected', [])) + len(r.get('errors', []))} failed[/]")
        parts.append(f"{r.get('seconds', 0):.0f}s")
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
            eps = r.get("epsilon") or {}
            gaps = (r.get("fairness") or {}).get("gaps") or {}
            g = gaps.get("equalized_odds_difference")
            g = g.get("value") if isinstance(g, dict) else g
            t.add_row(str(r["round"]), str(r.get("status")), self._fmt(r.get("accuracy")),
                      self._fmt(r.get("macro_f1")), self._fmt(r.get("loss")), self._fmt(r.get("eval_accuracy")),
                      self._fmt(max(eps.values()) if eps else None, 2), self._fmt(g),
                      str(r.get("nodes_trained")))
        self.console.print(t)
