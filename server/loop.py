"""The server's round loop: a short driver over the named steps of :mod:`server.rounds`.

The loop drives Flower's ``Grid`` directly (``send_and_receive``) instead of ``Strategy.start`` because a
run must resume from its last completed round after a crash (Flower 1.42 has no resume; see the project's
notes), every reply must be validated before aggregation, and refusals and errors must be recorded
per node. Robust aggregation rules come from Flower's strategies (``server.aggregate``).

Each round: sample -> train -> aggregate -> evaluate -> record -> checkpoint (:mod:`server.rounds`,
:mod:`server.evaluate`). Setup (fresh start or resume from the checkpoint) and the final export (model/,
best/, best_fair/, report) are the two functions around it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ConfigError, RunConfig
from common.model import (
    ModelSpec,
    build_model,
    choose_device,
    load_tokenizer,
    load_trainable,
    resolve_pooling,
    save_pretrained,
    trainable_state,
)
from server.evaluate import CentralEval, evaluate_federated
from server.report import write_report
from server.rounds import (
    BestKeeper,
    CentralDpHolder,
    aggregate_round,
    checkpoint_round,
    config_record,
    record_round,
    sample_nodes,
    train,
    wait_for_nodes,
)
from server.rows import RoundRow
from server.rundir import LOCK_WAIT_S, RunDir, new_run_id
from server.selection import Selection, resolve_metric

log = logging.getLogger("fedpriv.server")

ERR_NO_LABELS = "run config 'labels' is empty; set the class names in index order, e.g. labels=\"negative,positive\""

Progress = Callable[[str, dict[str, Any]], None]

__all__ = ["Progress", "RunSummary", "run_federation"]


@dataclass
class RunSummary:
    run_dir: Path
    run_id: str
    rounds_done: int
    rows: list[RoundRow] = field(default_factory=list)
    stopped_reason: str = ""


@dataclass
class RunState:
    """What a run carries from round to round and through its checkpoint."""

    run_id: str
    start_round: int
    arrays: dict[str, np.ndarray]
    selection: BestKeeper
    best_fair: BestKeeper | None
    central: CentralDpHolder
    rows: list[RoundRow]


def _start_or_resume(cfg: RunConfig, rundir: RunDir, model, emit: Progress) -> RunState:
    """A fresh run (new id, initial weights, no metrics) or the state of the last committed round."""
    resumed = rundir.load_checkpoint()
    state: dict[str, Any] = {}
    if resumed is not None:
        state, arrays = resumed
        run_id = str(state["run_id"])
        rundir.truncate_metrics_after(int(state["round"]))
        log.info("run=%s resuming after round %d from %s", run_id, state["round"], rundir.path)
        emit("resume", {"round": int(state["round"])})
    else:
        run_id = new_run_id()
        arrays = dict(trainable_state(model))
        if rundir.metrics_path.exists():
            rundir.metrics_path.unlink()
        rundir.cleaning_path.unlink(missing_ok=True)
        log.info("run=%s starting in %s", run_id, rundir.path)
    has_eval = bool(cfg.eval_data)
    selection = BestKeeper(
        Selection.from_state(state.get("selection"), metric=resolve_metric(cfg.early_stopping_metric,
                                                                            has_eval_data=has_eval),
                             patience=cfg.early_stopping_patience, min_delta=cfg.early_stopping_min_delta),
        checkpoint="best_checkpoint", out_dir="best", keep=cfg.keep_best or cfg.early_stopping_patience > 0)
    best_fair = None
    if cfg.keep_best_fair:
        # Best accuracy among the rounds that meet the fairness thresholds (checkpoint key "best").
        fair = Selection(metric=resolve_metric("auto", has_eval_data=has_eval))
        old = state.get("best") or {}
        if old.get("round"):
            fair.best_round, fair.best_value = int(old["round"]), old.get("metric")
        best_fair = BestKeeper(fair, checkpoint="best_fair_checkpoint", out_dir="best_fair", fixed_value=True,
                               eligible=lambda row: not row.fairness_violations)
    if selection.selection.stopped:
        log.info("run=%s already stopped: %s", run_id, selection.selection.stopped)
    return RunState(run_id=run_id, start_round=int(state.get("round", 0)) + 1, arrays=arrays, selection=selection,
                    best_fair=best_fair, central=CentralDpHolder(state=state.get("central_dp")),
                    rows=rundir.read_rows())


def _run_round(grid, cfg: RunConfig, rundir: RunDir, run: RunState, rnd: int, *, model, device,
               held_out: CentralEval | None, wait_timeout: float) -> tuple[RoundRow, str]:
    """One round, sample to checkpoint; returns its row and the early-stopping reason ("" to go on)."""
    t0 = time.perf_counter()
    node_ids = wait_for_nodes(grid, cfg.min_nodes, wait_timeout)
    sampled = sample_nodes(node_ids, cfg, rnd)
    config = config_record(cfg, run_id=run.run_id, server_round=rnd)
    trained = train(grid, cfg, rundir, run_id=run.run_id, rnd=rnd, arrays=run.arrays, sampled=sampled,
                    config=config)
    run.arrays, status = aggregate_round(cfg, trained, run.arrays, rnd=rnd, run_id=run.run_id,
                                         central=run.central, population=len(node_ids), rundir=rundir)
    load_trainable(model, run.arrays)
    fed = evaluate_federated(grid, cfg, rundir, run_id=run.run_id, rnd=rnd, arrays=run.arrays, config=config)
    central_eval = held_out.evaluate(model, device) if held_out is not None else None
    row = record_round(cfg, rnd=rnd, run_id=run.run_id, trained=trained, status=status, fed=fed,
                       held_out=central_eval, seconds=time.perf_counter() - t0)
    stopped = checkpoint_round(rundir, rnd=rnd, run_id=run.run_id, row=row, arrays=run.arrays,
                               selection=run.selection, best_fair=run.best_fair, central=run.central)
    log.info("run=%s round=%d status=%s accuracy=%s nodes=%d seconds=%.1f", run.run_id, rnd, row.status,
             row.federated.accuracy, len(trained.updates), row.seconds)
    return row, stopped


def _finish(cfg: RunConfig, rundir: RunDir, run: RunState, model, spec: ModelSpec) -> None:
    """The final model, the kept best models and the report."""
    save_pretrained(model, load_tokenizer(cfg.model), rundir.model_dir)
    sel = run.selection.selection
    best_dir = run.selection.export(rundir, spec, cfg, run_id=run.run_id)
    if best_dir is not None:
        (best_dir / "fedpriv-selection.json").write_text(json.dumps(
            {"round": sel.best_round, "metric": sel.metric, "value": sel.best_value, "stopped": sel.stopped},
            indent=2) + "\n")
    if run.best_fair is not None:
        run.best_fair.export(rundir, spec, cfg, run_id=run.run_id)
    write_report(rundir, cfg)


def run_federation(grid, cfg: RunConfig, *, progress: Progress | None = None,
                   wait_timeout: float = 300.0, lock_wait: float = LOCK_WAIT_S) -> RunSummary:
    """Run (or resume) the federation described by ``cfg`` on ``grid``; write everything to ``cfg.out``.

    Only one process writes a run directory: another holder is waited for up to ``lock_wait`` seconds, then
    :class:`server.rundir.RunDirBusy` is raised before anything is written.
    """
    if not cfg.label_names or len(cfg.label_names) < 2:
        raise ConfigError(ERR_NO_LABELS)
    emit = progress or (lambda event, payload: None)
    # ``auto`` and recipe values (0) become concrete here, so the round config every node receives (and
    # accounts for), the run directory's config and the report all name what actually trained.
    cfg = cfg.resolved()
    cfg = cfg.replace(pooling=resolve_pooling(cfg.pooling, cfg.model))
    rundir = RunDir(cfg.out)
    def waiting(holder: str) -> None:
        log.warning("waiting up to %.0f s for %s: it is held by %s (a failed run's ServerApp still exiting?)",
                    lock_wait, rundir.path, holder)

    with rundir.exclusive(wait=lock_wait, on_wait=waiting):
        return _run_locked(grid, cfg, rundir, emit, wait_timeout=wait_timeout)


def _run_locked(grid, cfg: RunConfig, rundir: RunDir, emit: Progress, *, wait_timeout: float) -> RunSummary:
    """:func:`run_federation` while this process holds ``rundir``."""
    spec = ModelSpec(source=cfg.model, labels=tuple(cfg.label_names), train_part=cfg.train_part,
                     top_k_layers=cfg.top_k_layers, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                     pooling=cfg.pooling)
    model = build_model(spec)
    device = choose_device(cfg.device)
    run = _start_or_resume(cfg, rundir, model, emit)
    rundir.write_config(cfg.to_mapping(), run_id=run.run_id)
    load_trainable(model, run.arrays)
    held_out = CentralEval(cfg, cfg.model) if cfg.eval_data else None
    if held_out is not None and held_out.cleaning is not None:
        rundir.record_cleaning(held_out.cleaning, node=None)

    stopped, last_done = run.selection.selection.stopped, run.start_round - 1
    for rnd in range(run.start_round, cfg.num_server_rounds + 1):
        if stopped:
            break
        emit("round_start", {"round": rnd})
        row, stopped = _run_round(grid, cfg, rundir, run, rnd, model=model, device=device, held_out=held_out,
                                  wait_timeout=wait_timeout)
        run.rows.append(row)
        last_done = rnd
        emit("round_end", row.to_json())

    _finish(cfg, rundir, run, model, spec)
    emit("done", {"run_dir": str(rundir.path)})
    return RunSummary(run_dir=rundir.path, run_id=run.run_id, rounds_done=last_done, rows=run.rows,
                      stopped_reason=stopped)
