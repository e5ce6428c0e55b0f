"""Hyperparameter search for a federation: Optuna TPE, every trial a short local federation.

Three parts, each usable alone:

* :class:`SearchSpace`: which run-config keys are searched and over what (ranges, choices, fixed values),
  parsed from a mapping (``--space FILE``) and validated against :class:`common.config.RunConfig` before any
  trial runs;
* :func:`search`: the seeded TPE loop (Optuna's ask-and-tell interface) around an *objective*, any callable
  ``objective(params, trial) -> TrialOutcome`` that raises :class:`TrialFailed` for a failed trial. A failed
  trial is recorded and told to Optuna as failed; the search goes on;
* :class:`FederationObjective`: the real objective. It runs the ``fedpriv simulate`` runner
  (:func:`simulations.runner.run`) in this process on node folders prepared once, reads the trial's
  ``metrics.jsonl`` and returns the last round's metric.

Privacy rule. Trials on data marked *public* or *synthetic* start from fresh node state (each trial has its
own accountant and ledger). Trials on data marked *private* share each node's persistent state directory, so
the node's accountant and signed ledger record every trial's training as a release, and the node's budget
caps the tuning too. The search is given a tuning budget ``tune_epsilon``; trial k of N asks the nodes to stay
within a cumulative ε of ``tune_epsilon * k / N`` (run-config key ``epsilon``, which a node may only lower),
and the node calibrates its noise to that, so the whole search spends at most ``tune_epsilon``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import ConfigError, RunConfig
from common.fsutil import atomic_write_bytes
from common.seeds import derived_seed
from server.rows import RoundRow
from server.rundir import RunDir
from simulations import runner as simulation_runner

log = logging.getLogger("fedpriv.tune")

DATA_KINDS = ("public", "synthetic", "private")
METRICS = ("eval_accuracy", "eval_macro_f1", "accuracy", "macro_f1")
# Run-config keys a search may vary: training knobs only. Privacy settings (dp, epsilon, delta, accountant,
# noise seed), the data schema and the run's identity are not searched.
TUNABLE_KEYS = ("learning-rate", "local-epochs", "clipping-norm", "train-part", "top-k-layers", "batch-size",
                "lora-r", "lora-alpha", "weight-decay", "warmup-ratio", "max-length", "aggregation")
# Keys never written to best.toml: where a trial ran, its short round count and its fixed noise seed (fairness
# thresholds are left out too: dotted keys that `flwr run` only accepts when pyproject declares them).
NOT_IN_BEST = ("out", "num-server-rounds", "noise-seed")

DEFAULT_SPACE: dict[str, Any] = {
    # factors of the train part's default rate (RunConfig.effective_learning_rate): head 2e-2, lora 1e-3, ...
    "learning-rate": {"low": 0.1, "high": 10.0, "log": True, "relative": True},
    "local-epochs": {"low": 1, "high": 3},
    "clipping-norm": {"low": 0.1, "high": 10.0, "log": True},
    "train-part": {"choices": ["head", "lora"]},  # classifier and full: name them in --space
    "batch-size": {"choices": [16, 32, 64]},
}

# ---- errors (user-facing texts, asserted verbatim in tests)
ERR_DATA_UNMARKED = (
    "--data {data} is not marked: say what it holds with --data-is public, --data-is synthetic or --data-is "
    "private (tuning on private data spends the nodes' privacy budget)"
)
ERR_DATA_KIND = "--data-is must be one of public, synthetic, private; got {value!r}"
ERR_PRIVATE_NOT_OK = (
    "--data-is private: every trial trains on the nodes' private data and spends their privacy budget; pass "
    "--private-ok to accept that (the cost is accounted in each node's ledger), or tune on public or synthetic "
    "data"
)
ERR_PRIVATE_NO_DP = (
    "--data-is private with --no-dp: a trial on private data must be a DP release recorded in the nodes' "
    "ledgers; drop --no-dp"
)
ERR_TUNE_EPSILON = (
    "--tune-epsilon must be > 0 and below the nodes' budget --epsilon {budget:g} (the rest is left for the "
    "final run); got {value!r}"
)
ERR_TRIALS = "--trials must be at least 1; got {value!r}"
ERR_METRIC = "--metric must be one of {choices}; got {value!r}"
ERR_METRIC_EVAL = "--metric {metric} needs --eval-data (a server-held evaluation file); use accuracy or macro_f1"
ERR_SPACE = "search space{source}: {count} problem(s):\n{problems}"
ERR_SPACE_FILE = "search space file {file}: {reason}"
SPACE_UNKNOWN_KEY = "{key}: not a searchable key; searchable: {valid}"
SPACE_BAD_SPEC = ("{key}: give a value (fixed), {{low, high[, log]}} (a range) or {{choices = [...]}}; "
                  "got {spec!r}")
SPACE_BAD_FIELDS = "{key}: unknown field(s) {fields}; a range has low, high, log (and relative for learning-rate)"
SPACE_ORDER = "{key}: low {low!r} must be below high {high!r}"
SPACE_LOG = "{key}: a log range needs low > 0; got low {low!r}"
SPACE_RELATIVE = "{key}: 'relative' is only for learning-rate (factors of the train part's default rate)"
SPACE_EMPTY = "{key}: choices must be a non-empty list"
SPACE_TYPE = "{key}: {what} {value!r} is not {kind}"
WARN_PRIVATE = (
    "TUNING ON PRIVATE DATA. Every trial trains on the nodes' data and is a DP release: {trials} trial(s) x "
    "{rounds} round(s) will spend up to ε={tune_epsilon:g} (δ={delta:g}) of each node's budget ε={budget:g}. "
    "The spend is recorded in each node's accountant and signed ledger ({state}) and leaves ε={left:g} for the "
    "final run; best.toml asks for no more than that."
)
WARN_PRIVATE_METRIC = (
    "The metric that picks the best trial ({metric}) comes from exact counts on the nodes' validation data, "
    "which DP does not cover. Pass --count-noise-epsilon (noised, ledgered counts) or select on a public "
    "server-held set (--eval-data with --metric eval_accuracy)."
)


class TuneError(ValueError):
    """A tuning setting or search space is invalid; the message names the flag or key and the fix."""


class TrialFailed(Exception):
    """A trial did not produce a metric (every node refused, a round failed, the runner crashed).

    ``epsilon`` holds what the nodes had spent by the end of the trial (cumulative, per node), if known.
    """

    def __init__(self, reason: str, *, epsilon: Mapping[str, float] | None = None,
                 epsilon_trial: Mapping[str, float] | None = None, run_dir: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.epsilon = dict(epsilon or {})
        self.epsilon_trial = dict(epsilon_trial or {})
        self.run_dir = run_dir


@dataclass(frozen=True)
class TrialOutcome:
    """What an objective returns for a completed trial (larger ``value`` is better)."""

    value: float
    epsilon: dict[str, float] = field(default_factory=dict)  # per node, cumulative ε at the end of the trial
    epsilon_trial: dict[str, float] = field(default_factory=dict)  # per node, ε this trial spent
    run_dir: str = ""


@dataclass(frozen=True)
class TrialRecord:
    """One line of ``trials.jsonl``."""

    trial: int  # 1-based
    params: dict[str, Any]  # run-config values this trial used for the searched keys
    suggested: dict[str, Any]  # Optuna's raw parameters (e.g. learning-rate-factor)
    status: str  # "ok" | "failed"
    value: float | None
    reason: str = ""
    epsilon: dict[str, float] = field(default_factory=dict)
    epsilon_trial: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    run_dir: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TuneResult:
    records: list[TrialRecord]
    best: TrialRecord | None  # the completed trial with the largest value (first one on ties)


Objective = Callable[[dict[str, Any], int], TrialOutcome]


# --------------------------------------------------------------------------------------------- checks


def check_data_kind(*, data: str, data_is: str | None, private_ok: bool, dp: bool) -> str:
    """The data kind a search runs on, or :class:`TuneError` naming the flag to set.

    No ``data`` means the built-in synthetic demo set (kind ``synthetic`` unless stated). A file must be
    marked; ``private`` needs ``private_ok`` and DP.
    """
    if data_is is not None and data_is not in DATA_KINDS:
        raise TuneError(ERR_DATA_KIND.format(value=data_is))
    if data_is is None:
        if data:
            raise TuneError(ERR_DATA_UNMARKED.format(data=data))
        data_is = "synthetic"
    if data_is == "private":
        if not private_ok:
            raise TuneError(ERR_PRIVATE_NOT_OK)
        if not dp:
            raise TuneError(ERR_PRIVATE_NO_DP)
    return data_is


def check_settings(*, trials: int, metric: str, eval_data: str, private: bool, tune_epsilon: float,
                   budget: float) -> None:
    """Validate the search settings before any work; raise one :class:`TuneError` for the first problem."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise TuneError(ERR_TRIALS.format(value=trials))
    if metric not in METRICS:
        raise TuneError(ERR_METRIC.format(choices=", ".join(METRICS), value=metric))
    if metric.startswith("eval_") and not eval_data:
        raise TuneError(ERR_METRIC_EVAL.format(metric=metric))
    if private and not (math.isfinite(tune_epsilon) and 0 < tune_epsilon < budget):
        raise TuneError(ERR_TUNE_EPSILON.format(budget=budget, value=tune_epsilon))


@dataclass(frozen=True)
class TuningPolicy:
    """What a search may spend of each node's privacy budget, decided before any work.

    ``budget`` is the nodes' ε budget (the smaller of ``--epsilon`` and the run config's ``epsilon``);
    on private data the search may spend up to ``tune_epsilon`` of it (default half) and the final run is
    asked to stay within :attr:`left`. Public and synthetic data spend nothing that needs accounting.
    """

    kind: str  # "public", "synthetic" or "private"
    metric: str
    budget: float
    tune_epsilon: float

    @property
    def private(self) -> bool:
        return self.kind == "private"

    @property
    def left(self) -> float | None:
        """ε left for the final run: the budget minus the most tuning *could* have spent (each node was capped
        at ``tune_epsilon``), never minus a measured figure that a lost row could understate. None when the
        data is not private."""
        return self.budget - self.tune_epsilon if self.private else None

    def warnings(self, *, trials: int, rounds: int, delta: float, state: Path,
                 count_noise_epsilon: float) -> list[str]:
        """The warnings to print before a search on private data (none otherwise)."""
        if not self.private:
            return []
        out = [WARN_PRIVATE.format(trials=trials, rounds=rounds, tune_epsilon=self.tune_epsilon, delta=delta,
                                   budget=self.budget, state=state, left=self.left)]
        if not self.metric.startswith("eval_") and count_noise_epsilon <= 0:
            out.append(WARN_PRIVATE_METRIC.format(metric=self.metric))
        return out

    def spent(self, nodes_dir: Path, records: Sequence[TrialRecord]) -> float:
        """The most ε any node spent on the search: from the nodes' own ledgers, which hold every release (also
        a trial that crashed mid-way, and noised evaluation counts, which the trials' rows can miss), or the
        trials' records, whichever is larger. 0 when the data is not private."""
        if not self.private:
            return 0.0
        on_ledger = simulation_runner.nodes_ledger_epsilon(nodes_dir).values()
        return max([*on_ledger, *(max(r.epsilon.values()) for r in records if r.epsilon)], default=0.0)


def tuning_policy(base: RunConfig, *, data: str, data_is: str | None, private_ok: bool, trials: int,
                  metric: str | None, epsilon: float, tune_epsilon: float | None) -> TuningPolicy:
    """Check the data kind and the search settings and decide the privacy budget of a search.

    Parameters
    ----------
    base : RunConfig
        The trials' common configuration (its ``epsilon`` > 0 lowers the budget; ``eval_data`` sets the
        default metric).
    data, data_is, private_ok :
        See :func:`check_data_kind`.
    trials : int
        Number of trials (>= 1).
    metric : str or None
        What to maximise; None: ``eval_accuracy`` with a server-held set, else ``accuracy``.
    epsilon : float
        The nodes' budget (``--epsilon``).
    tune_epsilon : float or None
        What the search may spend on private data; None: half the budget. Must be in (0, budget).

    Raises
    ------
    TuneError
        Naming the first problem.
    """
    kind = check_data_kind(data=data, data_is=data_is, private_ok=private_ok, dp=base.dp)
    metric = metric or ("eval_accuracy" if base.eval_data else "accuracy")
    budget = min(epsilon, base.epsilon) if base.epsilon > 0 else epsilon
    tune_eps = tune_epsilon if tune_epsilon is not None else budget / 2
    check_settings(trials=trials, metric=metric, eval_data=base.eval_data, private=kind == "private",
                   tune_epsilon=tune_eps, budget=budget)
    return TuningPolicy(kind=kind, metric=metric, budget=budget, tune_epsilon=tune_eps)


def trial_epsilon_cap(*, trial: int, trials: int, tune_epsilon: float) -> float:
    """Cumulative ε that trial ``trial`` (1-based) of ``trials`` may reach: an equal share per trial."""
    return tune_epsilon * trial / trials


# --------------------------------------------------------------------------------------------- search space


def _field_kinds() -> dict[str, type]:
    names = {"int": int, "float": float, "str": str, "bool": bool}
    return {f.name.replace("_", "-"): names[str(f.type)] for f in dataclasses.fields(RunConfig)
            if str(f.type) in names}


@dataclass(frozen=True)
class Dimension:
    """One searched run-config key: a fixed value, a range (``low``..``high``, optionally log) or choices."""

    key: str
    kind: type  # the RunConfig field type: int, float or str
    value: Any = None  # fixed
    low: float | None = None
    high: float | None = None
    log: bool = False
    relative: bool = False  # learning-rate only: low/high are factors of the train part's default rate
    choices: tuple[Any, ...] = ()

    @property
    def name(self) -> str:
        """The Optuna parameter name."""
        return f"{self.key}-factor" if self.relative else self.key

    def suggest(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.low is None:
            return self.value
        if self.kind is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


@dataclass(frozen=True)
class SearchSpace:
    """The searched keys, in an order where ``train-part`` and ``top-k-layers`` come before ``learning-rate``
    (a relative learning rate depends on them)."""

    dims: tuple[Dimension, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(d.key for d in self.dims)

    def suggest(self, trial, base: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        """(run-config values for this trial, Optuna's raw parameters)."""
        params: dict[str, Any] = {}
        suggested: dict[str, Any] = {}
        for d in self.dims:
            v = d.suggest(trial)
            if d.low is not None or d.choices:
                suggested[d.name] = v
            if d.relative:
                cfg = RunConfig.from_mapping({**base.to_mapping(), **params, "learning-rate": 0.0})
                v = float(v) * cfg.effective_learning_rate
            params[d.key] = v
        return params, suggested


def parse_space(spec: Mapping[str, Any], *, base: RunConfig, source: str = "") -> SearchSpace:
    """Build a search space from ``{key: value | {low, high[, log][, relative]} | {choices}}``.

    Every value a trial could use (range ends, choices, fixed values) is checked with :class:`RunConfig`, so a
    bad space fails here with every problem listed, not in trial 7.

    Raises
    ------
    TuneError
        Listing every problem (:data:`ERR_SPACE`).
    """
    kinds = _field_kinds()
    problems: list[str] = []
    dims: list[Dimension] = []

    def config_ok(key: str, value: Any, what: str) -> bool:
        try:
            RunConfig.from_mapping({**base.to_mapping(), key: value})
        except ConfigError as exc:
            problems.append(f"{key}: {what} {value!r}: {exc}")
            return False
        return True

    def typed(key: str, value: Any, kind: type, what: str) -> Any:
        ok = (isinstance(value, str) if kind is str else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, int | float) and not isinstance(value, bool))
        if not ok:
            kind_name = {int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))
            problems.append(SPACE_TYPE.format(key=key, what=what, value=value, kind=kind_name))
            return None
        return float(value) if kind is float else value

    for key, raw in spec.items():
        if key not in TUNABLE_KEYS:
            problems.append(SPACE_UNKNOWN_KEY.format(key=key, valid=", ".join(TUNABLE_KEYS)))
            continue
        kind = kinds[key]
        if not isinstance(raw, Mapping):
            if isinstance(raw, list | tuple | set):
                problems.append(SPACE_BAD_SPEC.format(key=key, spec=raw))
                continue
            v = typed(key, raw, kind, "value")
            if v is not None and config_ok(key, v, "value"):
                dims.append(Dimension(key=key, kind=kind, value=v))
            continue
        fields = set(raw)
        if "choices" in fields:
            if fields - {"choices"}:
                problems.append(SPACE_BAD_FIELDS.format(key=key, fields=", ".join(sorted(fields - {"choices"}))))
                continue
            choices = raw["choices"]
            if not isinstance(choices, list | tuple) or not choices:
                problems.append(SPACE_EMPTY.format(key=key))
                continue
            values = [typed(key, c, kind, "choice") for c in choices]
            if all(v is not None for v in values) and all(config_ok(key, v, "choice") for v in values):
                dims.append(Dimension(key=key, kind=kind, choices=tuple(values)))
            continue
        extra = fields - {"low", "high", "log", "relative"}
        if extra or not {"low", "high"} <= fields:
            if extra:
                problems.append(SPACE_BAD_FIELDS.format(key=key, fields=", ".join(sorted(extra))))
            else:
                problems.append(SPACE_BAD_SPEC.format(key=key, spec=dict(raw)))
            continue
        relative = bool(raw.get("relative", False))
        log_scale = bool(raw.get("log", False))
        if relative and key != "learning-rate":
            problems.append(SPACE_RELATIVE.format(key=key))
            continue
        if kind is str:
            problems.append(SPACE_BAD_SPEC.format(key=key, spec=dict(raw)))
            continue
        num_kind = float if relative else kind
        low = typed(key, raw["low"], num_kind, "low")
        high = typed(key, raw["high"], num_kind, "high")
        if low is None or high is None:
            continue
        if not low < high:
            problems.append(SPACE_ORDER.format(key=key, low=low, high=high))
            continue
        if (log_scale or relative) and low <= 0:
            problems.append(SPACE_LOG.format(key=key, low=low))
            continue
        if relative or (config_ok(key, low, "low") and config_ok(key, high, "high")):
            dims.append(Dimension(key=key, kind=kind, low=low, high=high, log=log_scale or relative,
                                  relative=relative))
    if problems:
        where = f" {source}" if source else ""
        raise TuneError(ERR_SPACE.format(source=where, count=len(problems),
                                         problems="\n".join(f"  - {p}" for p in problems)))
    first = ("train-part", "top-k-layers")
    dims.sort(key=lambda d: (0 if d.key in first else 2 if d.relative else 1))
    return SearchSpace(dims=tuple(dims))


def load_space(path: str | Path | None, *, base: RunConfig) -> SearchSpace:
    """:data:`DEFAULT_SPACE`, with the keys of a TOML or JSON file (``--space``) replacing their defaults.

    A key given a single value in the file is fixed (not searched); give a range or choices to search it.
    """
    spec = dict(DEFAULT_SPACE)
    source = ""
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise TuneError(ERR_SPACE_FILE.format(file=p, reason=exc.strerror or exc)) from None
        try:
            if p.suffix == ".json":
                loaded = json.loads(text)
            else:
                import tomllib

                loaded = tomllib.loads(text)
        except (ValueError, json.JSONDecodeError) as exc:
            raise TuneError(ERR_SPACE_FILE.format(file=p, reason=f"cannot be parsed ({exc})")) from None
        if not isinstance(loaded, dict):
            raise TuneError(ERR_SPACE_FILE.format(file=p, reason="must hold a table of keys"))
        spec.update(loaded)
    return parse_space(spec, base=base, source=source)


# --------------------------------------------------------------------------------------------- search


def search(objective: Objective, *, space: SearchSpace, base: RunConfig, trials: int, seed: int,
           on_trial: Callable[[TrialRecord], None] | None = None) -> TuneResult:
    """Maximise ``objective`` over ``space`` with Optuna's TPE sampler (seeded) for ``trials`` trials.

    Parameters
    ----------
    objective : callable
        ``objective(params, trial) -> TrialOutcome`` with ``params`` the run-config values of the searched keys
        and ``trial`` the 1-based trial number; raises :class:`TrialFailed` for a failed trial. A non-finite
        value also counts as failed.
    space : SearchSpace
    base : RunConfig
        The configuration every trial shares (needed for relative learning rates).
    trials : int
        Number of trials (each runs to completion or failure; failed ones count).
    seed : int
        Seed of the sampler: the same seed, space and outcomes give the same trials.
    on_trial : callable, optional
        Called with each trial's record as soon as it ends (e.g. to append it to ``trials.jsonl``).

    Returns
    -------
    TuneResult
        All records in order and the best completed one (None when every trial failed).

    Notes
    -----
    TPE: Bergstra, Bardenet, Bengio and Kégl, "Algorithms for Hyper-Parameter Optimization", NeurIPS 2011.
    The first ``min(10, trials // 2)`` trials (at least 1) are sampled at random, then TPE takes over.
    """
    import optuna
    from optuna.trial import TrialState

    if trials < 1:
        raise TuneError(ERR_TRIALS.format(value=trials))
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Optuna's per-trial INFO lines; our records say more
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, trials // 2)))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    records: list[TrialRecord] = []
    best: TrialRecord | None = None
    for _ in range(trials):
        trial = study.ask()
        number = trial.number + 1
        params, suggested = space.suggest(trial, base)
        start = time.perf_counter()
        try:
            outcome = objective(dict(params), number)
            if not math.isfinite(outcome.value):
                raise TrialFailed(f"the metric is not a finite number ({outcome.value!r})",
                                  epsilon=outcome.epsilon, epsilon_trial=outcome.epsilon_trial,
                                  run_dir=outcome.run_dir)
        except TrialFailed as exc:
            study.tell(trial, state=TrialState.FAIL)
            record = TrialRecord(trial=number, params=params, suggested=suggested, status="failed", value=None,
                                 reason=exc.reason, epsilon=exc.epsilon, epsilon_trial=exc.epsilon_trial,
                                 seconds=time.perf_counter() - start, run_dir=exc.run_dir)
            log.warning("trial %d failed: %s", number, exc.reason)
        else:
            study.tell(trial, float(outcome.value))
            record = TrialRecord(trial=number, params=params, suggested=suggested, status="ok",
                                 value=float(outcome.value), epsilon=outcome.epsilon,
                                 epsilon_trial=outcome.epsilon_trial, seconds=time.perf_counter() - start,
                                 run_dir=outcome.run_dir)
            if best is None or record.value > best.value:
                best = record
        records.append(record)
        if on_trial is not None:
            on_trial(record)
    return TuneResult(records=records, best=best)


# --------------------------------------------------------------------------------------------- federation


class FederationObjective:
    """The real objective: one short federation per trial, run in this process by the simulate runner.

    Node folders (data partitions, keys, ``node.json``) are prepared once in ``nodes_dir``. Each trial gets
    a run directory ``out/trials/trial-NNN`` laid out like a ``fedpriv simulate`` run directory, whose
    ``nodes/node-i/node.json`` points at the shared partition and at the node's state directory: the trial's
    own (public/synthetic data) or the shared one in ``nodes_dir`` (private data, so every trial is accounted
    in the same accountant and ledger). Only the best trial so far keeps its ``model/``.

    ``runner`` defaults to :func:`simulations.runner.run` (tests may pass another with the same signature).
    """

    def __init__(self, *, base: RunConfig, out: Path, nodes_dir: Path, num_nodes: int, metric: str,
                 private: bool, trials: int, tune_epsilon: float = 0.0, runner: Callable[..., None] | None = None,
                 progress: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.base = base
        self.out = Path(out)
        self.nodes_dir = Path(nodes_dir)
        self.num_nodes = num_nodes
        self.metric = metric
        self.private = private
        self.trials = trials
        self.tune_epsilon = tune_epsilon
        self.runner = runner
        self.progress = progress
        self.spent: dict[str, float] = {}  # private data: each node's cumulative ε so far
        self._best: tuple[float, Path] | None = None

    def trial_dir(self, trial: int) -> Path:
        return self.out / "trials" / f"trial-{trial:03d}"

    def trial_config(self, params: Mapping[str, Any], trial: int) -> RunConfig:
        values = {**self.base.to_mapping(), **params, "out": str(self.trial_dir(trial))}
        if self.private:
            values["epsilon"] = trial_epsilon_cap(trial=trial, trials=self.trials, tune_epsilon=self.tune_epsilon)
        if self.base.noise_seed >= 0:
            # A fixed noise seed must not repeat across trials: trials train on the same records, and two
            # releases with the same noise (e.g. differing only in the clipping norm) let an observer cancel it.

            values["noise-seed"] = derived_seed(self.base.noise_seed, "tune-trial", trial)
        return RunConfig.from_mapping(values)

    def _write_trial_nodes(self, trial_dir: Path) -> Path:
        nodes = trial_dir / "nodes"
        for i in range(self.num_nodes):
            shared = self.nodes_dir / f"node-{i}"
            node_cfg = json.loads((shared / "node.json").read_text())
            if not self.private:
                node_cfg["state-dir"] = str((nodes / f"node-{i}" / "state").resolve())
            (nodes / f"node-{i}").mkdir(parents=True, exist_ok=True, mode=0o700)
            (nodes / f"node-{i}" / "node.json").write_text(json.dumps(node_cfg, indent=2))
        return nodes

    def __call__(self, params: dict[str, Any], trial: int) -> TrialOutcome:
        trial_dir = self.trial_dir(trial)
        try:
            cfg = self.trial_config(params, trial)
        except ConfigError as exc:  # values valid one by one, not together
            raise TrialFailed(f"invalid combination: {exc}", run_dir=str(trial_dir)) from None
        nodes = self._write_trial_nodes(trial_dir)
        runner = self.runner
        if runner is None:
            runner = simulation_runner.run
        try:
            runner(cfg, nodes_dir=nodes, num_nodes=self.num_nodes, progress=self.progress)
        except Exception as exc:  # a crashed trial is a failed trial; the search goes on
            log.exception("trial %d: the federation failed", trial)
            self._drop_model(trial_dir)
            raise TrialFailed(f"the federation failed: {type(exc).__name__}: {exc}", epsilon=dict(self.spent),
                              run_dir=str(trial_dir)) from exc
        rows = RunDir(trial_dir).read_rows()
        eps_after = dict(self.spent) if self.private else {}
        for row in rows:
            for node, eps in row.epsilon.items():
                eps_after[node] = float(eps)
        if self.private:  # the nodes' own ledgers hold every release, the last round's noised counts included
            for node, eps in simulation_runner.nodes_ledger_epsilon(self.nodes_dir).items():
                eps_after[node] = max(eps_after.get(node, 0.0), eps)
        eps_trial = {n: e - (self.spent.get(n, 0.0) if self.private else 0.0) for n, e in eps_after.items()}
        if self.private:
            self.spent = dict(eps_after)
        failed = [r for r in rows if r.status != "ok"]
        value = rows[-1].metric(self.metric) if rows else None
        if not rows or failed or value is None:
            self._drop_model(trial_dir)
            raise TrialFailed(self._failure_reason(rows, failed), epsilon=eps_after, epsilon_trial=eps_trial,
                              run_dir=str(trial_dir))
        self._keep_if_best(float(value), trial_dir)
        return TrialOutcome(value=float(value), epsilon=eps_after, epsilon_trial=eps_trial, run_dir=str(trial_dir))

    def _failure_reason(self, rows: Sequence[RoundRow], failed: Sequence[RoundRow]) -> str:
        if not rows:
            return "no round completed"
        if failed:
            r = failed[0]
            why = [f"{x['node']}: {x['reason']}" for x in r.refusals]
            why += [str(x.get("reason")) for x in r.rejected + r.errors]
            why = list(dict.fromkeys(why))  # one line per distinct reason (every node may say the same)
            detail = f" ({'; '.join(why)})" if why else ""
            return f"round {r.round} failed: {r.reason if r.reason is not None else 'status ' + r.status}{detail}"
        return f"the last round has no {self.metric!r}"

    def _drop_model(self, trial_dir: Path) -> None:
        shutil.rmtree(trial_dir / "model", ignore_errors=True)

    def _keep_if_best(self, value: float, trial_dir: Path) -> None:
        if self._best is None or value > self._best[0]:
            if self._best is not None:
                self._drop_model(self._best[1])
            self._best = (value, trial_dir)
        else:
            self._drop_model(trial_dir)


# --------------------------------------------------------------------------------------------- outputs


def best_run_config(base: RunConfig, params: Mapping[str, Any], *, epsilon: float | None = None) -> dict[str, Any]:
    """The run-config keys of the best trial worth keeping: the searched keys and every shared key that differs
    from its default, without :data:`NOT_IN_BEST`. ``epsilon`` given (what is left after tuning on private
    data) caps the run config's own ``epsilon`` ask."""
    cfg = RunConfig.from_mapping({**base.to_mapping(), **params})
    defaults = RunConfig().to_mapping()
    out: dict[str, Any] = {}
    for key, value in cfg.to_mapping().items():
        if key in NOT_IN_BEST or key.startswith("fairness."):
            continue
        if key in params or value != defaults.get(key):
            out[key] = value
    if epsilon is not None:
        out["epsilon"] = float(min(epsilon, cfg.epsilon) if cfg.epsilon > 0 else epsilon)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML run config cannot hold {value!r}")
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string: JSON escapes are valid TOML


def write_run_config_toml(path: str | Path, values: Mapping[str, Any], *, comments: Sequence[str] = ()) -> Path:
    """Write flat ``key = value`` TOML (what ``flwr run --run-config FILE`` and ``fedpriv simulate
    --run-config-file FILE`` read), with ``#`` comment lines first; the file is parsed back to check it."""
    import tomllib

    lines = [f"# {c}" for c in comments]
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != {k: (float(v) if isinstance(v, float) else v) for k, v in values.items()}:
        raise RuntimeError(f"run config TOML does not read back as written: {text!r}")  # programming error
    path = Path(path)

    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def append_trial(path: str | Path, record: TrialRecord) -> None:
    """Append one trial to ``trials.jsonl``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record.to_json(), sort_keys=True, allow_nan=False) + "\n")


def combine_ledgers(trial_dirs: Sequence[Path], out_dir: Path) -> dict[str, int]:
    """Concatenate the server's copies of each node's ledger over the trials, in order, into
    ``out_dir/<node>.jsonl`` (plus ``<node>.pub``); return the entry count per node.

    On private data every trial appended to the same node ledger, so the result is that ledger as the
    coordinator saw it, from entry 0: ``fedpriv ledger verify`` checks it as a whole. (On public data each trial
    has fresh node keys and ledgers, so their concatenation is not one chain; use each trial's ``ledgers/``.)
    """
    counts: dict[str, int] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: dict[str, set[str]] = {}
    lines: dict[str, list[str]] = {}
    for d in trial_dirs:
        ledgers = Path(d) / "ledgers"
        if not ledgers.is_dir():
            continue
        for led in sorted(ledgers.glob("*.jsonl")):
            if led.stem == "server":
                continue
            node = led.stem
            for line in led.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                h = json.loads(line).get("hash")
                if h in seen.setdefault(node, set()):
                    continue
                seen[node].add(h)
                lines.setdefault(node, []).append(line)
            pub = ledgers / f"{node}.pub"
            if pub.exists() and not (out_dir / pub.name).exists():
                shutil.copyfile(pub, out_dir / pub.name)
    for node, node_lines in lines.items():
        (out_dir / f"{node}.jsonl").write_text("\n".join(node_lines) + "\n", encoding="utf-8")
        counts[node] = len(node_lines)
    return counts
