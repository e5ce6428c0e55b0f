"""One typed, validated configuration for a fedpriv run and for a node.

Flower hands the ServerApp a flat ``run_config`` (``[tool.flwr.app.config]`` plus ``--run-config`` overrides)
and each ClientApp a flat ``node_config`` (``flower-supernode --node-config``). Both are parsed here, once, into
frozen dataclasses. Every bad value fails before any training with an error naming the key, the accepted range
and the value received.

Keys use Flower's hyphenated style (``local-epochs``); dotted keys group related settings
(``fairness.max-equalized-odds-difference``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.cleaning import CleaningConfig
from common.recipes import auto_part, recipe_for

TRAIN_PARTS = ("auto", "full", "head", "lora", "classifier")
POOLINGS = ("auto", "cls", "mean", "mean-layers")
AGGREGATIONS = ("fedavg", "fedmedian", "trimmed-mean", "krum")
ACCOUNTANTS = ("prv", "rdp")

ERR_UNKNOWN_KEY = "unknown config key {key!r}; valid keys: {valid}"
ERR_TYPE = "config key {key!r} expects {expected}, got {value!r}"
ERR_RANGE = "config key {key!r} must be {allowed}, got {value!r}"
# Numeric keys of a metrics.jsonl row that can select a model (eval_* need a server-held evaluation set).
SELECTION_METRICS = ("accuracy", "macro_f1", "loss", "train_loss", "eval_accuracy", "eval_macro_f1", "eval_loss")
ERR_CHOICE = "config key {key!r} must be one of {choices}, got {value!r}"


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


# --------------------------------------------------------------------------------------------- helpers


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Convert ``value`` (possibly a string from a CLI) to ``kind`` or raise naming the key."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise ConfigError(ERR_TYPE.format(key=key, expected="a boolean (true/false)", value=value))
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(ERR_TYPE.format(key=key, expected="an integer", value=value))
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(ERR_TYPE.format(key=key, expected="an integer", value=value))
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(ERR_TYPE.format(key=key, expected="a number", value=value))
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(ERR_TYPE.format(key=key, expected="a number", value=value))
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(ERR_TYPE.format(key=key, expected="a string", value=value))
    raise TypeError(f"unsupported config type {kind}")  # programming error, not user input


def _check(key: str, value: float, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> None:
    ok = not (isinstance(value, float) and not math.isfinite(value))  # NaN and ±inf are never valid
    if low is not None:
        ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        allowed = " and ".join(p for p in (lo, hi) if p)
        raise ConfigError(ERR_RANGE.format(key=key, allowed=allowed, value=value))


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(ERR_CHOICE.format(key=key, choices=", ".join(choices), value=value))


def _flower_key(name: str) -> str:
    return name.replace("_", "-")


def parse_kv_string(text: str) -> dict[str, str]:
    """Parse ``"k=v k2=v2"`` (Flower's ``--run-config`` syntax; values may be quoted).

    Raises
    ------
    ConfigError
        For a token without ``=``.
    """
    import shlex

    out: dict[str, str] = {}
    try:
        tokens = shlex.split(text)
    except ValueError as exc:  # e.g. "No closing quotation"
        raise ConfigError(f"run config {text!r} cannot be parsed: {exc}") from None
    for token in tokens:
        if "=" not in token:
            raise ConfigError(f"run config item {token!r} is not of the form key=value")
        key, value = token.split("=", 1)
        out[key.strip()] = value.strip()
    return out


# --------------------------------------------------------------------------------------------- run config


FAIRNESS_THRESHOLD_KEYS = (
    "max-demographic-parity-difference",
    "min-demographic-parity-ratio",
    "max-equalized-odds-difference",
    "min-equalized-odds-ratio",
    "max-equal-opportunity-difference",
    "max-accuracy-difference",
    "min-worst-group-accuracy",
)


@dataclass(frozen=True)
class RunConfig:
    """Everything the coordinator decides for a run. Field ``foo_bar`` is config key ``foo-bar``."""

    # --- federation
    num_server_rounds: int = 3  # rounds of train + evaluate
    min_nodes: int = 2  # a round needs this many successful train replies; fewer -> round fails
    fraction_train: float = 1.0  # share of connected nodes sampled per round, in (0, 1]
    round_timeout: float = 3600.0  # seconds to wait for replies in one round
    aggregation: str = "fedavg"  # fedavg | fedmedian | trimmed-mean | krum
    trim_beta: float = 0.2  # trimmed-mean: fraction cut from each end
    krum_byzantine: int = 0  # krum: number of malicious nodes tolerated
    max_update_norm: float = 0.0  # reject a node's update whose L2 norm exceeds this (0 = no bound)
    seed: int = 0  # every random choice derives from this seed
    # --- model
    model: str = "minilm"  # "minilm" (offline package), "tiny" (random tiny BERT from config) or a directory
    # auto (default): classifier under DP, full without (common/recipes.py) | full | head | lora | classifier
    # (the output layer alone on the frozen encoder: most DP-friendly, trains on cached features)
    train_part: str = "auto"
    pooling: str = "auto"  # auto (the model's own: mean for sentence-transformers models, else cls) | cls | mean | mean-layers
    top_k_layers: int = 0  # with train-part=head: also train the top k encoder layers (0 = classifier + pooler)
    lora_r: int = 8
    lora_alpha: int = 16
    max_length: int = 64  # tokens per example (truncation)
    labels: str = ""  # comma-separated class names in index order; one mapping for the whole federation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # --- data schema
    text_col: str = "text"
    label_col: str = "label"
    group_col: str = ""  # empty: no group column, fairness is computed over one group "all"
    val_fraction: float = 0.2  # each node's local validation split
    cv_folds: int = 0  # cross-validation: 0 = off; K >= 2 = fold cv-fold of each node's data is its validation set
    cv_fold: int = 0  # which fold (0..K-1) this run holds out
    clean: str = ""  # text cleaning on each node and on eval-data: comma list of common.cleaning.RULES,
    # "all", or "" (off); applied before the train/validation split, counts in RUN_DIR/cleaning.json
    # --- local training
    # 0 in local-epochs, batch-size, learning-rate, clipping-norm = the train part's recipe (common/recipes.py)
    local_epochs: int = 0
    batch_size: int = 0  # logical batch size (expected batch size under Poisson sampling)
    max_physical_batch_size: int = 32  # memory cap; DP uses BatchMemoryManager to split logical batches
    learning_rate: float = 0.0  # AdamW learning rate; 0 = by train part (see effective_learning_rate)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    # --- differential privacy (the node's own budget always caps what is asked here)
    dp: bool = True
    epsilon: float = 0.0  # ε the server asks each node to stay within; 0 = the node's own budget
    delta: float = 0.0  # δ; 0 = the node's own
    clipping_norm: float = 0.0  # per-sample gradient L2 bound C; 0 = the recipe's
    accountant: str = "prv"  # prv | rdp
    noise_seed: int = -1  # -1: OS entropy (deployment default); >=0 only for simulations/tests, recorded
    # --- second DP layer: client-level central DP on the server (Flower wrappers + RDP accountant)
    central_dp: bool = False
    central_noise_multiplier: float = 1.0
    central_clipping_norm: float = 1.0
    # --- evaluation, fairness, outputs
    eval_data: str = ""  # optional server-held evaluation file, evaluated centrally every round
    min_group_size: int = 30  # groups smaller than this are flagged in the fairness report
    count_noise_epsilon: float = 0.0  # >0: nodes noise their evaluation counts with this ε per round
    fairness_thresholds: dict[str, float] = field(default_factory=dict)  # fairness.<key> = value
    keep_best_fair: bool = False  # also keep best_fair/ (best accuracy among rounds meeting thresholds)
    # --- model selection and early stopping (server side; see server/selection.py)
    keep_best: bool = False  # keep best/ (the round with the best selection metric) beside model/
    early_stopping_patience: int = 0  # stop after this many rounds without improvement (0 = never stop early)
    early_stopping_metric: str = "auto"  # auto: eval_accuracy with eval-data, else accuracy; any numeric row key
    early_stopping_min_delta: float = 0.0  # an improvement must exceed this
    out: str = "runs/latest"  # run directory

    def __post_init__(self) -> None:
        _check("num-server-rounds", self.num_server_rounds, low=1)
        _check("min-nodes", self.min_nodes, low=1)
        _check("fraction-train", self.fraction_train, low=0.0, high=1.0, low_open=True)
        _check("round-timeout", self.round_timeout, low=0.0, low_open=True)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _check("trim-beta", self.trim_beta, low=0.0, high=0.5, high_open=True)
        _check("krum-byzantine", self.krum_byzantine, low=0)
        _check("max-update-norm", self.max_update_norm, low=0.0)
        _check("seed", self.seed, low=0)
        if not self.model:
            raise ConfigError(ERR_RANGE.format(key="model", allowed="minilm, tiny or a directory", value=""))
        _choice("train-part", self.train_part, TRAIN_PARTS)
        _choice("pooling", self.pooling, POOLINGS)
        _check("top-k-layers", self.top_k_layers, low=0)
        _check("lora-r", self.lora_r, low=1)
        _check("lora-alpha", self.lora_alpha, low=1)
        _check("max-length", self.max_length, low=8, high=512)
        _check("val-fraction", self.val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
        if self.cv_folds == 1:
            raise ConfigError(ERR_RANGE.format(key="cv-folds", allowed="0 (off) or >= 2", value=1))
        _check("cv-folds", self.cv_folds, low=0)
        _check("cv-fold", self.cv_fold, low=0, high=max(self.cv_folds - 1, 0))
        _check("local-epochs", self.local_epochs, low=0)  # 0: recipe
        _check("batch-size", self.batch_size, low=0)  # 0: recipe
        _check("max-physical-batch-size", self.max_physical_batch_size, low=1)
        _check("learning-rate", self.learning_rate, low=0.0)
        _check("weight-decay", self.weight_decay, low=0.0)
        _check("warmup-ratio", self.warmup_ratio, low=0.0, high=1.0, high_open=True)
        _check("epsilon", self.epsilon, low=0.0)
        _check("delta", self.delta, low=0.0, high=1.0, high_open=True)
        _check("clipping-norm", self.clipping_norm, low=0.0)  # 0: recipe; the resolved value is > 0
        _choice("accountant", self.accountant, ACCOUNTANTS)
        _check("noise-seed", self.noise_seed, low=-1)
        # with central-dp on, noise 0 is no privacy and Flower's accountant refuses it (after the round's work)
        _check("central-noise-multiplier", self.central_noise_multiplier, low=0.0, low_open=self.central_dp)
        _check("central-clipping-norm", self.central_clipping_norm, low=0.0, low_open=True)
        _check("min-group-size", self.min_group_size, low=0)
        _check("count-noise-epsilon", self.count_noise_epsilon, low=0.0)
        _check("early-stopping-patience", self.early_stopping_patience, low=0)
        _check("early-stopping-min-delta", self.early_stopping_min_delta, low=0.0)
        if self.early_stopping_metric != "auto" and self.early_stopping_metric not in SELECTION_METRICS:
            raise ConfigError(ERR_RANGE.format(key="early-stopping-metric",
                                               allowed="auto or one of " + ", ".join(SELECTION_METRICS),
                                               value=self.early_stopping_metric))
        if self.early_stopping_metric.startswith("eval_") and not self.eval_data:
            raise ConfigError(ERR_RANGE.format(key="early-stopping-metric",
                                               allowed="a non-eval_ metric unless eval-data is set",
                                               value=self.early_stopping_metric))
        for key, value in self.fairness_thresholds.items():
            if key not in FAIRNESS_THRESHOLD_KEYS:
                raise ConfigError(
                    ERR_UNKNOWN_KEY.format(
                        key=f"fairness.{key}", valid=", ".join(f"fairness.{k}" for k in FAIRNESS_THRESHOLD_KEYS)
                    )
                )
            # every thresholded metric (differences, ratios, accuracies) lies in [0, 1]
            _check(f"fairness.{key}", value, low=0.0, high=1.0)
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(ERR_CHOICE.format(key="device", choices="auto, cpu, cuda, cuda:N", value=self.device))
        if self.clean:
            try:
                CleaningConfig.from_spec(self.clean)
            except ValueError as exc:  # names every unknown rule and lists the valid ones
                raise ConfigError(str(exc)) from None

    # --------------------------------------------------------------------------------- conversions

    def resolved(self) -> RunConfig:
        """The config with ``auto`` and recipe values filled in (common/recipes.py); explicit values win.

        ``train-part=auto`` becomes ``classifier`` under DP and ``full`` without; ``batch-size``,
        ``local-epochs``, ``learning-rate`` and ``clipping-norm`` left at 0 take the train part's recipe.
        Idempotent. The server resolves before sending the round config and the node resolves what it receives,
        so both account for and train with the same concrete values. ``pooling`` is resolved with the model
        (common.model.resolve_pooling), which needs the model directory.
        """
        part = auto_part(dp=self.dp) if self.train_part == "auto" else self.train_part
        r = recipe_for(part, dp=self.dp, top_k_layers=self.top_k_layers)
        return self.replace(train_part=part, batch_size=self.batch_size or r.batch_size,
                            local_epochs=self.local_epochs or r.local_epochs,
                            learning_rate=self.learning_rate or r.learning_rate,
                            clipping_norm=self.clipping_norm or r.clipping_norm)

    @property
    def effective_learning_rate(self) -> float:
        """``learning-rate``, or when 0 the train part's recipe rate (common/recipes.py)."""
        return self.resolved().learning_rate

    @property
    def label_names(self) -> list[str]:
        return [s.strip() for s in self.labels.split(",") if s.strip()] if self.labels else []

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, ignore_unknown: bool = False) -> RunConfig:
        """Build from a flat mapping with Flower-style keys (``local-epochs``), converting strings.

        Unknown keys are an error (a typo must not silently fall back to a default) unless
        ``ignore_unknown`` is set.
        """
        kinds = {_flower_key(f.name): f for f in dataclasses.fields(cls) if f.name != "fairness_thresholds"}
        kwargs: dict[str, Any] = {}
        thresholds: dict[str, float] = {}
        for raw_key, value in values.items():
            key = str(raw_key).strip()
            if key.startswith("fairness."):
                sub = key.split(".", 1)[1]
                thresholds[sub] = _coerce(key, value, float)
                continue
            if key not in kinds:
                if ignore_unknown:
                    continue
                valid = ", ".join(sorted(kinds)) + ", fairness.<threshold>"
                raise ConfigError(ERR_UNKNOWN_KEY.format(key=key, valid=valid))
            f = kinds[key]
            kind = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]
            kwargs[f.name] = _coerce(key, value, kind)
        return cls(**kwargs, fairness_thresholds=thresholds)

    def to_mapping(self) -> dict[str, Any]:
        """Flat Flower-style mapping; ``from_mapping(to_mapping())`` gives an equal config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "fairness_thresholds":
                continue
            out[_flower_key(f.name)] = getattr(self, f.name)
        for key, value in self.fairness_thresholds.items():
            out[f"fairness.{key}"] = value
        return out

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_mapping(), indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------------- node config

# The default ε of a node's noised evaluation counts per round: a fixed share of the node's budget, capped. Over
# the default 3 rounds the counts take 3.75 % of any budget (at ε=8: 0.1 a round, 0.3 in all), so a small budget
# keeps almost all of itself for training (measured: at ε=1 a flat 0.1 a round cost about 1.5 points of SST-2
# dev accuracy; docs/measured-dp-utility.md).
COUNT_NOISE_AUTO = "auto"
COUNT_NOISE_AUTO_SHARE = 1 / 80
COUNT_NOISE_AUTO_CAP = 0.1


@dataclass(frozen=True)
class NodeConfig:
    """What an institution sets for its own node (``flower-supernode --node-config``); never from the server."""

    node_name: str = ""  # name in logs, metrics and the ledger; default "node-<partition-id>" or the node id
    data_path: str = ""  # the node's dataset (CSV/TSV/JSONL/Parquet, plaintext or a fedpriv container)
    key_file: str = ""  # key file for an encrypted dataset
    passphrase_env: str = ""  # or: environment variable holding the passphrase
    require_encryption: bool = False  # refuse plaintext datasets
    state_dir: str = ""  # ledger, signing key and replay store live here (default ~/.fedpriv/<node-name>)
    # --- the node's privacy guarantee: every key below is the institution's; the run config can only ask for
    # less spending or more noise, never weaken these (client/budget.py enforces them)
    epsilon: float = 8.0  # the institution's privacy budget ε: total over every release from this state dir
    delta: float = 1e-5  # δ; must be below 1/n for a dataset of n examples
    accountant: str = "prv"  # prv | rdp: how this node computes ε over its whole ledger
    require_dp: bool = True  # refuse a run config with dp=false (training without DP-SGD)
    allow_fixed_noise_seed: bool = False  # honour a run-config noise-seed >= 0 (reproducible demos/tests only:
    # whoever knows the seed can remove the noise, so such releases carry no guarantee and the audit fails them)
    # ε per round for noised evaluation counts (ledgered); 0 = send no counts; "auto": COUNT_NOISE_AUTO_SHARE of
    # the budget, at most COUNT_NOISE_AUTO_CAP (0.1 at ε=8, 0.0125 at ε=1: the counts never take a large share)
    count_noise_epsilon: str = COUNT_NOISE_AUTO
    share_exact_metrics: bool = False  # opt in to sending exact statistics outside the guarantee: train loss and
    # accuracy, evaluation loss and, with count-noise-epsilon 0, exact evaluation counts
    min_epsilon_per_round: float = 0.0  # refuse a round that would spend less than this (a round that is noise)
    groups: str = ""  # comma list of the group names this node may name in its evaluation counts (public); rows
    # of any other group are left out of the counts; empty: one group "all" (the group column is the
    # coordinator's choice, and a name taken from the data would be released as it is)
    val_fraction: float = 0.2  # local validation split (on a DP node the run config's value is not used)
    cv_folds: int = 0  # cross-validation folds of this node's data (0 = off); like val-fraction, the node's
    cv_fold: int = 0  # the held-out fold when cv-folds >= 2
    device: str = ""  # override the device the coordinator asks for
    model_dir: str = ""  # local copy of the model directory when the run's model is a path
    # Send the text-cleaning counts to the coordinator. They are exact (not DP) statistics of the private data,
    # so an institution opts in; they are always logged on the node.
    share_cleaning_counts: bool = False

    def __post_init__(self) -> None:
        _check("epsilon", self.epsilon, low=0.0, low_open=True)
        _check("delta", self.delta, low=0.0, high=1.0, low_open=True, high_open=True)
        if self.count_noise_epsilon != COUNT_NOISE_AUTO:
            try:
                per_round = float(self.count_noise_epsilon)
            except ValueError:
                raise ConfigError(ERR_TYPE.format(key="count-noise-epsilon", expected="'auto' or a number >= 0",
                                                  value=self.count_noise_epsilon)) from None
            _check("count-noise-epsilon", per_round, low=0.0)
        _choice("accountant", self.accountant, ACCOUNTANTS)
        _check("min-epsilon-per-round", self.min_epsilon_per_round, low=0.0)
        _check("val-fraction", self.val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
        if self.cv_folds == 1:
            raise ConfigError(ERR_RANGE.format(key="cv-folds", allowed="0 (off) or >= 2", value=1))
        _check("cv-folds", self.cv_folds, low=0)
        _check("cv-fold", self.cv_fold, low=0, high=max(self.cv_folds - 1, 0))
        if self.device and not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(ERR_CHOICE.format(key="device", choices="auto, cpu, cuda, cuda:N", value=self.device))
        if self.key_file and self.passphrase_env:
            raise ConfigError("node config sets both 'key-file' and 'passphrase-env'; set exactly one")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> NodeConfig:
        """Parse a node config; Flower's own keys (``partition-id``, ``num-partitions``) are ignored."""
        kinds = {_flower_key(f.name): f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = str(raw_key)
            if key in ("partition-id", "num-partitions"):
                continue
            if key not in kinds:
                raise ConfigError(ERR_UNKNOWN_KEY.format(key=f"node config {key}", valid=", ".join(sorted(kinds))))
            f = kinds[key]
            kind = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]
            if key == "count-noise-epsilon" and not isinstance(value, str):  # "auto" or a number
                value = str(_coerce(key, value, float))
            kwargs[f.name] = _coerce(key, value, kind)
        return cls(**kwargs)

    @property
    def count_epsilon_per_round(self) -> float:
        """The node's ε for one round's noised evaluation counts (0: none): ``count-noise-epsilon``, or with
        ``auto`` (the default) :data:`COUNT_NOISE_AUTO_SHARE` of the budget, at most :data:`COUNT_NOISE_AUTO_CAP`."""
        if self.count_noise_epsilon == COUNT_NOISE_AUTO:
            return min(COUNT_NOISE_AUTO_CAP, COUNT_NOISE_AUTO_SHARE * self.epsilon)
        return float(self.count_noise_epsilon)

    def to_mapping(self) -> dict[str, Any]:
        return {_flower_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def group_names(self) -> list[str]:
        return [g.strip() for g in self.groups.split(",") if g.strip()]

    def resolved_state_dir(self, fallback_name: str) -> Path:
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        return Path("~/.fedpriv").expanduser() / (self.node_name or fallback_name)
