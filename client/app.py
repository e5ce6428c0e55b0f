"""The fedpriv ClientApp (Flower Message API): ``train`` and ``evaluate`` handlers.

The node's guarantee is its own: the budget, δ, accountant, validation split, whether a fixed noise seed is
honoured and what statistics may leave come from its node config (:class:`common.config.NodeConfig`); the run
config can only ask for less spending or more noise. What leaves the node:

* train reply: ``arrays`` (trainable tensors only) and ``metrics`` with ``num-examples`` (treated as public),
  ``bytes-up`` and the accounting of the release (``epsilon``, ``epsilon-round``,
  ``noise-multiplier``, ``epsilon-budget``); ``info`` with the node name, status, the signed ledger entry and a
  warning when the round is mostly noise. Exact ``train-loss``/``train-accuracy`` only with the node config
  opt-in ``share-exact-metrics`` (with ``train-seconds``), cleaning counts only with ``share-cleaning-counts``;
* refusal: ``num-examples = 0``, no arrays, the reason in ``info``; a node whose data cannot be opened replies
  with a Flower error;
* evaluate reply: per-group confusion counts noised with ``count-noise-epsilon`` and ledgered (default), or
  exact with the opt-in, or withheld; never predictions or the model.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.budget import NodePrivacy, count_dict_to_json, finite
from client.count_noise import noisy_group_confusions
from client.features import cached_features, node_store, predict_node
from client.node import load_node_config, load_node_data, node_name
from client.train import DpSettings, TrainSettings, grad_sample_mode_for, train_local
from common.config import NodeConfig, RunConfig
from common.data import DataError
from common.fairness import group_confusions
from common.logs import deployment_logging
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


ERR_NO_IDENTITY = ("node config sets neither 'node-name' nor 'state-dir': a deployed node must name its state "
                   "directory itself (its ledger holds its whole privacy spend); without them it would be named "
                   "after the node id the SuperLink assigns, and a new id would open a fresh budget")
REFUSE_FIXED_SEED = ("refusing to train: the run config asks for a fixed noise seed (noise-seed={seed}) but this "
                     "node's config does not allow it (allow-fixed-noise-seed=false): whoever knows the seed can "
                     "subtract the noise, so the release would carry no privacy guarantee")
REFUSE_NO_DP = ("refusing to train: the run config asks for training without DP (dp=false) but this node "
                "requires DP-SGD (node config require-dp=true)")
NOTE_WITHHELD = "evaluation counts withheld: count-noise-epsilon is 0 and share-exact-metrics is false"
WITHHELD_DATA_ERROR = ("the node's data does not match the run config's schema or labels (the rows and values "
                       "are in the node's log, not sent)")


def _node_view(cfg: RunConfig, node: NodeConfig) -> RunConfig:
    """The run config as this node applies it: the values that decide which records answer which query
    (validation split, folds) and how the spend is accounted (accountant, δ) are the node's."""
    return cfg.replace(val_fraction=node.val_fraction, cv_folds=node.cv_folds, cv_fold=node.cv_fold,
                       accountant=node.accountant, delta=node.delta)


def _fixed_seed(cfg: RunConfig, node: NodeConfig) -> int | None:
    """The run config's noise seed when the node allows fixed seeds, else None (OS entropy)."""
    return cfg.noise_seed if cfg.noise_seed >= 0 and node.allow_fixed_noise_seed else None


def _sampling_seed(cfg: RunConfig, node: NodeConfig, *, run: str, name: str, server_round: int,
                   private: bool) -> int:
    """Seed of the batch sampling (Poisson under DP). DP-SGD's amplification by subsampling assumes nobody can
    predict which records a step used, so under DP the sampling is seeded from OS entropy, unless the node
    allows a fixed seed (simulations, tests): then it is derived from the seed, the run id, the node and the
    round, reproducibly, and such a run makes no privacy claim against whoever knows the seed.
    """
    if not private:  # no DP: reproducible from the run seed, as any other non-privacy randomness
        return derived_seed(cfg.seed, name, server_round)
    fixed = _fixed_seed(cfg, node)
    if fixed is None:
        return secrets.randbits(63)
    return derived_seed(fixed, run, name, server_round, "sampling")


def _error_reply(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _info_reply(msg: Message, info: dict[str, Any], metrics: dict[str, Any], arrays=None) -> Message:
    content: dict[str, Any] = {"metrics": MetricRecord(metrics), "info": ConfigRecord({"json": json.dumps(info)})}
    if arrays is not None:
        content["arrays"] = arrays
    return Message(RecordDict(content), reply_to=msg)


def _open(msg: Message, context: Context, sim_nodes_dir: str | None):
    """(cfg as the node applies it, node config, name, model, model source, data) or raise with the reason."""
    cfg = _run_config(msg)
    node = load_node_config(dict(context.node_config), sim_nodes_dir)
    if sim_nodes_dir is None and not (node.node_name or node.state_dir):
        raise ValueError(ERR_NO_IDENTITY)
    cfg = _node_view(cfg, node)
    name = node_name(node, dict(context.node_config), context.node_id)
    model, source = _build_model(cfg, node)
    data = load_node_data(node, cfg, model_source=source)
    return cfg, node, name, model, source, data


def _public_reason(exc: Exception) -> str:
    """What a failed data load may tell the coordinator. A :class:`DataError` names rows and quotes their values
    (a label, a text): with a run config choosing the columns that would send records out, so the reply says
    only what kind of problem it was; the full message is in the node's own log."""
    if isinstance(exc, DataError):
        return WITHHELD_DATA_ERROR
    return str(exc)


def _group_view(groups: list[str] | None, n: int, node: NodeConfig) -> tuple[list[int], list[str], list[str]]:
    """(the validation rows counted, their released group names, every name the release carries).

    Group names come from the node's own public list (node config ``groups``): rows of any other group are left
    out of the counts, so no name is ever taken from the data (the group column is the coordinator's choice).
    Without a list, or without a group column, every row counts in one group ``all``.
    """
    allowed = node.group_names
    if groups is None or not allowed:
        return list(range(n)), ["all"] * n, ["all"]
    listed = set(allowed)
    keep = [i for i, g in enumerate(groups) if g in listed]
    return keep, [groups[i] for i in keep], list(allowed)


def _refusal(cfg: RunConfig, node: NodeConfig) -> str | None:
    """Why this node refuses the run config before looking at its budget, or None."""
    if not cfg.dp and node.require_dp:
        return REFUSE_NO_DP
    if cfg.dp and cfg.noise_seed >= 0 and not node.allow_fixed_noise_seed:
        return REFUSE_FIXED_SEED.format(seed=cfg.noise_seed)
    return None


def handle_train(msg: Message, context: Context, *, sim_nodes_dir: str | None) -> Message:
    config = msg.content["config"]
    server_round = int(config["server-round"])
    run = str(config.get("fedpriv-run", msg.metadata.run_id))
    planned_rounds = int(config.get("fedpriv-planned-rounds", _run_config(msg).num_server_rounds))
    try:
        cfg, node, name, model, source, data = _open(msg, context, sim_nodes_dir)
    except Exception as exc:  # the reply must say why; the run continues without this node
        log.error("run=%s round=%s node_id=%s cannot open dataset: %s", run, server_round, context.node_id, exc)
        return _error_reply(msg, ERROR_CODE_DATA, f"dataset cannot be used: {_public_reason(exc)}")

    info: dict[str, Any] = {"node": name, "status": "ok"}
    refusal = _refusal(cfg, node)
    if refusal is not None:
        log.warning("run=%s round=%s node=%s refused: %s", run, server_round, name, refusal)
        return _info_reply(msg, {**info, "status": "refused", "reason": refusal}, {"num-examples": 0})
    plan = privacy = None
    if cfg.dp:
        privacy = NodePrivacy(node, cfg, name=name, data=data)
        again = privacy.released(run=run, server_round=server_round)
        if again is not None:
            arrays_np, metrics, entry = again
            log.info("run=%s round=%s node=%s re-sent its stored update for this round (no new training, no "
                     "new ε)", run, server_round, name)
            info.update(ledger_entry=entry, public_key=privacy.public_key_path.read_text(), replayed=True)
            return _info_reply(msg, info, metrics, to_array_record(arrays_np))
        plan, refusal = privacy.plan(run=run, server_round=server_round, planned_rounds=planned_rounds)
        if refusal is not None:
            log.warning("run=%s round=%s node=%s refused: %s", run, server_round, name, refusal)
            info.update(status="refused", reason=refusal, epsilon=finite(privacy.epsilon()), budget=privacy.budget)
            return _info_reply(msg, info, {"num-examples": 0})

    load_trainable(model, from_array_record(msg.content["arrays"]))
    settings = TrainSettings(
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        max_physical_batch_size=cfg.max_physical_batch_size,
        learning_rate=cfg.effective_learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        seed=_sampling_seed(cfg, node, run=run, name=name, server_round=server_round, private=plan is not None),
    )
    dp = noise_seed = None
    if plan is not None:
        fixed = _fixed_seed(cfg, node)
        noise_seed = derived_seed(fixed, run, name, server_round, "noise") if fixed is not None else None
        dp = DpSettings(noise_multiplier=plan.noise_multiplier, clipping_norm=cfg.clipping_norm,
                        grad_sample_mode=grad_sample_mode_for(cfg.train_part, cfg.top_k_layers), noise_seed=noise_seed)
    try:
        device = choose_device(node.device or cfg.device)
        # frozen encoder (classifier alone trains): train on features computed once (memory + state dir)
        features = cached_features(model, data.train, source=source, device=device, **node_store(node, name))
        result = train_local(model, data.train, settings=settings, device=device, dp=dp, features=features)
    except Exception as exc:
        log.exception("run=%s round=%s node=%s training failed", run, server_round, name)
        return _error_reply(msg, ERROR_CODE_TRAIN, f"training failed: {type(exc).__name__}: {exc}")
    # What leaves the node: the update and num-examples (public), and the accounting of the release. Exact
    # statistics of the records (loss, accuracy, cleaning counts) only when the institution opted in.
    metrics: dict[str, Any] = {"num-examples": len(data.train)}
    if node.share_exact_metrics:  # the training time depends on the Poisson batch sizes: a side channel too
        metrics.update({"train-loss": float(result.loss), "train-accuracy": float(result.accuracy),
                        "train-seconds": float(result.seconds)})
    if node.share_cleaning_counts:
        metrics.update(data.cleaning)
    # a hostile learning rate can make the loss infinite: nothing non-finite is stored or sent
    metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}
    trained = trainable_state(model)
    if plan is not None and privacy is not None:
        entry = privacy.commit(plan, run=run, server_round=server_round, noise_seed=noise_seed,
                               steps_executed=result.steps)
        metrics.update({"epsilon": float(entry["epsilon"]), "epsilon-round": float(entry["epsilon_round"]),
                        "noise-multiplier": float(plan.noise_multiplier),
                        "epsilon-budget": float(plan.budget)})
        info.update(ledger_entry=entry, public_key=privacy.public_key_path.read_text())
        warning = privacy.noisy_round_warning(plan, trainable_weights=sum(int(a.size) for a in trained.values()))
        if warning is not None:
            info["warning"] = warning
            log.warning("run=%s round=%s node=%s %s", run, server_round, name, warning)
    arrays = to_array_record(trained)
    metrics["bytes-up"] = int(arrays.count_bytes())
    if plan is not None and privacy is not None:
        privacy.save_release(run=run, server_round=server_round, arrays=dict(trained), metrics=metrics,
                             entry=info["ledger_entry"])
    log.info("run=%s round=%s node=%s trained n=%d steps=%d eps=%s", run, server_round, name, len(data.train),
             result.steps, metrics.get("epsilon", "off (no DP)"))
    return _info_reply(msg, info, metrics, arrays)


def handle_evaluate(msg: Message, context: Context, *, sim_nodes_dir: str | None) -> Message:
    config = msg.content["config"]
    server_round = int(config["server-round"])
    run = str(config.get("fedpriv-run", msg.metadata.run_id))
    try:
        cfg, node, name, model, source, data = _open(msg, context, sim_nodes_dir)
    except Exception as exc:
        log.error("run=%s round=%s node_id=%s cannot open dataset: %s", run, server_round, context.node_id, exc)
        return _error_reply(msg, ERROR_CODE_DATA, f"dataset cannot be used: {_public_reason(exc)}")
    refusal = _refusal(cfg, node)
    if refusal is not None:  # a node that refuses the run answers none of its queries
        log.warning("run=%s round=%s node=%s evaluation refused: %s", run, server_round, name, refusal)
        return _error_reply(msg, ERROR_CODE_REFUSED, f"evaluation refused: {refusal}")
    load_trainable(model, from_array_record(msg.content["arrays"]))
    start = time.perf_counter()
    res = predict_node(model, data.val, source=source, device=choose_device(node.device or cfg.device),
                       **node_store(node, name))
    keep, groups, all_groups = _group_view(list(data.val.groups) if data.val.groups is not None else None,
                                           len(data.val), node)
    cms = group_confusions(np.asarray(res.y_true)[keep], np.asarray(res.y_pred)[keep], groups,
                           num_classes=len(cfg.label_names))
    info: dict[str, Any] = {"node": name, "count_noise_epsilon": 0.0}
    metrics: dict[str, Any] = {"num-examples": len(keep)}  # the rows counted
    privacy = NodePrivacy(node, cfg, name=name, data=data) if cfg.dp else None
    eps_counts = privacy.count_epsilon() if privacy is not None else 0.0
    exact_ok = node.share_exact_metrics  # with or without DP: exact statistics only where the node opted in
    if eps_counts > 0 and privacy is not None:
        # A count release is paid from the same budget as training and recorded in the same ledger.
        refusal = privacy.count_noise_refusal(eps_counts)
        if refusal is not None:
            log.warning("run=%s round=%s node=%s evaluation counts not released: %s", run, server_round, name,
                        refusal)
            return _error_reply(msg, ERROR_CODE_REFUSED, f"evaluation counts not released: {refusal}")
        fixed = _fixed_seed(cfg, node)
        rng = np.random.default_rng(derived_seed(fixed, run, name, server_round, "counts") if fixed is not None
                                    else None)
        cms = noisy_group_confusions(cms, epsilon=eps_counts, rng=rng, all_groups=all_groups,
                                     num_classes=len(cfg.label_names))
        info["count_noise_epsilon"] = eps_counts
        info["ledger_entry"] = privacy.record_count_noise(
            run=run, server_round=server_round, epsilon=eps_counts,
            noise_seed=derived_seed(fixed, run, name, server_round, "counts") if fixed is not None else None)
        info["counts"] = count_dict_to_json(cms, cfg.label_names)
    elif exact_ok:
        info["counts"] = count_dict_to_json(cms, cfg.label_names)
    else:
        info["status"] = "withheld"
        info["reason"] = NOTE_WITHHELD
    if exact_ok:
        metrics["loss-sum"] = float(res.loss_sum)
    metrics["eval-seconds"] = time.perf_counter() - start
    return _info_reply(msg, info, metrics)


def build_client_app(sim_nodes_dir: str | None = None) -> ClientApp:
    """A ClientApp. ``sim_nodes_dir`` is for simulations only: virtual nodes read their node config there."""
    client_app = ClientApp()

    def deployed() -> None:
        if sim_nodes_dir is None:  # deployment: one INFO line per round and decision in the SuperNode output
            deployment_logging()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        deployed()
        return handle_train(msg, context, sim_nodes_dir=sim_nodes_dir)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        deployed()
        return handle_evaluate(msg, context, sim_nodes_dir=sim_nodes_dir)

    return client_app


# The deployment ClientApp (pyproject: clientapp = "client.app:app"): node settings from --node-config.
app = build_client_app()

__all__ = ["app", "build_client_app", "ArrayRecord"]
