"""The named steps of one federated round, driven by :func:`server.loop.run_federation`.

sample -> train (send, collect, validate each reply) -> aggregate -> evaluate (:mod:`server.evaluate`) ->
record (the round's row) -> checkpoint (best-model candidates, then the metrics line, then the checkpoint:
the commit point).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.cleaning import split_cleaning_metrics
from common.config import RunConfig
from common.fairness import check_thresholds
from common.ledger import Ledger, load_or_create_node_key
from common.model import (
    ModelSpec,
    build_model,
    from_array_record,
    load_tokenizer,
    load_trainable,
    save_pretrained,
    to_array_record,
)
from server.aggregate import Update, aggregate, update_norm, validate_update
from server.central_dp import CentralDp
from server.evaluate import FederatedEval, evaluation_from_counts
from server.rows import RoundRow
from server.rundir import RunDir
from server.selection import Selection
from server.validate import ReplyRejected, reply_info

log = logging.getLogger("fedpriv.server")

ERR_NOT_ENOUGH_NODES = "only {have} nodes connected after waiting {waited:.0f}s; min-nodes={need}"


# ------------------------------------------------------------------------------------------- sample


def wait_for_nodes(grid, need: int, timeout: float) -> list[int]:
    """The connected node ids once at least ``need`` are connected (polling every second)."""
    start = time.monotonic()
    while True:
        ids = sorted(int(i) for i in grid.get_node_ids())
        if len(ids) >= need:
            return ids
        if time.monotonic() - start > timeout:
            raise RuntimeError(ERR_NOT_ENOUGH_NODES.format(have=len(ids), waited=time.monotonic() - start, need=need))
        time.sleep(1.0)


def sample_nodes(node_ids: list[int], cfg: RunConfig, rnd: int) -> list[int]:
    """``max(min-nodes, ceil(fraction-train * connected))`` nodes, drawn reproducibly from the seed and round."""
    k = min(len(node_ids), max(cfg.min_nodes, math.ceil(len(node_ids) * cfg.fraction_train)))
    return sorted(random.Random(cfg.seed * 100_003 + rnd).sample(node_ids, k))


def config_record(cfg: RunConfig, *, run_id: str, server_round: int):
    """The round's ConfigRecord: the run config plus the round number, run id and planned rounds."""
    from flwr.app import ConfigRecord

    values: dict[str, Any] = dict(cfg.to_mapping())
    values["server-round"] = server_round
    values["fedpriv-run"] = run_id
    values["fedpriv-planned-rounds"] = cfg.num_server_rounds
    return ConfigRecord(values)


# ------------------------------------------------------------------------------------------- train


@dataclass
class TrainResult:
    """The validated training replies of one round."""

    sampled: list[int]
    updates: list[Update] = field(default_factory=list)
    per_node: dict[str, dict[str, Any]] = field(default_factory=dict)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0


def train(grid, cfg: RunConfig, rundir: RunDir, *, run_id: str, rnd: int, arrays: dict[str, np.ndarray],
          sampled: list[int], config) -> TrainResult:
    """Send the global trainable arrays to the sampled nodes; keep the replies that pass validation."""
    from flwr.app import Message, MessageType, RecordDict

    record = to_array_record(arrays)
    msgs = [Message(RecordDict({"arrays": record, "config": config}), dst_node_id=nid,
                    message_type=MessageType.TRAIN) for nid in sampled]
    out = TrainResult(sampled=sampled, bytes_down=int(record.count_bytes()) * len(sampled))
    for reply in grid.send_and_receive(msgs, timeout=cfg.round_timeout):
        _take_train_reply(reply, out, cfg, rundir, run_id=run_id, rnd=rnd, arrays=arrays)
    return out


def _reject(out: TrainResult, name: str, row: dict[str, Any], reason: str, *, run_id: str, rnd: int) -> None:
    out.rejected.append({"node": name, "reason": reason})
    row.update(status="rejected", reason=reason)
    out.per_node[name] = row
    log.warning("run=%s round=%d node=%s update rejected: %s", run_id, rnd, name, reason)


def _take_train_reply(reply, out: TrainResult, cfg: RunConfig, rundir: RunDir, *, run_id: str, rnd: int,
                      arrays: dict[str, np.ndarray]) -> None:
    src = int(reply.metadata.src_node_id)
    if reply.has_error():
        reason = str(reply.error.reason)
        out.errors.append({"node_id": src, "reason": reason})
        log.warning("run=%s round=%d node_id=%d error: %s", run_id, rnd, src, reason)
        return
    try:
        info = reply_info(reply)
    except ReplyRejected as exc:
        _reject(out, f"node-{src}", {}, str(exc), run_id=run_id, rnd=rnd)
        return
    name = str(info.get("node", f"node-{src}"))
    m = dict(reply.content["metrics"]) if "metrics" in reply.content else {}
    # Cleaning counts are the same every round: kept once per node in cleaning.json, not per round.
    m, cleaning = split_cleaning_metrics(m)
    if cleaning is not None:
        rundir.record_cleaning(cleaning, node=name)
    row: dict[str, Any] = {"status": info.get("status", "ok"), **m}
    entry = info.get("ledger_entry")
    if entry:
        rundir.store_ledger_entry(name, entry, info.get("public_key"))
    if info.get("warning"):  # e.g. the node's remaining budget makes this round mostly noise
        row["warning"] = info["warning"]
        log.warning("run=%s round=%d node=%s warns: %s", run_id, rnd, name, info["warning"])
    if info.get("status") == "refused":
        row["reason"] = info.get("reason")
        out.refusals.append({"node": name, "reason": info.get("reason")})
        out.per_node[name] = row
        log.warning("run=%s round=%d node=%s refused: %s", run_id, rnd, name, info.get("reason"))
        return
    if "arrays" not in reply.content:
        out.rejected.append({"node": name, "reason": "reply has no arrays"})
        row["status"] = "rejected"
        out.per_node[name] = row
        return
    got = dict(from_array_record(reply.content["arrays"]))
    out.bytes_up += int(reply.content["arrays"].count_bytes())
    reason = validate_update(got, arrays, num_examples=m.get("num-examples"), max_update_norm=cfg.max_update_norm)
    if reason is not None:
        _reject(out, name, row, reason, run_id=run_id, rnd=rnd)
        return
    row["update_norm"] = update_norm(got, arrays)
    out.updates.append(Update(node=name, arrays=got, num_examples=int(m["num-examples"])))
    out.per_node[name] = row
    log.info("run=%s round=%d node=%s %s n=%s eps=%s", run_id, rnd, name,
             "re-sent its stored update" if info.get("replayed") else "trained", m.get("num-examples"),
             m.get("epsilon", "off"))


# ------------------------------------------------------------------------------------------- aggregate


def server_ledger(rundir: RunDir) -> Ledger:
    """The server's own signed ledger of central-DP releases (key kept in RUN_DIR/server-key/)."""
    key = load_or_create_node_key(rundir.path / "server-key")
    rundir.ledgers_dir.mkdir(parents=True, exist_ok=True)
    pub = rundir.path / "server-key" / "node_ed25519.pub"
    if pub.exists() and not (rundir.ledgers_dir / "server.pub").exists():
        (rundir.ledgers_dir / "server.pub").write_text(pub.read_text())
    return Ledger(rundir.ledgers_dir / "server.jsonl", key)


@dataclass
class CentralDpHolder:
    """The server's central-DP mechanism, created on first use (its population is the nodes then connected,
    or the checkpointed one on resume)."""

    state: dict[str, Any] | None = None
    dp: CentralDp | None = None

    def get(self, cfg: RunConfig, population: int, *, released: list[dict[str, Any]] = ()) -> CentralDp:
        """The mechanism; on first use its accountant composes ``released``, this run's central-DP entries of
        the server's signed ledger (the record of what was released, a round that crashed before its commit
        included), rather than trusting the checkpoint's state."""
        if self.dp is None:
            pop = int((self.state or {}).get("population", population))
            if released:
                self.dp = CentralDp(cfg, population_size=int(released[0].get("population_size", pop)))
                for e in released:
                    self.dp.compose(noise_multiplier=e["noise_multiplier"], sample_size=e["sample_size"])
            else:
                self.dp = CentralDp(cfg, population_size=pop, state=(self.state or {}).get("accountant"))
        return self.dp


def aggregate_round(cfg: RunConfig, trained: TrainResult, arrays: dict[str, np.ndarray], *, rnd: int,
                    run_id: str, central: CentralDpHolder, population: int,
                    rundir: RunDir) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The new global arrays and the row's status fields; unchanged arrays when too few updates are usable."""
    updates = trained.updates
    if len(updates) < cfg.min_nodes:
        reason = f"{len(updates)} usable updates < min-nodes={cfg.min_nodes}; global model unchanged"
        log.error("run=%s round=%d failed: %s", run_id, rnd, reason)
        return arrays, {"status": "failed", "reason": reason}
    if cfg.central_dp:
        ledger = server_ledger(rundir)
        released = [e for e in ledger.entries() if e.get("kind") == "central-dp" and e.get("run") == run_id]
        dp = central.get(cfg, population, released=released)
        new = dp.aggregate([u.arrays for u in sorted(updates, key=lambda u: u.node)], arrays, server_round=rnd)
        ledger.append({**dp.last_release, "run": run_id})
        return new, {"central_epsilon": dp.epsilon(), "status": "ok"}
    new = aggregate(cfg.aggregation, updates, trim_beta=cfg.trim_beta, krum_byzantine=cfg.krum_byzantine)
    return new, {"status": "ok"}


# ------------------------------------------------------------------------------------------- record


def record_round(cfg: RunConfig, *, rnd: int, run_id: str, trained: TrainResult, status: dict[str, Any],
                 fed: FederatedEval, held_out: tuple[float, dict[str, np.ndarray]] | None,
                 seconds: float) -> RoundRow:
    """The round's row of ``metrics.jsonl`` (selection fields are added by :func:`checkpoint_round`)."""
    per_node = trained.per_node
    federated = evaluation_from_counts(fed.counts, cfg, loss=fed.loss_sum / fed.loss_examples if fed.loss_examples
                                       else None)
    row = RoundRow(
        round=rnd, run=run_id, status=status["status"], reason=status.get("reason"),
        nodes_sampled=len(trained.sampled), nodes_trained=len(trained.updates),
        bytes_down=trained.bytes_down + fed.bytes_down, bytes_up=trained.bytes_up,
        refusals=trained.refusals, rejected=trained.rejected + fed.rejected, errors=trained.errors + fed.errors,
        nodes=per_node, epsilon={n: r["epsilon"] for n, r in per_node.items() if "epsilon" in r},
        central_epsilon=status.get("central_epsilon"), eval_nodes=fed.nodes_asked,
        num_examples_val=fed.num_examples, federated=federated,
        held_out=evaluation_from_counts(held_out[1], cfg, loss=held_out[0]) if held_out is not None else None,
        seconds=seconds,
    )
    if cfg.fairness_thresholds and federated.fairness is not None:
        row.fairness_violations = check_thresholds(federated.fairness.to_json(), dict(cfg.fairness_thresholds))
    losses = [(r["train-loss"], r.get("num-examples", 0)) for r in per_node.values()
              if r.get("status") == "ok" and r.get("train-loss") is not None]
    total = sum(n for _, n in losses)
    row.train_loss = sum(v * n for v, n in losses) / total if total else None
    return row


# ------------------------------------------------------------------------------------------- checkpoint


@dataclass
class BestKeeper:
    """The one best-model mechanism: a :class:`Selection` picks the best committed round among the eligible
    ones; that round's weights are saved to the named checkpoint before the round commits, and exported as a
    model directory at the end (only if the checkpoint still holds the best committed round).

    ``keep`` False tracks the best round (for early stopping) without saving weights.
    """

    selection: Selection
    checkpoint: str
    out_dir: str
    keep: bool = True
    eligible: Callable[[RoundRow], bool] = lambda row: True
    fixed_value: bool = False  # True: a missing metric counts as 0.0 (keep-best-fair's historical rule)

    def offer(self, rundir: RunDir, *, rnd: int, run_id: str, row: RoundRow,
              arrays: dict[str, np.ndarray]) -> bool:
        """Account for the round's row; save its weights when it is the new best. Returns (stop now)."""
        metric = self.selection.metric
        value = row.metric(metric)
        if value is None and self.fixed_value:
            value = 0.0
        ok = row.status == "ok" and self.eligible(row)
        view = {"status": "ok" if ok else "ineligible", metric: value}
        improved, stop = self.selection.update(rnd, view)
        if improved and self.keep:
            rundir.save_checkpoint(round_=rnd, run_id=run_id, arrays=arrays, name=self.checkpoint)
        return stop

    def export(self, rundir: RunDir, spec: ModelSpec, cfg: RunConfig, *, run_id: str):
        """Write the best round's model to ``RUN_DIR/<out_dir>``; the directory, or None if not written."""
        if not (self.keep and self.selection.best_round):
            return None
        best = rundir.load_named_checkpoint(self.checkpoint)
        if best is None:
            return None
        if int(best[0]["round"]) != self.selection.best_round:
            # A crash between saving a candidate best and committing its round, and a rerun of that round
            # that did not improve, leaves weights of an uncommitted round there: never label them as best.
            log.warning("run=%s %s/ not written: %s holds round %s but the best committed round is %d (its "
                        "weights were replaced before a crash)", run_id, self.out_dir, self.checkpoint,
                        best[0]["round"], self.selection.best_round)
            return None
        model = build_model(spec)
        load_trainable(model, best[1])
        return save_pretrained(model, load_tokenizer(cfg.model), rundir.path / self.out_dir)


def checkpoint_round(rundir: RunDir, *, rnd: int, run_id: str, row: RoundRow,
                     arrays: dict[str, np.ndarray], selection: BestKeeper, best_fair: BestKeeper | None,
                     central: CentralDpHolder) -> str:
    """Best-model candidates, then the metrics line, then the checkpoint (the commit point).

    Returns the early-stopping reason ("" to go on).
    """
    extra: dict[str, Any] = {}
    if best_fair is not None:
        best_fair.offer(rundir, rnd=rnd, run_id=run_id, row=row, arrays=arrays)
        sel = best_fair.selection
        extra["best"] = {"round": sel.best_round, "metric": sel.best_value} if sel.best_round else {}
    else:
        extra["best"] = {}
    stop = selection.offer(rundir, rnd=rnd, run_id=run_id, row=row, arrays=arrays)
    sel = selection.selection
    row.selection = {"metric": sel.metric, "best_round": sel.best_round, "best_value": sel.best_value,
                        "rounds_without_improvement": sel.bad_rounds}
    stopped = ""
    if stop:
        stopped = row.stopped = sel.stopped
        log.info("run=%s %s", run_id, stopped)
    extra["selection"] = sel.state_dict()
    if central.dp is not None:
        extra["central_dp"] = {"population": central.dp.population_size, "accountant": central.dp.state_dict()}
    rundir.append_metrics(row)
    rundir.save_checkpoint(round_=rnd, run_id=run_id, arrays=arrays, extra=extra)
    return stopped
