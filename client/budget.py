"""The node's budget: its persistent accountant and signed ledger, both in its state directory.

The node's budget (ε, δ) comes from its node config; the server's run config can only ask for less.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.accountant import NodeAccountant
from client.node import NodeData
from client.replay import ReplayStore
from client.train import planned_dp_steps
from common.config import NodeConfig, RunConfig
from common.fsutil import atomic_write_json
from common.ledger import Ledger, load_or_create_node_key
from common.privacy import CountRelease, DpSgdRelease, calibrate_noise_multiplier, check_budget

REFUSE_DELTA = (
    "refusing to train: delta={delta:g} is not below 1/n={inv:.3g} for this node's n={n} training examples; "
    "a δ that large allows releasing individual records. Set a smaller delta in the node config"
)


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
        self.replay = ReplayStore(self.state_dir)

    @property
    def public_key_path(self) -> Path:
        return self.state_dir / "node_ed25519.pub"

    def _run_file(self, run: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in run)
        return self.state_dir / f"run-{safe}.json"

    def plan(self, *, run: str, server_round: int, planned_rounds: int) -> tuple[DpPlan | None, str | None]:
        """Decide this round's noise multiplier; return (plan, None) or (None, refusal reason)."""

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
            atomic_write_json(run_file, {"noise_multiplier": sigma, "sample_rate": q, "steps_per_round": steps,
                                         "planned_rounds": planned_rounds, "first_round": server_round})
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
    def save_release(self, *, run: str, server_round: int, arrays: dict[str, np.ndarray], metrics: dict[str, Any],
                     entry: dict[str, Any]) -> None:
        """Keep this round's released update so that a repeated request re-sends it instead of training again
        (re-training would be a second release of the same round and spend ε twice)."""
        self.replay.save(run=run, server_round=server_round, arrays=arrays, metrics=metrics, entry=entry)

    def released(self, *, run: str, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]] | None:
        """The update already released for (run, round), if this node has one and its ledger records it."""
        return self.replay.load(run=run, server_round=server_round,
                                ledger_hashes=(e.get("hash") for e in self.ledger.entries()))

    def count_noise_refusal(self, epsilon: float) -> str | None:
        """None when a count release of ``epsilon`` fits the budget, else why not."""

        spent = self.accountant.epsilon()
        return check_budget(spent=spent, cost_after=self.accountant.epsilon_if(CountRelease(epsilon)),
                            budget=self.budget, delta=self.delta)

    def record_count_noise(self, *, run: str, server_round: int, epsilon: float) -> dict[str, Any]:
        """Account a noised-count release (pure ε, basic composition) and write its ledger entry."""


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
