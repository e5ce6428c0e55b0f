"""The node's budget: what it has spent, read from its signed ledger, and what it may spend next.

One budget per node. The budget (ε, δ) and the accountant come from the institution's node config; the run
config can only ask for *less* (a smaller ε cap), never more. What the node has spent is recomputed on every
load from its own signed ledger (``state_dir/ledger.jsonl``): every release it ever made from this state
directory counts, whatever the run, the accountant, the order of the labels or the rows added since. Nothing
else holds the spend, so no file can be deleted or re-keyed to reset it. A ledger that does not verify
(edited, cut at its tail, head file missing) makes the node refuse to train or release anything.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.node import NodeData
from client.replay import ReplayStore
from client.train import planned_dp_steps
from common.config import NodeConfig, RunConfig
from common.fsutil import atomic_write_json
from common.ledger import Ledger, LedgerError, load_or_create_node_key
from common.privacy import CountRelease, DpSgdRelease, calibrate_noise_multiplier, check_budget, total_epsilon

REFUSE_DELTA = (
    "refusing to train: delta={delta:g} is not below 1/n={inv:.3g} for this node's n={n} training examples; "
    "a δ that large allows releasing individual records. Set a smaller delta in the node config"
)
REFUSE_LEDGER = ("refusing to release anything: this node's ledger {file} does not verify ({problem}); "
                 "the spend it records cannot be trusted. Check it with `fedpriv ledger verify {file} --pubkey "
                 "{pub}` and restore it from a backup")
REFUSE_RELEASED = ("refusing to train: round {round} of run {run} was already released (ledger entry {index}) and "
                   "its stored update is no longer kept; training it again would be a second release of the same "
                   "round")
REFUSE_SPENT = "refusing to train: the privacy spent so far cannot be computed ({reason})"
REFUSE_COST = "refusing to train: the privacy cost cannot be computed ({reason})"
REFUSE_MIN_ROUND = ("refusing to train: this round would spend only ε={eps:.4g} < min-epsilon-per-round "
                    "{floor:g} (noise multiplier {sigma:.3g}): what is left of the budget makes the update "
                    "mostly noise")
# A round whose update is mostly noise: the noise norm on the averaged gradient, σ·C·sqrt(d)/B, is this many
# times the largest possible signal norm C. Reported to the coordinator as a warning, never silently.
NOISY_ROUND_RATIO = 10.0
WARN_NOISY = ("noise multiplier {sigma:.3g} at expected batch {batch:.0f} over {dim} trainable weights: the "
              "noise on each averaged gradient is about {ratio:.0f}x the largest possible signal; this round "
              "is mostly noise (ε left {left:.3g} of {budget:g})")


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
    num_examples: int
    batch_size: int
    epochs: int


class NodePrivacy:
    """The node's budget, spend and signed ledger, all in its state directory.

    Parameters
    ----------
    node : NodeConfig
        The institution's settings: budget ε, δ, accountant, count-noise ε, opt-ins.
    cfg : RunConfig
        The coordinator's run config; only ``epsilon`` (a smaller cap), ``batch-size``, ``local-epochs`` and
        ``clipping-norm`` are used here, each either accounted or capped.
    """

    def __init__(self, node: NodeConfig, cfg: RunConfig, *, name: str, data: NodeData) -> None:
        self.node = node
        self.cfg = cfg
        self.name = name
        self.data = data
        self.state_dir = node.resolved_state_dir(name)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The node's budget is the cap; the server may ask for less, never for more.
        self.budget = min(node.epsilon, cfg.epsilon) if cfg.epsilon > 0 else node.epsilon
        self.delta = node.delta
        self.accountant = node.accountant
        self.key = load_or_create_node_key(self.state_dir)
        self.ledger = Ledger(self.state_dir / "ledger.jsonl", self.key)
        self.replay = ReplayStore(self.state_dir)
        self.dataset_id = keyed_fingerprint(self.key, data.fingerprint)
        self.problem: str | None = None  # set when the ledger does not verify: the node then releases nothing
        self._head = ""  # the ledger head the spend was read at; appends require it unchanged
        self._entries: list[dict[str, Any]] = []
        self.history: list[DpSgdRelease] = []
        self.count_releases: list[CountRelease] = []
        self._load_spend()

    # ---- the spend, from the verified ledger
    def _load_spend(self) -> None:
        res = self.ledger.verify()
        if not res.ok:
            self.problem = REFUSE_LEDGER.format(file=self.ledger.path, problem=res.problems[0],
                                                pub=self.public_key_path)
            return
        self._head = res.head
        self._entries = res.entries
        for e in res.entries:
            if e.get("kind") == "dp-sgd":
                self.history.append(DpSgdRelease(float(e["noise_multiplier"]), float(e["sample_rate"]),
                                                 int(e["steps"])))
            elif e.get("kind") == "count-noise":
                self.count_releases.append(CountRelease(float(e["epsilon_release"]), str(e.get("mechanism", ""))))

    def _epsilon(self, history: list[DpSgdRelease], counts: list[CountRelease]) -> float:
        return total_epsilon(history, counts, delta=self.delta, accountant=self.accountant)

    def epsilon(self) -> float:
        """Total ε spent at the node's δ over its whole ledger (NaN when the ledger does not verify)."""
        if self.problem is not None:
            return math.nan
        return self._epsilon(self.history, self.count_releases)

    @property
    def public_key_path(self) -> Path:
        return self.state_dir / "node_ed25519.pub"

    def _run_file(self, run: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in run)
        return self.state_dir / f"run-{safe}.json"

    def count_reserve(self, rounds: int) -> float:
        """ε kept back for ``rounds`` evaluations with noised counts (0 when counts are exact or withheld)."""
        eps = self.count_epsilon()
        return eps * rounds if eps > 0 else 0.0

    def count_epsilon(self) -> float:
        """ε of this node's noised evaluation counts per round: the node's, or less noise never, more on request.

        0 means no noise: exact counts when the node opted in (``share-exact-metrics``), else counts withheld.
        """
        node_eps, asked = self.node.count_epsilon_per_round, self.cfg.count_noise_epsilon
        if node_eps > 0:
            return min(node_eps, asked) if asked > 0 else node_eps
        if self.node.share_exact_metrics and asked > 0:  # exact allowed, the coordinator asks for noise
            return asked
        return 0.0

    # ---- training
    def plan(self, *, run: str, server_round: int, planned_rounds: int) -> tuple[DpPlan | None, str | None]:
        """Decide this round's noise multiplier; return (plan, None) or (None, refusal reason)."""
        if self.problem is not None:
            return None, self.problem
        done = next((e for e in self._entries if e.get("kind") == "dp-sgd" and e.get("run") == run
                     and e.get("round") == server_round), None)
        if done is not None:  # a replay the store could not answer (:meth:`released` is asked first)
            return None, REFUSE_RELEASED.format(round=server_round, run=run, index=done.get("index"))
        n = len(self.data.train)
        if self.delta >= 1.0 / max(n, 1):
            return None, REFUSE_DELTA.format(delta=self.delta, inv=1.0 / max(n, 1), n=n)
        q, steps = planned_dp_steps(n, batch_size=self.cfg.batch_size, epochs=self.cfg.local_epochs)
        try:
            spent = self.epsilon()
        except ValueError as exc:
            return None, REFUSE_SPENT.format(reason=exc)
        remaining_rounds = max(planned_rounds - server_round + 1, 1)
        run_file = self._run_file(run)
        plan_rec = json.loads(run_file.read_text()) if run_file.exists() else None
        if plan_rec is not None and plan_rec.get("sample_rate") == q and plan_rec.get("steps_per_round") == steps:
            sigma = float(plan_rec["noise_multiplier"])
        else:
            # Calibrate once per run so that every planned round, and the noised evaluation counts of each, fit
            # in what is left of the budget.
            target = self.budget - self.count_reserve(remaining_rounds)
            try:
                if not target > 0:
                    raise ValueError(f"the budget {self.budget:g} is taken by the evaluation counts "
                                     f"({self.count_epsilon():g} per round for {remaining_rounds} rounds)")
                sigma = calibrate_noise_multiplier(
                    target_epsilon=target,
                    delta=self.delta,
                    sample_rate=q,
                    steps=steps * remaining_rounds,
                    accountant=self.accountant,
                    prior_history=tuple(self.history),
                    prior_pure_epsilon=math.fsum(c.epsilon for c in self.count_releases),
                )
            except ValueError as exc:
                return None, f"refusing to train: {exc}"
            atomic_write_json(run_file, {"noise_multiplier": sigma, "sample_rate": q, "steps_per_round": steps,
                                         "planned_rounds": planned_rounds, "first_round": server_round})
        release = DpSgdRelease(noise_multiplier=sigma, sample_rate=q, steps=steps)
        try:
            after = self._epsilon([*self.history, release], self.count_releases)
        except ValueError as exc:  # an accountant that cannot evaluate these parameters: refuse, never guess
            return None, REFUSE_COST.format(reason=exc)
        reason = check_budget(spent=spent, cost_after=after, budget=self.budget, delta=self.delta)
        if reason is not None:
            return None, reason
        if after - spent < self.node.min_epsilon_per_round:
            return None, REFUSE_MIN_ROUND.format(eps=after - spent, floor=self.node.min_epsilon_per_round,
                                                 sigma=sigma)
        return DpPlan(noise_multiplier=sigma, sample_rate=q, steps=steps, epsilon_before=spent,
                      epsilon_after=after, budget=self.budget, delta=self.delta, accountant=self.accountant,
                      num_examples=n, batch_size=self.cfg.batch_size, epochs=self.cfg.local_epochs), None

    def noisy_round_warning(self, plan: DpPlan, *, trainable_weights: int) -> str | None:
        """A warning for the coordinator when this round's update will be mostly noise, else None."""
        batch = plan.sample_rate * plan.num_examples
        ratio = plan.noise_multiplier * math.sqrt(max(trainable_weights, 1)) / max(batch, 1.0)
        if ratio < NOISY_ROUND_RATIO:
            return None
        return WARN_NOISY.format(sigma=plan.noise_multiplier, batch=batch, dim=trainable_weights, ratio=ratio,
                                 left=max(plan.budget - plan.epsilon_after, 0.0), budget=plan.budget)

    def commit(self, plan: DpPlan, *, run: str, server_round: int, noise_seed: int | None,
               steps_executed: int) -> dict[str, Any]:
        """Record the release in the signed ledger (the node's only record of its spend); return the entry.

        ``steps_executed`` is what the training loop ran; the accounted ``steps`` are the larger of it and the
        plan, so an over-run is never under-accounted, and the audit compares the two.
        """
        steps = max(plan.steps, int(steps_executed))
        release = DpSgdRelease(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=steps)
        eps = self._epsilon([*self.history, release], self.count_releases)
        entry = self.ledger.append({
            "schema": 1,
            "kind": "dp-sgd",
            "run": run,
            "round": server_round,
            "node": self.name,
            "dataset": self.dataset_id,
            "accountant": plan.accountant,
            "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate,
            "steps": steps,
            "steps_executed": int(steps_executed),
            "num_examples": plan.num_examples,
            "batch_size": plan.batch_size,
            "epochs": plan.epochs,
            "clipping_norm": self.cfg.clipping_norm,
            "epsilon": eps,
            "epsilon_round": eps - plan.epsilon_before,
            "budget_epsilon": plan.budget,
            "noise_seed": noise_seed,
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }, if_head=self._head)
        self._head = entry["hash"]
        self.history.append(release)
        return entry

    # ---- idempotent rounds: a resumed server may ask again for a round this node already released.
    def save_release(self, *, run: str, server_round: int, arrays: dict[str, np.ndarray], metrics: dict[str, Any],
                     entry: dict[str, Any]) -> None:
        """Keep this round's released update so that a repeated request re-sends it instead of training again
        (re-training would be a second release of the same round and spend ε twice)."""
        self.replay.save(run=run, server_round=server_round, arrays=arrays, metrics=metrics, entry=entry)

    def released(self, *, run: str, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]] | None:
        """The update already released for (run, round), if this node has one and its ledger records it."""
        if self.problem is not None:
            return None
        try:
            hashes = [e.get("hash") for e in self.ledger.entries()]
        except LedgerError:
            return None
        return self.replay.load(run=run, server_round=server_round, ledger_hashes=hashes)

    # ---- noised evaluation counts
    def count_noise_refusal(self, epsilon: float) -> str | None:
        """None when a count release of ``epsilon`` fits the budget, else why not."""
        if self.problem is not None:
            return self.problem
        spent = self.epsilon()
        after = self._epsilon(self.history, [*self.count_releases, CountRelease(epsilon)])
        return check_budget(spent=spent, cost_after=after, budget=self.budget, delta=self.delta)

    def record_count_noise(self, *, run: str, server_round: int, epsilon: float,
                           noise_seed: int | None = None) -> dict[str, Any]:
        """Account a noised-count release (pure ε, basic composition) and write its ledger entry."""
        release = CountRelease(epsilon, "discrete-laplace")
        total = self._epsilon(self.history, [*self.count_releases, release])
        entry = self.ledger.append({
            "schema": 1,
            "kind": "count-noise",
            "run": run,
            "round": server_round,
            "node": self.name,
            "dataset": self.dataset_id,
            "mechanism": "discrete-laplace",
            "noise_seed": noise_seed,
            "epsilon_release": epsilon,
            "epsilon": total,
            "accountant": self.accountant,
            "delta": self.delta,
            "budget_epsilon": self.budget,
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }, if_head=self._head)
        self._head = entry["hash"]
        self.count_releases.append(release)
        return entry


def keyed_fingerprint(signing_key, fingerprint: str) -> str:
    """The dataset's identity as the ledger records it: HMAC-SHA256 of its content hash under a key only this
    node holds (derived from its signing key). It changes when the data changes, so the audit still sees data
    that changed mid-run; a plain hash would let anyone who knows all records but one test candidates for the
    last one offline."""
    from cryptography.hazmat.primitives import serialization

    raw = signing_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
    secret = hmac.new(raw, b"fedpriv dataset fingerprint key", hashlib.sha256).digest()
    return hmac.new(secret, fingerprint.encode("ascii"), hashlib.sha256).hexdigest()


def finite(x: float) -> float:
    return x if math.isfinite(x) else float("nan")


def count_dict_to_json(cms: dict[str, np.ndarray], labels: list[str]) -> str:
    return json.dumps({"labels": labels, "groups": {g: np.asarray(m).tolist() for g, m in sorted(cms.items())}})
