"""Model selection and early stopping on the server.

After every round the server reads one metric from the round's row in ``metrics.jsonl`` (``auto``:
``eval_accuracy`` when a server-held evaluation set is given, else the federated validation ``accuracy``; any
numeric key such as ``macro_f1``, ``eval_macro_f1`` or ``loss`` works; keys ending in ``loss`` are minimised).
A round improves when its value beats the best so far by more than ``min_delta``. A round that failed or has
no value for the metric does not improve. After ``patience`` rounds in a row without improvement the run
stops: no more training rounds are sent, so under DP no node spends more ε, and the ledgers end there.

The state is a small dict saved in every checkpoint, so a resumed run keeps its best round, its count of
rounds without improvement and, once stopped, stays stopped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from common.config import SELECTION_METRICS as METRICS


def resolve_metric(name: str, *, has_eval_data: bool) -> str:
    """The metric key to select on; a name that no round would carry is an error now, not a silent stop later."""
    if name == "auto":
        return "eval_accuracy" if has_eval_data else "accuracy"
    if name not in METRICS:
        raise ValueError(f"config key 'early-stopping-metric' must be auto or one of {', '.join(METRICS)}, "
                         f"got {name!r}")
    if name.startswith("eval_") and not has_eval_data:
        raise ValueError(f"early-stopping-metric {name!r} needs a server-held evaluation set (eval-data)")
    return name


@dataclass
class Selection:
    metric: str
    patience: int = 0  # 0: select the best round, never stop early
    min_delta: float = 0.0
    best_round: int = 0
    best_value: float | None = None
    bad_rounds: int = 0
    stopped: str = ""  # why the run stopped early ("" while it runs)

    @property
    def mode(self) -> str:
        return "min" if self.metric.endswith("loss") else "max"

    def _better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        if self.mode == "max":
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def update(self, rnd: int, row: dict[str, Any]) -> tuple[bool, bool]:
        """Account for round ``rnd``'s row; return (this round is the new best, stop now)."""
        value = row.get(self.metric)
        usable = (row.get("status", "ok") == "ok" and isinstance(value, int | float) and not isinstance(value, bool)
                  and math.isfinite(float(value)))
        improved = bool(usable and self._better(float(value)))
        if improved:
            self.best_round, self.best_value, self.bad_rounds = rnd, float(value), 0
        else:
            self.bad_rounds += 1
        stop = bool(self.patience) and self.bad_rounds >= self.patience
        if stop:
            best = "none" if self.best_value is None else f"{self.best_value:.4f} at round {self.best_round}"
            self.stopped = (f"early stopping after round {rnd}: {self.metric} did not improve by more than "
                            f"{self.min_delta:g} for {self.bad_rounds} round(s) (patience {self.patience}); "
                            f"best {best}")
        return improved, stop

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, *, metric: str, patience: int,
                   min_delta: float) -> Selection:
        """Restore a checkpointed state; settings come from the (possibly changed) run config."""
        sel = cls(metric=metric, patience=patience, min_delta=min_delta)
        if not state:
            return sel
        # A stopped run stays stopped whatever the new settings: restarting it must not spend more ε.
        sel.stopped = str(state.get("stopped", ""))
        if state.get("metric") == metric:
            sel.best_round = int(state.get("best_round", 0))
            sel.best_value = state.get("best_value")
            sel.bad_rounds = int(state.get("bad_rounds", 0))
        return sel
