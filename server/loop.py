"""The server's round loop: sample, train, validate, aggregate, evaluate, checkpoint, resume.

The loop drives Flower's ``Grid`` directly (``send_and_receive``) instead of ``Strategy.start`` because a
run must resume from its last completed round after a crash (Flower 1.42 has no resume; see the project's
notes), every reply must be validated before aggregation, and refusals and errors must be recorded
per node. Robust aggregation rules come from Flower's strategies (``server.aggregate``).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.cleaning import CleaningConfig, clean_dataset, split_cleaning_metrics
from common.config import ConfigError, RunConfig
from common.data import Schema, encode, load_dataset
from common.fairness import check_thresholds, fairness_report, group_confusions
from common.inference import encode_features, frozen_encoder, predict, predict_features
from common.ledger import Ledger, load_or_create_node_key
from common.metrics import classification_metrics
from common.model import (
    ModelSpec,
    build_model,
    choose_device,
    from_array_record,
    load_tokenizer,
    load_trainable,
    resolve_pooling,
    save_pretrained,
    to_array_record,
    trainable_state,
)
from server.aggregate import Update, aggregate, update_norm, validate_update
from server.central_dp import CentralDp
from server.report import write_report
from server.rundir import RunDir, new_run_id
from server.selection import Selection, resolve_metric

log = logging.getLogger("fedpriv.server")

ERR_NO_LABELS = "run config 'labels' is empty; set the class names in index order, e.g. labels=\"negative,positive\""
ERR_NOT_ENOUGH_NODES = "only {have} nodes connected after waiting {waited:.0f}s; min-nodes={need}"

Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class RunSummary:
    run_dir: Path
    run_id: str
    rounds_done: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    stopped_reason: str = ""


def _config_record(cfg: RunConfig, *, run_id: str, server_round: int):
    from flwr.app import ConfigRecord

    values: dict[str, Any] = {}
    for k, v in cfg.to_mapping().items():
        values[k] = v
    values["server-round"] = server_round
    values["fedpriv-run"] = run_id
    values["fedpriv-planned-rounds"] = cfg.num_server_rounds
    return ConfigRecord(values)


def _wait_for_nodes(grid, need: int, timeout: float) -> list[int]:
    start = time.monotonic()
    while True:
        ids = sorted(int(i) for i in grid.get_node_ids())
        if len(ids) >= need:
            return ids
        if time.monotonic() - start > timeout:
            raise RuntimeError(ERR_NOT_ENOUGH_NODES.format(have=len(ids), waited=time.monotonic() - start, need=need))
        time.sleep(1.0)


def _info(reply) -> dict[str, Any]:
    if "info" in reply.content:
        return json.loads(str(reply.content["info"]["json"]))
    return {}


def _group_counts_from_json(text: str) -> dict[str, np.ndarray]:
    obj = json.loads(text)
    return {g: np.asarray(m, dtype=np.int64) for g, m in obj["groups"].items()}


class CentralEval:
    """A server-held evaluation set (``--eval-data``), evaluated centrally every round."""

    def __init__(self, cfg: RunConfig, model_source: str) -> None:
        ds = load_dataset(cfg.eval_data, schema=Schema(cfg.text_col, cfg.label_col, cfg.group_col),
                          labels=cfg.label_names)
        self.cleaning: dict[str, Any] | None = None  # run-config ``clean``: cleaned like the nodes' data
        if cfg.clean:
            ds, self.cleaning = clean_dataset(ds, config=CleaningConfig.from_spec(cfg.clean))
        self.enc = encode(ds, load_tokenizer(model_source), max_length=cfg.max_length)
        self.groups = ds.groups if ds.groups is not None else ["all"] * len(ds)
        self.features = None  # frozen encoder: the set's features, computed on the first round

    def evaluate(self, model, device) -> tuple[float, dict[str, np.ndarray]]:
        if frozen_encoder(model):  # only the classifier changes between rounds: encode the set once
            if self.features is None:
                self.features = encode_features(model, self.enc, device=device)
            res = predict_features(model, self.features, self.enc.labels, device=device)
        else:
            res = predict(model, self.enc, device=device)
        cms = group_confusions(res.y_true, res.y_pred, self.groups, num_classes=model.config.num_labels)
        return res.loss_sum / max(res.num_examples, 1), cms


def summarise_counts(cms: dict[str, np.ndarray], labels: list[str], *, min_group_size: int,
                     prefix: str = "") -> dict[str, Any]:
    """Utility + fairness metrics from summed per-group confusion matrices."""

    if not cms or int(sum(int(np.asarray(m).sum()) for m in cms.values())) == 0:
        return {f"{prefix}accuracy": None, f"{prefix}macro_f1": None}
    total = sum(cms.values())
    cls = classification_metrics(np.asarray(total), labels=labels)
    out = {
        f"{prefix}accuracy": cls["accuracy"],
        f"{prefix}macro_f1": cls["macro_f1"],
        f"{prefix}classification": cls,
    }
    out[f"{prefix}fairness"] = fairness_report(cms, labels=labels, min_group_size=min_group_size)
    return out


def _server_ledger(rundir: RunDir):
    """The server's own signed ledger of central-DP releases (key kept in RUN_DIR/server-key/)."""

    key = load_or_create_node_key(rundir.path / "server-key")
    rundir.ledgers_dir.mkdir(parents=True, exist_ok=True)
    pub = rundir.path / "server-key" / "node_ed25519.pub"
    if pub.exists() and not (rundir.ledgers_dir / "server.pub").exists():
        (rundir.ledgers_dir / "server.pub").write_text(pub.read_text())
    return Ledger(rundir.ledgers_dir / "server.jsonl", key)


def run_federation(grid, cfg: RunConfig, *, progress: Progress | None = None,
                   wait_timeout: float = 300.0) -> RunSummary:
    """Run (or resume) the federation described by ``cfg`` on ``grid``; write everything to ``cfg.out``."""
    from flwr.app import Message, MessageType, RecordDict


    if not cfg.label_names or len(cfg.label_names) < 2:
        raise ConfigError(ERR_NO_LABELS)
    emit = progress or (lambda event, payload: None)
    # ``auto`` and recipe values (0) become concrete here, so the round config every node receives (and
    # accounts for), the run directory's config and the report all name what actually trained.
    cfg = cfg.resolved()
    cfg = cfg.replace(pooling=resolve_pooling(cfg.pooling, cfg.model))
    rundir = RunDir(cfg.out)
    spec = ModelSpec(source=cfg.model, labels=tuple(cfg.label_names), train_part=cfg.train_part,
                     top_k_layers=cfg.top_k_layers, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                     pooling=cfg.pooling)
    model = build_model(spec)
    device = choose_device(cfg.device)
    resumed = rundir.load_checkpoint()
    best_state: dict[str, Any] = {}
    if resumed is not None:
        state, arrays = resumed
        run_id = str(state["run_id"])
        start_round = int(state["round"]) + 1
        best_state = dict(state.get("best", {}))
        rundir.truncate_metrics_after(int(state["round"]))
        log.info("run=%s resuming after round %d from %s", run_id, state["round"], rundir.path)
        emit("resume", {"round": int(state["round"])})
    else:
        run_id = new_run_id()
        arrays = dict(trainable_state(model))
        start_round = 1
        if rundir.metrics_path.exists():
            rundir.metrics_path.unlink()
        rundir.cleaning_path.unlink(missing_ok=True)
        log.info("run=%s starting in %s", run_id, rundir.path)
    rundir.write_config(cfg.to_mapping(), run_id=run_id)
    load_trainable(model, arrays)
    held_out = CentralEval(cfg, cfg.model) if cfg.eval_data else None
    if held_out is not None and held_out.cleaning is not None:
        rundir.record_cleaning(held_out.cleaning, node=None)
    rows = rundir.read_metrics()

    select_metric = resolve_metric(cfg.early_stopping_metric, has_eval_data=bool(cfg.eval_data))
    keep_best = cfg.keep_best or cfg.early_stopping_patience > 0
    selection = Selection.from_state(resumed[0].get("selection") if resumed is not None else None,
                                     metric=select_metric, patience=cfg.early_stopping_patience,
                                     min_delta=cfg.early_stopping_min_delta)
    stopped = selection.stopped
    if stopped:
        log.info("run=%s already stopped: %s", run_id, stopped)
    central = None
    central_state = resumed[0].get("central_dp") if resumed is not None else None
    last_done = start_round - 1

    for rnd in range(start_round, cfg.num_server_rounds + 1):
        if stopped:
            break
        t0 = time.perf_counter()
        emit("round_start", {"round": rnd})
        node_ids = _wait_for_nodes(grid, cfg.min_nodes, wait_timeout)
        k = min(len(node_ids), max(cfg.min_nodes, math.ceil(len(node_ids) * cfg.fraction_train)))
        sampled = sorted(random.Random(cfg.seed * 100_003 + rnd).sample(node_ids, k))
        record = to_array_record(arrays)
        down_one = int(record.count_bytes())
        config = _config_record(cfg, run_id=run_id, server_round=rnd)
        msgs = [Message(RecordDict({"arrays": record, "config": config}), dst_node_id=nid,
                        message_type=MessageType.TRAIN) for nid in sampled]
        replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout))
        updates: list[Update] = []
        per_node: dict[str, dict[str, Any]] = {}
        refusals, rejected, errors = [], [], []
        bytes_up = 0
        for reply in replies:
            src = int(reply.metadata.src_node_id)
            if reply.has_error():
                reason = str(reply.error.reason)
                errors.append({"node_id": src, "reason": reason})
                log.warning("run=%s round=%d node_id=%d error: %s", run_id, rnd, src, reason)
                continue
            info = _info(reply)
            name = str(info.get("node", f"node-{src}"))
            m = dict(reply.content["metrics"]) if "metrics" in reply.content else {}
            # Cleaning counts are the same every round: kept once per node in cleaning.json, not per round.
            m, cleaning = split_cleaning_metrics(m)
            if cleaning is not None:
                rundir.record_cleaning(cleaning, node=name)
            node_row: dict[str, Any] = {"status": info.get("status", "ok"), **{k2: m[k2] for k2 in m}}
            entry = info.get("ledger_entry")
            if entry:
                rundir.store_ledger_entry(name, entry, info.get("public_key"))
            if info.get("status") == "refused":
                node_row["reason"] = info.get("reason")
                refusals.append({"node": name, "reason": info.get("reason")})
                per_node[name] = node_row
                continue
            if "arrays" not in reply.content:
                rejected.append({"node": name, "reason": "reply has no arrays"})
                node_row["status"] = "rejected"
                per_node[name] = node_row
                continue
            got = dict(from_array_record(reply.content["arrays"]))
            bytes_up += int(reply.content["arrays"].count_bytes())
            reason = validate_update(got, arrays, num_examples=m.get("num-examples"),
                                     max_update_norm=cfg.max_update_norm)
            if reason is not None:
                rejected.append({"node": name, "reason": reason})
                node_row.update(status="rejected", reason=reason)
                log.warning("run=%s round=%d node=%s update rejected: %s", run_id, rnd, name, reason)
            else:
                node_row["update_norm"] = update_norm(got, arrays)
                updates.append(Update(node=name, arrays=got, num_examples=int(m["num-examples"])))
            per_node[name] = node_row
        row: dict[str, Any] = {
            "round": rnd,
            "run": run_id,
            "nodes_sampled": len(sampled),
            "nodes_trained": len(updates),
            "bytes_down": down_one * len(sampled),
            "bytes_up": bytes_up,
            "refusals": refusals,
            "rejected": rejected,
            "errors": errors,
            "nodes": per_node,
            "epsilon": {n: r["epsilon"] for n, r in per_node.items() if "epsilon" in r},
        }
        if len(updates) < cfg.min_nodes:
            row["status"] = "failed"
            row["reason"] = f"{len(updates)} usable updates < min-nodes={cfg.min_nodes}; global model unchanged"
            log.error("run=%s round=%d failed: %s", run_id, rnd, row["reason"])
        elif cfg.central_dp:
            if central is None:
                population = int((central_state or {}).get("population", len(node_ids)))
                central = CentralDp(cfg, population_size=population, state=(central_state or {}).get("accountant"))
            arrays = central.aggregate([u.arrays for u in sorted(updates, key=lambda u: u.node)], arrays,
                                       server_round=rnd)
            _server_ledger(rundir).append({**central.last_release, "run": run_id})
            row["central_epsilon"] = central.epsilon()
            row["status"] = "ok"
        else:
            arrays = aggregate(cfg.aggregation, updates, trim_beta=cfg.trim_beta, krum_byzantine=cfg.krum_byzantine)
            row["status"] = "ok"
        load_trainable(model, arrays)

        # ---- federated evaluation: nodes return counts, never predictions or the model
        eval_record = to_array_record(arrays)
        eval_ids = sorted(int(i) for i in grid.get_node_ids())
        eval_msgs = [Message(RecordDict({"arrays": eval_record, "config": config}), dst_node_id=nid,
                             message_type=MessageType.EVALUATE) for nid in eval_ids]
        row["bytes_down"] += int(eval_record.count_bytes()) * len(eval_msgs)
        summed: dict[str, np.ndarray] = {}
        loss_sum, n_eval = 0.0, 0
        for reply in grid.send_and_receive(eval_msgs, timeout=cfg.round_timeout):
            if reply.has_error():
                errors.append({"node_id": int(reply.metadata.src_node_id), "reason": str(reply.error.reason),
                               "phase": "evaluate"})
                continue
            info = _info(reply)
            m = dict(reply.content["metrics"])
            entry = info.get("ledger_entry")
            if entry:
                rundir.store_ledger_entry(str(info.get("node")), entry, None)
            for g, cm in _group_counts_from_json(info["counts"]).items():
                summed[g] = summed.get(g, 0) + cm
            loss_sum += float(m.get("loss-sum", 0.0))
            n_eval += int(m.get("num-examples", 0))
        row["eval_nodes"] = len(eval_msgs)
        row["num_examples_val"] = n_eval
        row["loss"] = loss_sum / n_eval if n_eval else None
        row.update(summarise_counts(summed, cfg.label_names, min_group_size=cfg.min_group_size))
        if held_out is not None:
            eval_loss, eval_cms = held_out.evaluate(model, device)
            row["eval_loss"] = eval_loss
            row.update(summarise_counts(eval_cms, cfg.label_names, min_group_size=cfg.min_group_size,
                                        prefix="eval_"))
        if cfg.fairness_thresholds and row.get("fairness"):
            row["fairness_violations"] = check_thresholds(row["fairness"], {
                k: v for k, v in cfg.fairness_thresholds.items()})
        train_losses = [(r.get("train-loss"), r.get("num-examples", 0)) for r in per_node.values()
                        if r.get("status") == "ok" and r.get("train-loss") is not None]
        tot = sum(n for _, n in train_losses)
        row["train_loss"] = sum(v * n for v, n in train_losses) / tot if tot else None
        row["seconds"] = time.perf_counter() - t0

        # ---- model selection state, then commit: metrics line first, checkpoint (commit point) second
        extra: dict[str, Any] = {}
        if cfg.keep_best_fair and row.get("status") == "ok" and not row.get("fairness_violations"):
            metric = row.get("eval_accuracy", row.get("accuracy")) or 0.0
            if metric > best_state.get("metric", -1.0):
                best_state = {"round": rnd, "metric": metric}
                rundir.save_checkpoint(round_=rnd, run_id=run_id, arrays=arrays, name="best_fair_checkpoint")
        extra["best"] = best_state
        improved, stop = selection.update(rnd, row)
        if improved and keep_best:
            rundir.save_checkpoint(round_=rnd, run_id=run_id, arrays=arrays, name="best_checkpoint")
        row["selection"] = {"metric": selection.metric, "best_round": selection.best_round,
                            "best_value": selection.best_value, "rounds_without_improvement": selection.bad_rounds}
        if stop:
            stopped = row["stopped"] = selection.stopped
            log.info("run=%s %s", run_id, stopped)
        extra["selection"] = selection.state_dict()
        if central is not None:
            extra["central_dp"] = {"population": central.population_size, "accountant": central.state_dict()}
        rundir.append_metrics(row)
        rundir.save_checkpoint(round_=rnd, run_id=run_id, arrays=arrays, extra=extra)
        rows.append(row)
        last_done = rnd
        log.info("run=%s round=%d status=%s accuracy=%s nodes=%d seconds=%.1f", run_id, rnd, row["status"],
                 row.get("accuracy"), len(updates), row["seconds"])
        emit("round_end", row)

    # ---- final model and report
    save_pretrained(model, load_tokenizer(cfg.model), rundir.model_dir)
    if keep_best and selection.best_round:
        best = rundir.load_named_checkpoint("best_checkpoint")
        if best is not None and int(best[0]["round"]) != selection.best_round:
            # A crash between saving a candidate best and committing its round, and a rerun of that round
            # that did not improve, leaves weights of an uncommitted round there: never label them as best.
            log.warning("run=%s best/ not written: best_checkpoint holds round %s but the best committed round "
                        "is %d (its weights were replaced before a crash)", run_id, best[0]["round"],
                        selection.best_round)
            best = None
        if best is not None:
            best_model = build_model(spec)
            load_trainable(best_model, best[1])
            best_dir = save_pretrained(best_model, load_tokenizer(cfg.model), rundir.path / "best")
            (best_dir / "fedpriv-selection.json").write_text(json.dumps(
                {"round": selection.best_round, "metric": selection.metric, "value": selection.best_value,
                 "stopped": stopped}, indent=2) + "\n")
    if cfg.keep_best_fair and best_state:
        best = rundir.load_named_checkpoint("best_fair_checkpoint")
        if best is not None and int(best[0]["round"]) != int(best_state.get("round", -1)):
            log.warning("run=%s best_fair/ not written: its checkpoint holds round %s, the committed best-fair "
                        "round is %s", run_id, best[0]["round"], best_state.get("round"))
            best = None
        if best is not None:
            best_model = build_model(spec)
            load_trainable(best_model, best[1])
            save_pretrained(best_model, load_tokenizer(cfg.model), rundir.path / "best_fair")

    write_report(rundir, cfg)
    emit("done", {"run_dir": str(rundir.path)})
    return RunSummary(run_dir=rundir.path, run_id=run_id, rounds_done=last_done, rows=rows, stopped_reason=stopped)
