"""Node-side logic behind the ClientApp handlers: the node's data, budget, accountant and ledger.

Everything here runs on the institution's machine. The node's settings come from its own node config
(``flower-supernode --node-config``), never from the server; the server's run config can only ask for
*less* privacy spending. Key material is read here and never leaves this process.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.cleaning import CleaningConfig, clean_dataset, counts_to_metrics
from common.config import NodeConfig, RunConfig
from common.crypto import KeySource
from common.data import (
    Encoded,
    Schema,
    TextDataset,
    dataset_fingerprint,
    encode,
    kfold_split,
    load_dataset,
    train_val_split,
)
from common.model import load_tokenizer

log = logging.getLogger("fedpriv.client")

ERR_NO_DATA = "node config has no 'data-path'; start the SuperNode with --node-config 'data-path=\"...\"'"
REFUSE_DELTA = (
    "refusing to train: delta={delta:g} is not below 1/n={inv:.3g} for this node's n={n} training examples; "
    "a δ that large allows releasing individual records. Set a smaller delta in the node config"
)


@dataclass
class NodeData:
    """The node's validated, split and tokenized dataset (cached per process)."""

    train: Encoded
    val: Encoded
    fingerprint: str
    n_total: int
    cleaning: dict[str, int] = field(default_factory=dict)  # run-config ``clean`` counts as train metrics


_DATA_CACHE: dict[tuple, NodeData] = {}
_TOKENIZERS: dict[str, Any] = {}


def node_name(node: NodeConfig, node_config: dict[str, Any], node_id: int) -> str:
    if node.node_name:
        return node.node_name
    if "partition-id" in node_config:
        return f"node-{int(node_config['partition-id'])}"
    return f"node-{node_id}"


def load_node_config(node_config: dict[str, Any], sim_nodes_dir: str | None) -> NodeConfig:
    """The node's own settings. In simulation each virtual node reads ``<sim_nodes_dir>/node-<pid>/node.json``."""
    values = dict(node_config)
    if sim_nodes_dir is not None and "partition-id" in values:
        path = Path(sim_nodes_dir) / f"node-{int(values['partition-id'])}" / "node.json"
        values.update(json.loads(path.read_text()))
    return NodeConfig.from_mapping(values)


def tokenizer_for(model_source: str):
    if model_source not in _TOKENIZERS:
        _TOKENIZERS[model_source] = load_tokenizer(model_source)
    return _TOKENIZERS[model_source]


def key_source_for(node: NodeConfig):
    if not node.key_file and not node.passphrase_env:
        return None

    if node.key_file:
        return KeySource.from_key_file(node.key_file)
    return KeySource.from_passphrase_env(node.passphrase_env)


def load_node_data(node: NodeConfig, cfg: RunConfig, *, model_source: str) -> NodeData:
    """Open (decrypting in memory if needed), validate, split and tokenize the node's dataset."""
    if not node.data_path:
        raise ValueError(ERR_NO_DATA)
    path = Path(node.data_path).expanduser()
    stat = path.stat() if path.exists() else None
    key = (str(path), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0, cfg.text_col, cfg.label_col,
           cfg.group_col, cfg.labels, cfg.val_fraction, cfg.seed, cfg.max_length, model_source, cfg.clean,
           cfg.cv_folds, cfg.cv_fold)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    ds: TextDataset = load_dataset(
        path,
        schema=Schema(cfg.text_col, cfg.label_col, cfg.group_col),
        labels=cfg.label_names,
        key_source=key_source_for(node),
        require_encryption=node.require_encryption,
    )

    # The fingerprint (which keys the node's accountant) is of the data as read, before cleaning: turning
    # cleaning on or off must not start a fresh privacy budget for the same records.
    fp = dataset_fingerprint(ds)
    cleaning: dict[str, int] = {}
    if cfg.clean:
        ds, counts = clean_dataset(ds, config=CleaningConfig.from_spec(cfg.clean))
        cleaning = counts_to_metrics(counts)
        log.info("node data %s cleaned (%s): %d -> %d rows", path.name, cfg.clean, counts["rows_in"],
                 counts["rows_out"])
    # The split depends on the run seed and the data itself, so it is stable across rounds and processes.
    split_seed = int.from_bytes(hashlib.sha256(f"{cfg.seed}:{fp}".encode()).digest()[:4], "little")
    if cfg.cv_folds >= 2:  # cross-validation: fold cv-fold of a seeded K-way partition is the validation set
        tr, va = kfold_split(len(ds), folds=cfg.cv_folds, fold=cfg.cv_fold, seed=split_seed)
    else:
        tr, va = train_val_split(len(ds), val_fraction=cfg.val_fraction, seed=split_seed)
    tok = tokenizer_for(model_source)
    data = NodeData(
        train=encode(ds.subset(tr), tok, max_length=cfg.max_length),
        val=encode(ds.subset(va), tok, max_length=cfg.max_length),
        fingerprint=fp,
        n_total=len(ds),
        cleaning=cleaning,
    )
    _DATA_CACHE.clear()  # one dataset per node process
    _DATA_CACHE[key] = data
    return data
