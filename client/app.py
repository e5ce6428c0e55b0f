"""The fedpriv ClientApp (Flower Message API): ``train`` and ``evaluate`` handlers.

Train reply: ``arrays`` (trainable tensors only), ``metrics`` (``num-examples`` = training examples, loss,
accuracy, bytes, ε, and with run-config ``clean`` and node config ``share-cleaning-counts`` the ``clean-*``
counts), ``info`` (node name, status, the ledger entry as JSON). A node that refuses (budget,
δ too large) replies with ``num-examples = 0``, no arrays, and the reason in ``info``; a node whose data cannot
be opened replies with a Flower error. Evaluate replies carry metrics and per-group confusion counts only,
never the model.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.budget import NodePrivacy, count_dict_to_json
from client.count_noise import noisy_group_confusions
from client.features import cached_features, node_store, predict_node
from client.node import load_node_config, load_node_data, node_name
from client.train import DpSettings, TrainSettings, grad_sample_mode_for, train_local
from common.config import RunConfig
from common.fairness import group_confusions
from common.model import (
    ModelSpec,
    build_model,
    choose_device,
    from_array_record,
    load_trainable,
    to_array_record,
    trainable_state,
)
from common.seeds import derived_seed

log = logging.getLogger("fedpriv.client")

ERROR_CODE_DATA = 4001  # the node's dataset could not be opened or validated
ERROR_CODE_TRAIN = 4002  # training failed on the node
ERROR_CODE_REFUSED = 4003  # a release would exceed the node's privacy budget


def _run_config(msg: Message) -> RunConfig:
    cfg = msg.content["config"]
    # resolved(): ``auto`` and recipe values (0) become concrete before anything trains or is accounted for
    return RunConfig.from_mapping({k: v for k, v in cfg.items() if not k.startswith("fedpriv-") and k != "server-round"},
                                  ignore_unknown=True).resolved()


def _build_model(cfg: RunConfig, node):
    source = node.model_dir or cfg.model
    spec = ModelSpec(source=source, labels=tuple(cfg.label_names), train_part=cfg.train_part,
                     top_k_layers=cfg.top_k_layers, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                     pooling=cfg.pooling)
    return build_model(spec), source


def _sampling_seed(cfg: RunConfig, name: str, server_round: int, *, private: bool) -> int:
    """Seed of the batch sampling (Poisson under DP). DP-SGD's amplification by subsampling assumes nobody can
    predict which records a step used, so under DP with noise from OS entropy (the deployment default) the
    sampling is seeded from OS entropy too. Only a run that fixes ``noise-seed`` (simulations, tests) derives
    it from the config, reproducibly: such a run makes no privacy claim against whoever knows the seeds.
    """
    if private and cfg.noise_seed < 0:
        import secrets

        return secrets.randbits(31)

    return derived_seed(cfg.seed, name, server_round)  # not the run id: same seed, same run


def _error_reply(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def handle_train(msg: Message, context: Context, *, sim_nodes_dir: str | None) -> Message:
    cfg = _run_config(msg)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    run = str(config.get("fedpriv-run", msg.metadata.run_id))
    planned_rounds = int(config.get("fedpriv-planned-rounds", cfg.num_server_rounds))
    try:
        node = load_node_config(dict(context.node_config), sim_nodes_dir)
        name = node_name(node, dict(context.node_config), context.node_id)
        model, source = _build_model(cfg, node)
        data = load_node_data(node, cfg, model_source=source)
    except Exception as exc:  # the reply must say why; the run continues without this node
        log.error("run=%s round=%s node_id=%s cannot open dataset: %s", run, server_round, context.node_id, exc)
        return _error_reply(msg, ERROR_CODE_DATA, f"dataset cannot be used: {exc}")

    info: dict[str, Any] = {"node": name, "status": "ok"}
    plan = None
    privacy = None
    if cfg.dp:
        privacy = NodePrivacy(node, cfg, name=name, data=data)
        again = privacy.released(run=run, server_round=server_round)
        if again is not None:
            arrays_np, metrics, entry = again
            log.warning("run=%s round=%s node=%s already released in this run: re-sending it, no new "
                        "training or ε", run, server_round, name)
            info.update(ledger_entry=entry, public_key=privacy.public_key_path.read_text(), replayed=True)
            return Message(RecordDict({
                "arrays": to_array_record(arrays_np),
                "metrics": MetricRecord(metrics),
                "info": ConfigRecord({"json": json.dumps(info)}),
            }), reply_to=msg)
        plan, refusal = privacy.plan(run=run, server_round=server_round, planned_rounds=planned_rounds)
        if refusal is not None:
            log.warning("run=%s round=%s node=%s refused: %s", run, server_round, name, refusal)
            info.update(status="refused", reason=refusal, epsilon=privacy.accountant.epsilon(),
                        budget=privacy.budget)
            return Message(RecordDict({
                "metrics": MetricRecord({"num-examples": 0}),
                "info": ConfigRecord({"json": json.dumps(info)}),
            }), reply_to=msg)

    incoming = from_array_record(msg.content["arrays"])
    load_trainable(model, incoming)
    device = choose_device(node.device or cfg.device)
    settings = TrainSettings(
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        max_physical_batch_size=cfg.max_physical_batch_size,
        learning_rate=cfg.effective_learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        seed=_sampling_seed(cfg, name, server_round, private=plan is not None),
    )
    dp = None
    noise_seed = None
    if plan is not None:
        noise_seed = derived_seed(cfg.noise_seed, name, server_round) if cfg.noise_seed >= 0 else None
        dp = DpSettings(noise_multiplier=plan.noise_multiplier, clipping_norm=cfg.clipping_norm,
                        grad_sample_mode=grad_sample_mode_for(cfg.train_part, cfg.top_k_layers), noise_seed=noise_seed)
    try:
        # frozen encoder (classifier alone trains): train on features computed once (memory + state dir)
        features = cached_features(model, data.train, source=source, device=device, **node_store(node, name))
        result = train_local(model, data.train, settings=settings, device=device, dp=dp, features=features)
    except Exception as exc:
        log.exception("run=%s round=%s node=%s training failed", run, server_round, name)
        return _error_reply(msg, ERROR_CODE_TRAIN, f"training failed: {type(exc).__name__}: {exc}")
    metrics: dict[str, Any] = {
        "num-examples": len(data.train),
        "train-loss": float(result.loss),
        "train-accuracy": float(result.accuracy),
        "train-seconds": float(result.seconds),
        # run-config ``clean``: counts per rule (numbers, never text), exact and so outside the DP guarantee:
        # sent only when the institution opted in (node config share-cleaning-counts=true)
        **(data.cleaning if node.share_cleaning_counts else {}),
    }
    if plan is not None and privacy is not None:
        entry = privacy.commit(plan, run=run, server_round=server_round, noise_seed=noise_seed)
        metrics.update({"epsilon": float(entry["epsilon"]), "epsilon-round": float(entry["epsilon_round"]),
                        "noise-multiplier": float(plan.noise_multiplier)})
        info.update(ledger_entry=entry, public_key=privacy.public_key_path.read_text())
    trained = trainable_state(model)
    arrays = to_array_record(trained)
    metrics["bytes-up"] = int(arrays.count_bytes())
    if plan is not None and privacy is not None:
        privacy.save_release(run=run, server_round=server_round, arrays=dict(trained), metrics=metrics,
                             entry=info["ledger_entry"])
    log.info("run=%s round=%s node=%s trained n=%d loss=%.4f eps=%s", run, server_round, name, len(data.train),
             result.loss, metrics.get("epsilon", "off"))
    return Message(RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord(metrics),
        "info": ConfigRecord({"json": json.dumps(info)}),
    }), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, *, sim_nodes_dir: str | None) -> Message:
    cfg = _run_config(msg)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    run = str(config.get("fedpriv-run", msg.metadata.run_id))
    try:
        node = load_node_config(dict(context.node_config), sim_nodes_dir)
        name = node_name(node, dict(context.node_config), context.node_id)
        model, source = _build_model(cfg, node)
        data = load_node_data(node, cfg, model_source=source)
    except Exception as exc:
        return _error_reply(msg, ERROR_CODE_DATA, f"dataset cannot be used: {exc}")
    load_trainable(model, from_array_record(msg.content["arrays"]))
    start = time.perf_counter()
    res = predict_node(model, data.val, source=source, device=choose_device(node.device or cfg.device),
                       **node_store(node, name))
    groups = data.val.groups if data.val.groups is not None else ["all"] * len(data.val)
    cms = group_confusions(res.y_true, res.y_pred, groups, num_classes=len(cfg.label_names))
    info: dict[str, Any] = {"node": name, "count_noise_epsilon": 0.0}
    eps_counts = max(node.count_noise_epsilon, cfg.count_noise_epsilon)
    if eps_counts > 0:
        # A count release is paid from the same budget as training and recorded in the same ledger.
        privacy = NodePrivacy(node, cfg, name=name, data=data)
        refusal = privacy.count_noise_refusal(eps_counts)
        if refusal is not None:
            return _error_reply(msg, ERROR_CODE_REFUSED, f"evaluation counts not released: {refusal}")
        rng = np.random.default_rng(derived_seed(cfg.seed, name, server_round, "counts") if cfg.noise_seed >= 0 else None)
        cms = noisy_group_confusions(cms, epsilon=eps_counts, rng=rng)
        info["count_noise_epsilon"] = eps_counts
        info["ledger_entry"] = privacy.record_count_noise(run=run, server_round=server_round, epsilon=eps_counts)
    n = len(data.val)
    metrics = {
        "num-examples": n,
        "loss-sum": float(res.loss_sum) if eps_counts == 0 else 0.0,
        "eval-seconds": time.perf_counter() - start,
    }
    info["counts"] = count_dict_to_json(cms, cfg.label_names)
    return Message(RecordDict({
        "metrics": MetricRecord(metrics),
        "info": ConfigRecord({"json": json.dumps(info)}),
    }), reply_to=msg)


def build_client_app(sim_nodes_dir: str | None = None) -> ClientApp:
    """A ClientApp. ``sim_nodes_dir`` is for simulations only: virtual nodes read their node config there."""
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, sim_nodes_dir=sim_nodes_dir)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, sim_nodes_dir=sim_nodes_dir)

    return client_app


# The deployment ClientApp (pyproject: clientapp = "client.app:app"): node settings from --node-config.
app = build_client_app()

__all__ = ["app", "build_client_app", "ArrayRecord"]
