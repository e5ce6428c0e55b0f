"""Node-side logic behind the ClientApp handlers: the node's data, budget, accountant and ledger.

Everything here runs on the institution's machine. The node's settings come from its own node config
(``flower-supernode --node-config``), never from the server; the server's run config can only ask for
*less* privacy spending. Key material is read here and never leaves this process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import NodeConfig, RunConfig
from common.data import Encoded, Schema, TextDataset, encode, kfold_split, load_dataset, train_val_split

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
    from common.model import load_tokenizer

    if model_source not in _TOKENIZERS:
        _TOKENIZERS[model_source] = load_tokenizer(model_source)
    return _TOKENIZERS[model_source]


def key_source_for(node: NodeConfig):
    if not node.key_file and not node.passphrase_env:
        return None
    from common.crypto import KeySource

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
    from common.data import dataset_fingerprint

    # The fingerprint (which keys the node's accountant) is of the data as read, before cleaning: turning
    # cleaning on or off must not start a fresh privacy budget for the same records.
    fp = dataset_fingerprint(ds)
    cleaning: dict[str, int] = {}
    if cfg.clean:
        from common.cleaning import CleaningConfig, clean_dataset, counts_to_metrics

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


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed derived from the run seed and names (deterministic across processes)."""
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------- privacy


@dataclass
class DpPlan:
    """What this round will spend, decided before training."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_before: float
    epsilon_after: float
    budget: float
    delta: float
    accountant: str


class NodePrivacy:
    """The node's budget, persistent accountant and signed ledger, all in its state directory."""

    def __init__(self, node: NodeConfig, cfg: RunConfig, *, name: str, data: NodeData) -> None:
        from common.ledger import Ledger, load_or_create_node_key
        from common.privacy import NodeAccountant

        self.node = node
        self.cfg = cfg
        self.name = name
        self.data = data
        self.state_dir = node.resolved_state_dir(name)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The node's budget is the cap; the server may ask for less, never for more.
        self.budget = min(node.epsilon, cfg.epsilon) if cfg.epsilon > 0 else node.epsilon
        self.delta = min(node.delta, cfg.delta) if cfg.delta > 0 else node.delta
        self.accountant = NodeAccountant.load(
            self.state_dir / f"accountant-{data.fingerprint[:16]}-{cfg.accountant}.json",
            accountant=cfg.accountant,
            delta=self.delta,
        )
        self.key = load_or_create_node_key(self.state_dir)
        self.ledger = Ledger(self.state_dir / "ledger.jsonl", self.key)

    @property
    def public_key_path(self) -> Path:
        return self.state_dir / "node_ed25519.pub"

    def _run_file(self, run: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in run)
        return self.state_dir / f"run-{safe}.json"

    def plan(self, *, run: str, server_round: int, planned_rounds: int) -> tuple[DpPlan | None, str | None]:
        """Decide this round's noise multiplier; return (plan, None) or (None, refusal reason)."""
        from client.train import planned_dp_steps
        from common.privacy import DpSgdRelease, calibrate_noise_multiplier, check_budget

        n = len(self.data.train)
        if self.delta >= 1.0 / max(n, 1):
            return None, REFUSE_DELTA.format(delta=self.delta, inv=1.0 / max(n, 1), n=n)
        q, steps = planned_dp_steps(n, batch_size=self.cfg.batch_size, epochs=self.cfg.local_epochs)
        try:
            spent = self.accountant.epsilon()
        except ValueError as exc:
            return None, f"refusing to train: the privacy spent so far cannot be computed ({exc})"
        run_file = self._run_file(run)
        if run_file.exists():
            sigma = float(json.loads(run_file.read_text())["noise_multiplier"])
        else:
            # Calibrate once per run so that every planned round fits in what is left of the budget.
            remaining_rounds = max(planned_rounds - server_round + 1, 1)
            try:
                sigma = calibrate_noise_multiplier(
                    target_epsilon=self.budget,
                    delta=self.delta,
                    sample_rate=q,
                    steps=steps * remaining_rounds,
                    accountant=self.cfg.accountant,
                    prior_history=tuple(self.accountant.history),
                )
            except ValueError as exc:
                return None, f"refusing to train: {exc}"
            tmp = run_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"noise_multiplier": sigma, "sample_rate": q, "steps_per_round": steps,
                                       "planned_rounds": planned_rounds, "first_round": server_round}))
            os.replace(tmp, run_file)
        release = DpSgdRelease(noise_multiplier=sigma, sample_rate=q, steps=steps)
        try:
            after = self.accountant.epsilon_if(release)
        except ValueError as exc:  # an accountant that cannot evaluate these parameters: refuse, never guess
            return None, f"refusing to train: the privacy cost cannot be computed ({exc})"
        reason = check_budget(spent=spent, cost_after=after, budget=self.budget, delta=self.delta)
        if reason is not None:
            return None, reason
        return DpPlan(noise_multiplier=sigma, sample_rate=q, steps=steps, epsilon_before=spent,
                      epsilon_after=after, budget=self.budget, delta=self.delta,
                      accountant=self.cfg.accountant), None

    def commit(self, plan: DpPlan, *, run: str, server_round: int, noise_seed: int | None) -> dict[str, Any]:
        """Record the release in the accountant, then in the signed ledger; return the ledger entry."""
        import datetime as dt

        from common.privacy import DpSgdRelease

        release = DpSgdRelease(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps)
        self.accountant.commit(release)
        eps = self.accountant.epsilon()
        return self.ledger.append({
            "schema": 1,
            "kind": "dp-sgd",
            "run": run,
            "round": server_round,
            "node": self.name,
            "dataset": self.data.fingerprint,
            "accountant": plan.accountant,
            "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate,
            "steps": plan.steps,
            "clipping_norm": self.cfg.clipping_norm,
            "epsilon": eps,
            "epsilon_round": eps - plan.epsilon_before,
            "budget_epsilon": plan.budget,
            "noise_seed": noise_seed,
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        })

    # ---- idempotent rounds: a resumed server may ask again for a round this node already released.
    def _reply_file(self, run: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in run)
        return self.state_dir / f"last-release-{safe}.npz"

    def save_release(self, *, run: str, server_round: int, arrays: dict[str, np.ndarray], metrics: dict[str, Any],
                     entry: dict[str, Any]) -> None:
        """Keep this round's released update so that a repeated request re-sends it instead of training again
        (re-training would be a second release of the same round and spend ε twice)."""
        import io

        buf = io.BytesIO()
        keys = list(arrays)
        np.savez(buf, **{f"a{i}": arrays[k] for i, k in enumerate(keys)})
        meta = {"round": server_round, "keys": keys, "metrics": metrics, "entry": entry}
        path = self._reply_file(run)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
        meta_path = path.with_suffix(".json")
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_path)

    def released(self, *, run: str, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]] | None:
        """The update already released for (run, round), if this node has one and its ledger records it."""
        path = self._reply_file(run)
        meta_path = path.with_suffix(".json")
        if not (path.exists() and meta_path.exists()):
            return None
        meta = json.loads(meta_path.read_text())
        if int(meta["round"]) != server_round:
            return None
        hashes = {e.get("hash") for e in self.ledger.entries()}
        if meta["entry"].get("hash") not in hashes:
            return None
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[f"a{i}"] for i, k in enumerate(meta["keys"])}
        return arrays, meta["metrics"], meta["entry"]

    def count_noise_refusal(self, epsilon: float) -> str | None:
        """None when a count release of ``epsilon`` fits the budget, else why not."""
        from common.privacy import CountRelease, check_budget

        spent = self.accountant.epsilon()
        return check_budget(spent=spent, cost_after=self.accountant.epsilon_if(CountRelease(epsilon)),
                            budget=self.budget, delta=self.delta)

    def record_count_noise(self, *, run: str, server_round: int, epsilon: float) -> dict[str, Any]:
        """Account a noised-count release (pure ε, basic composition) and write its ledger entry."""
        import datetime as dt

        from common.privacy import CountRelease

        self.accountant.commit(CountRelease(epsilon))
        return self.ledger.append({
            "schema": 1,
            "kind": "count-noise",
            "run": run,
            "round": server_round,
            "node": self.name,
            "dataset": self.data.fingerprint,
            "mechanism": "discrete-laplace",
            "epsilon_release": epsilon,
            "epsilon": self.accountant.epsilon(),
            "delta": self.delta,
            "budget_epsilon": self.budget,
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        })


def finite(x: float) -> float:
    return x if math.isfinite(x) else float("nan")


def count_dict_to_json(cms: dict[str, np.ndarray], labels: list[str]) -> str:
    return json.dumps({"labels": labels, "groups": {g: np.asarray(m).tolist() for g, m in sorted(cms.items())}})
