"""A whole federation on one machine, on Flower's simulation engine (Ray).

``prepare_nodes`` turns one dataset (a file or the synthetic demo) into N node folders, each exactly what a
real institution would have: its data partition (plaintext or a fedpriv container with its own key), a node
config (``node.json``: data path, key file, budget, state directory). ``run`` then starts Flower's
simulation runtime with the fedpriv ServerApp and ClientApp; virtual node *i* reads ``node-i/node.json``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.app import build_client_app
from common import crypto
from common.config import RunConfig
from common.data import (
    Schema,
    TextDataset,
    encode_records,
    load_dataset,
    observed_labels,
    to_records,
    write_dataset,
)
from server.app import build_server_app
from simulations.partition import partition
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


def prepare_nodes(cfg: RunConfig, opts: SimOptions, run_dir: Path) -> tuple[RunConfig, Path]:
    """Write node folders under ``run_dir/nodes``; return the config with labels/schema filled in."""

    ds = load_source(cfg, opts)
    if not opts.data:  # the synthetic data has its own column names
        cfg = cfg.replace(text_col="text", label_col="label", group_col=cfg.group_col or "group")
    cfg = cfg.replace(labels=",".join(ds.label_names))
    schema = Schema(cfg.text_col, cfg.label_col, cfg.group_col if ds.groups is not None else "")
    parts = partition(opts.partition, labels=ds.labels, groups=ds.groups, num_nodes=opts.nodes, seed=cfg.seed,
                      alpha=opts.alpha)
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
        if opts.count_noise_epsilon is not None:
            node_cfg["count-noise-epsilon"] = opts.count_noise_epsilon
        node_cfg.update({"share-exact-metrics": opts.share_exact_metrics,
                         "allow-fixed-noise-seed": opts.allow_fixed_noise_seed,
                         # the simulation's user speaks for every institution: a run without DP is their choice
                         "require-dp": cfg.dp})
        part = ds.subset(idx)
        if opts.encrypt:
            key_path = ndir / "dataset.key"
            if not key_path.exists():
                crypto.write_key_file(key_path, crypto.generate_key())
            # The partition is encrypted in memory: its plaintext never touches the node's disk.
            blob = crypto.encrypt_bytes(encode_records(to_records(part, schema=schema), fmt="jsonl"),
                                        key_source=crypto.KeySource.from_key_file(key_path), inner_name="data.jsonl")
            data_path = ndir / "data.jsonl.fpenc"
            data_path.write_bytes(blob)
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


def backend_config(num_nodes: int) -> dict[str, Any]:
    """One CPU per virtual ClientApp (so 2 run at once on 2 cores); a share of the GPU when one is present."""
    import torch

    cpus = os.cpu_count() or 1
    gpus = 1.0 / min(num_nodes, 4) if torch.cuda.is_available() else 0.0
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": gpus},
        "init_args": {"num_cpus": cpus, "num_gpus": 1 if gpus else 0, "logging_level": "ERROR",
                      "log_to_driver": False},
    }


class _KnownDeprecation(logging.Filter):
    """Drops Flower's one warning that ``run_simulation`` is deprecated: fedpriv uses it on purpose (in-process,
    no SuperLink left behind; docs/design.md); the warning would only alarm users of ``simulate``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("DEPRECATED FEATURE: The `run_simulation` function"))


def run(cfg: RunConfig, *, nodes_dir: Path, num_nodes: int, progress=None) -> None:
    """Run the federation in Flower's simulation engine and shut Ray down afterwards."""
    apply_env()
    import ray
    from flwr.simulation import run_simulation


    sync_node_split(cfg, nodes_dir)
    server_app = build_server_app(cfg, progress=progress)
    client_app = build_client_app(str(nodes_dir.resolve()))
    flwr_logger = logging.getLogger("flwr")
    hide = _KnownDeprecation()
    flwr_logger.addFilter(hide)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                       backend_name="ray", backend_config=backend_config(num_nodes))
    finally:
        flwr_logger.removeFilter(hide)
        if ray.is_initialized():
            ray.shutdown()
