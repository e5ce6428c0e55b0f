"""A whole federation on one machine, on Flower's simulation engine (Ray).

``plan_nodes`` loads and checks one dataset (a file or the synthetic demo) and splits it, writing nothing;
``prepare_nodes`` turns the plan into N node folders, each exactly what a real institution would have: its
data partition (plaintext or a fedpriv container), a node config (``node.json``: data path, key file,
budget, state directory). With encryption each node's key lives *outside* the run directory, in
:func:`node_key_dir` (the run directory is shared with the coordinator in a real federation and must never
hold dataset keys). ``run`` then starts Flower's simulation runtime with the fedpriv ServerApp and
ClientApp; virtual node *i* reads ``node-i/node.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.app import build_client_app
from common import crypto
from common.config import ConfigError, RunConfig
from common.data import (
    Schema,
    TextDataset,
    encode_records,
    load_dataset,
    observed_labels,
    to_records,
    write_dataset,
)
from common.fsutil import atomic_write_bytes, atomic_write_text
from server.loop import run_federation
from simulations.partition import partition
from simulations.reaper import reap_on_death
from simulations.stop import (
    SimulationInterrupted,
    StoppableGrid,
    StopSignal,
    descendants,
    keep_our_sigterm_handler,
    kill_descendants,
    stop_on_signals,
)
from simulations.synthetic import make_synthetic

log = logging.getLogger("fedpriv.simulate")

QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # no "Loading weights" bars inside the round table
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # no C++ stack dump on SIGTERM/SIGINT from Ray's core worker: fedpriv stops with one line (simulations/stop.py)
    "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
}


@dataclass(frozen=True)
class SimOptions:
    """How to build the simulated institutions (data source, partitioning, budgets, encryption)."""

    nodes: int = 4
    data: str = ""  # a dataset file; empty = synthetic demo data
    synthetic_size: int = 8000  # examples of synthetic demo data (all nodes together)
    synthetic_skew: float = 0.4
    partition: str = "iid"  # iid | dirichlet | group
    alpha: float = 1.0
    epsilon: float = 8.0  # every simulated node's budget
    delta: float = 1e-5
    encrypt: bool = False  # encrypted partitions, one key per node
    count_noise_epsilon: float | None = None  # None: the node default (noised counts, NodeConfig)
    share_exact_metrics: bool = False  # the simulated institutions opt in to exact statistics
    allow_fixed_noise_seed: bool = False  # the simulated institutions honour a run-config noise-seed


def apply_env() -> None:
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def load_source(cfg: RunConfig, opts: SimOptions) -> TextDataset:
    """The dataset to split: a file (labels observed from it unless ``labels`` is set) or the demo data."""
    if opts.data:
        schema = Schema(cfg.text_col, cfg.label_col, cfg.group_col)
        labels = cfg.label_names or observed_labels(opts.data, schema=schema)
        return load_dataset(opts.data, schema=schema, labels=labels)

    return make_synthetic(opts.synthetic_size, seed=cfg.seed, label_skew=opts.synthetic_skew)


SIM_KEY_DIR_ENV = "FEDPRIV_SIM_KEY_DIR"
DEFAULT_SIM_KEY_DIR = Path("~/.fedpriv/sim-keys")
FINGERPRINT_FILE = "data-fingerprint.json"
ERR_DATA_CHANGED = ("{run_dir} was started on other data ({diff}); resuming would switch data mid-run. Resume "
                    "with the same --data and split options, or use a new --out (or --fresh)")


@dataclass(frozen=True)
class NodePlan:
    """What :func:`prepare_nodes` will write: the resolved config, the dataset and each node's row indices."""

    cfg: RunConfig
    dataset: TextDataset
    parts: list[np.ndarray]


def plan_nodes(cfg: RunConfig, opts: SimOptions) -> NodePlan:
    """Load and check the data and split it across the nodes; writes nothing. A split that cannot be made
    (more nodes than rows, a bad Dirichlet alpha, no group column) raises :class:`ConfigError` naming the flag."""

    ds = load_source(cfg, opts)
    if not opts.data:  # the synthetic data has its own column names
        cfg = cfg.replace(text_col="text", label_col="label", group_col=cfg.group_col or "group")
    cfg = cfg.replace(labels=",".join(ds.label_names))
    try:
        parts = partition(opts.partition, labels=ds.labels, groups=ds.groups, num_nodes=opts.nodes,
                          seed=cfg.seed, alpha=opts.alpha)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return NodePlan(cfg=cfg, dataset=ds, parts=parts)


def node_key_dir(run_dir: Path) -> Path:
    """Where ``simulate --encrypt`` keeps the simulated nodes' dataset keys: outside the run directory, in
    ``$FEDPRIV_SIM_KEY_DIR`` (default ``~/.fedpriv/sim-keys``), one folder per run directory (its name plus a
    hash of its absolute path), mode 0700."""
    base = Path(os.environ.get(SIM_KEY_DIR_ENV) or DEFAULT_SIM_KEY_DIR).expanduser()
    absolute = str(Path(run_dir).resolve())
    return base / f"{Path(absolute).name}-{hashlib.sha256(absolute.encode()).hexdigest()[:12]}"


def data_fingerprint(cfg: RunConfig, opts: SimOptions) -> dict[str, Any]:
    """What decides every node's data: the source file's SHA-256 (or the synthetic generator's settings) and
    the split options. Recorded in ``RUN_DIR/data-fingerprint.json``; a resume must match it."""
    fp: dict[str, Any] = {"nodes": opts.nodes, "partition": opts.partition, "seed": cfg.seed,
                          "text-col": cfg.text_col, "label-col": cfg.label_col, "group-col": cfg.group_col,
                          "clean": cfg.clean}
    if opts.partition == "dirichlet":
        fp["alpha"] = opts.alpha
    if opts.data:
        digest = hashlib.sha256()
        with open(opts.data, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        fp["data-sha256"] = digest.hexdigest()
    else:
        fp["synthetic"] = {"size": opts.synthetic_size, "skew": opts.synthetic_skew}
    return fp


def check_fingerprint(run_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` when ``run_dir`` recorded a different data fingerprint."""
    path = Path(run_dir) / FINGERPRINT_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"{path} is unreadable; cannot tell whether --data changed. Use a new --out") from None
    diff = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {_short(old.get(k))} -> {_short(fingerprint.get(k))}" for k in diff)
        raise ConfigError(ERR_DATA_CHANGED.format(run_dir=run_dir, diff=shown))


def record_fingerprint(run_dir: Path, fingerprint: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / FINGERPRINT_FILE, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text[:16] + "..." if len(text) > 19 and isinstance(value, str) else text


def prepare_nodes(cfg: RunConfig, opts: SimOptions, run_dir: Path,
                  plan: NodePlan | None = None) -> tuple[RunConfig, Path]:
    """Write node folders under ``run_dir/nodes`` (keys, with ``encrypt``, under :func:`node_key_dir`);
    return the config with labels/schema filled in. ``plan`` is :func:`plan_nodes`' result (made if None)."""

    plan = plan or plan_nodes(cfg, opts)
    cfg, ds, parts = plan.cfg, plan.dataset, plan.parts
    schema = Schema(cfg.text_col, cfg.label_col, cfg.group_col if ds.groups is not None else "")
    nodes_dir = run_dir / "nodes"
    nodes_dir.mkdir(parents=True, exist_ok=True)
    sizes = []
    for i, idx in enumerate(parts):
        ndir = nodes_dir / f"node-{i}"
        ndir.mkdir(parents=True, exist_ok=True, mode=0o700)
        node_cfg: dict[str, Any] = {
            "node-name": f"node-{i}",
            "state-dir": str((ndir / "state").resolve()),
            "epsilon": opts.epsilon,
            "delta": opts.delta,
            # one person runs every simulated institution: the cleaning counts may go to the run directory
            "share-cleaning-counts": True,
        }
        if ds.groups is not None:  # the simulation's groups are public: every node may name them in its counts
            node_cfg["groups"] = ",".join(sorted({str(g) for g in ds.groups}))
        if opts.count_noise_epsilon is not None:
            node_cfg["count-noise-epsilon"] = opts.count_noise_epsilon
        node_cfg.update({"share-exact-metrics": opts.share_exact_metrics or not cfg.dp,
                         "allow-fixed-noise-seed": opts.allow_fixed_noise_seed,
                         # the simulation's user speaks for every institution: a run without DP is their choice
                         "require-dp": cfg.dp})
        part = ds.subset(idx)
        if opts.encrypt:
            key_dir = node_key_dir(run_dir)
            key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            key_path = key_dir / f"node-{i}.key"
            if not key_path.exists():
                crypto.write_key_file(key_path, crypto.generate_key())
            # The partition is encrypted in memory: its plaintext never touches the node's disk.
            blob = crypto.encrypt_bytes(encode_records(to_records(part, schema=schema), fmt="jsonl"),
                                        key_source=crypto.KeySource.from_key_file(key_path), inner_name="data.jsonl")
            data_path = ndir / "data.jsonl.fpenc"
            atomic_write_bytes(data_path, blob)
            node_cfg.update({"data-path": str(data_path.resolve()), "key-file": str(key_path.resolve()),
                             "require-encryption": True})
        else:
            data_path = write_dataset(part, ndir / "data.jsonl", schema=schema)
            node_cfg["data-path"] = str(data_path.resolve())
        (ndir / "node.json").write_text(json.dumps(node_cfg, indent=2))
        sizes.append(len(idx))
    log.info("prepared %d nodes in %s: sizes %s", opts.nodes, nodes_dir, sizes)
    return cfg, nodes_dir


def sync_node_split(cfg: RunConfig, nodes_dir: Path) -> None:
    """Write the run's validation split, folds and accountant into every simulated node's ``node.json``.

    On a DP node these are the institution's own settings (the run config cannot choose which records answer
    evaluation queries); in a simulation one person speaks for every institution, so the simulation's choice
    (``--folds``, ``val-fraction``, ``accountant``) is written where each node reads it.
    """
    for path in sorted(Path(nodes_dir).glob("node-*/node.json")):
        node_cfg = json.loads(path.read_text())
        node_cfg.update({"val-fraction": cfg.val_fraction, "cv-folds": cfg.cv_folds, "cv-fold": cfg.cv_fold,
                         "accountant": cfg.accountant})
        path.write_text(json.dumps(node_cfg, indent=2))


def nodes_ledger_epsilon(nodes_dir: Path) -> dict[str, float]:
    """ε after the last entry of each simulated node's own ledger (``nodes_dir/node-i/state/ledger.jsonl``):
    the node's cumulative spend over every release it made (training and noised counts), in every run that
    shared its state directory."""
    import math

    out: dict[str, float] = {}
    for ledger in sorted(Path(nodes_dir).glob("node-*/state/ledger.jsonl")):
        lines = [x for x in ledger.read_text().splitlines() if x.strip()]
        value = json.loads(lines[-1]).get("epsilon") if lines else None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[ledger.parent.parent.name] = float(value)
    return out


def backend_config(num_nodes: int, *, temp_dir: Path) -> dict[str, Any]:
    """One CPU per virtual ClientApp (so 2 run at once on 2 cores); a share of the GPU when one is present.
    ``temp_dir``: the run's own Ray temporary directory (:func:`simulations.reaper.reap_on_death`)."""
    import torch

    cpus = os.cpu_count() or 1
    gpus = 1.0 / min(num_nodes, 4) if torch.cuda.is_available() else 0.0
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": gpus},
        "init_args": {"num_cpus": cpus, "num_gpus": 1 if gpus else 0, "logging_level": "ERROR",
                      "log_to_driver": False, "_temp_dir": str(temp_dir)},
    }


class _KnownDeprecation(logging.Filter):
    """Drops Flower's one warning that ``run_simulation`` is deprecated: fedpriv uses it on purpose (in-process,
    no SuperLink left behind; docs/design.md); the warning would only alarm users of ``simulate``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("DEPRECATED FEATURE: The `run_simulation` function"))


def run(cfg: RunConfig, *, nodes_dir: Path, num_nodes: int, progress=None) -> None:
    """Run the federation in Flower's simulation engine and shut Ray down afterwards.

    SIGINT and SIGTERM stop it within seconds (:mod:`simulations.stop`): the round in progress is dropped,
    Ray is shut down, no process of the run is left, and :class:`SimulationInterrupted` is raised. If this
    process is killed outright (``kill -9``), a separate reaper ends every process Ray started for the run
    (:mod:`simulations.reaper`).
    """
    apply_env()
    import ray
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    stop = StopSignal()
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context) -> None:  # noqa: ARG001 - the config is already resolved
        run_federation(StoppableGrid(grid, stop), cfg, progress=progress)

    sync_node_split(cfg, nodes_dir)
    client_app = build_client_app(str(nodes_dir.resolve()))
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    hide = _KnownDeprecation()
    flwr_logger.addFilter(hide)
    with reap_on_death() as ray_tmp:  # outermost: its reaper outlives a kill -9 of this process and ends the run
        try:
            with stop_on_signals(stop, out=str(cfg.out)), keep_our_sigterm_handler():
                try:
                    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                                   backend_name="ray", backend_config=backend_config(num_nodes, temp_dir=ray_tmp))
                except Exception:
                    if stop.signal_name:
                        raise SimulationInterrupted(stop.signal_name) from None
                    raise
                if stop.signal_name:
                    raise SimulationInterrupted(stop.signal_name)
        finally:
            flwr_logger.removeFilter(hide)
            flwr_logger.setLevel(level)
            ours = descendants() if stop.signal_name else []
            if ray.is_initialized():
                ray.shutdown()
            if stop.signal_name:
                kill_descendants(also=ours)  # whatever Ray left behind: nothing of the run may outlive it
