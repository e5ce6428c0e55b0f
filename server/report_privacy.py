"""The run report's privacy and data sections: per node, what was spent against which budget, and what the
node shared about its data.

Sources, all in the run directory: the server's copies of the nodes' signed ledgers (``ledgers/<node>.jsonl``:
budget, δ, accountant, noise multiplier, ε after every release, noised-count releases, a fixed noise seed),
``metrics.jsonl`` rows (ε per round, refusals with their reason, ``num-examples``, summed validation counts)
and the run config. The figures are the ones the nodes claim in their ledgers; ``fedpriv audit RUN_DIR``
verifies the signatures and recomputes ε with independent accountants.

Nothing here reveals more than the nodes released: ``num-examples`` is public by design; group sizes are shown
only as the sums over nodes the server computes anyway, flagged as noised where the nodes noised them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import RunConfig
from server.htmlreport import md_escape

ACCOUNTANT_NAMES = {"prv": "PRV, Gopi et al. 2021", "rdp": "RDP, Mironov 2017"}


@dataclass
class NodePrivacy:
    """What one node spent in this run, from its ledger copy (preferred) or the metrics rows."""

    node: str
    budget: float | None = None  # ε budget the node enforces (ledger ``budget_epsilon``)
    delta: float | None = None  # δ the ε is stated at
    spent: float | None = None  # cumulative ε after the node's last release of this run (earlier runs included)
    spent_before: float = 0.0  # ε already spent on the same data before this run
    accountant: str | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    trained: list[tuple[int, float]] = field(default_factory=list)  # (round, cumulative ε) per training release
    after_round: dict[int, float] = field(default_factory=dict)  # cumulative ε after each round with a release
    refusals: list[tuple[int, str]] = field(default_factory=list)  # (round, reason)
    count_noise: list[float] = field(default_factory=list)  # ε of each noised evaluation-count release
    fixed_noise_seed: bool = False  # a ledger entry records a noise seed: reproducible noise, no guarantee
    num_examples: int | None = None  # training rows, as sent with every reply (public)

    @property
    def left(self) -> float | None:
        if self.budget is None or self.spent is None:
            return None
        return self.budget - self.spent


def run_id_of(rows: list[dict[str, Any]], run_dir: Path) -> str | None:
    """The run id from the metrics rows, else from ``config.json``."""
    for r in reversed(rows):
        if r.get("run"):
            return str(r["run"])
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        try:
            return json.loads(cfg_path.read_text()).get("fedpriv-run")
        except (OSError, json.JSONDecodeError):
            return None
    return None


def _ledger_entries(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def _float(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def node_privacy(rows: list[dict[str, Any]], ledgers_dir: Path, *, run_id: str | None) -> dict[str, NodePrivacy]:
    """Per node: budget, δ, spent, accountant, noise, refusals and count-noise releases of this run."""
    nodes: dict[str, NodePrivacy] = {}
    for row in rows:
        rnd = int(row.get("round", 0))
        for name, n in (row.get("nodes") or {}).items():
            p = nodes.setdefault(name, NodePrivacy(node=name))
            if isinstance(n.get("num-examples"), int) and n.get("status") != "refused":  # a refusal sends 0
                p.num_examples = n["num-examples"]
            if n.get("status") == "refused":
                p.refusals.append((rnd, str(n.get("reason") or "no reason given")))
            elif _float(n.get("epsilon")) is not None:
                p.trained.append((rnd, float(n["epsilon"])))
                p.spent = float(n["epsilon"])
                p.noise_multiplier = _float(n.get("noise-multiplier")) or p.noise_multiplier
        for ref in row.get("refusals") or []:  # refusals without a per-node row (older rows)
            p = nodes.setdefault(str(ref.get("node")), NodePrivacy(node=str(ref.get("node"))))
            if all(r != rnd for r, _ in p.refusals):
                p.refusals.append((rnd, str(ref.get("reason") or "no reason given")))
    ledger_files = sorted(ledgers_dir.glob("*.jsonl")) if ledgers_dir.is_dir() else []
    for path in ledger_files:
        if path.stem == "server":
            continue
        entries = [e for e in _ledger_entries(path) if run_id is None or e.get("run") == run_id]
        if not entries:
            continue
        name = str(entries[-1].get("node") or path.stem)  # the file name is the node name made file-safe
        p = nodes.setdefault(name, NodePrivacy(node=name))
        first = entries[0]
        cost = first.get("epsilon_round") if first.get("kind") == "dp-sgd" else first.get("epsilon_release")
        if _float(first.get("epsilon")) is not None and _float(cost) is not None:
            p.spent_before = max(0.0, float(first["epsilon"]) - float(cost))
        p.trained = []
        for e in entries:
            if _float(e.get("epsilon")) is not None:
                p.spent = float(e["epsilon"])
                p.after_round[int(e.get("round", 0))] = p.spent
            if _float(e.get("budget_epsilon")) is not None:
                p.budget = float(e["budget_epsilon"])
            if _float(e.get("delta")) is not None:
                p.delta = float(e["delta"])
            if e.get("kind") == "dp-sgd":
                p.trained.append((int(e.get("round", 0)), float(e.get("epsilon", math.nan))))
                p.accountant = str(e.get("accountant") or p.accountant)
                p.noise_multiplier = _float(e.get("noise_multiplier"))
                p.sample_rate = _float(e.get("sample_rate"))
                p.steps = e.get("steps") if isinstance(e.get("steps"), int) else p.steps
                p.fixed_noise_seed = p.fixed_noise_seed or e.get("noise_seed") is not None
            elif e.get("kind") == "count-noise" and _float(e.get("epsilon_release")) is not None:
                p.count_noise.append(float(e["epsilon_release"]))
    return nodes


def epsilon_series(nodes: dict[str, NodePrivacy]) -> dict[str, list[tuple[int, float]]]:
    """(round, cumulative ε) per node for the chart, starting at round 0 with what was spent before this run;
    from the ledger, every release counts (noised evaluation counts too), so the line ends at ε spent."""
    out = {}
    for name, p in nodes.items():
        points = sorted(p.after_round.items()) or p.trained
        if points:
            out[name] = [(0, p.spent_before), *points]
    return out


def _num(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _guarantee(cfg: RunConfig, nodes: dict[str, NodePrivacy]) -> str:
    """The guarantee statement: one paragraph that says what is protected, how, and what is not."""
    with_budget = [p for p in nodes.values() if p.spent is not None]
    deltas = sorted({p.delta for p in with_budget if p.delta is not None})
    worst = max(with_budget, key=lambda p: p.spent or 0.0, default=None)
    accountants = "; ".join(sorted({ACCOUNTANT_NAMES.get(p.accountant or "", p.accountant or "")
                                    for p in nodes.values() if p.accountant}
                                   or {ACCOUNTANT_NAMES.get(cfg.accountant, cfg.accountant)}))
    c = f"{cfg.resolved().clipping_norm:g}"  # the recipe value when the config left it to the recipe (0)
    parts = ["Each institution's training records are protected by record-level (example-level) "
             "(ε, δ)-differential privacy under add/remove-one neighbouring, for that institution's dataset on "
             f"its own: DP-SGD with Poisson sampling, per-example gradient clipping to norm {c} and Gaussian "
             f"noise of standard deviation σ × {c}, accounted by the node's own accountant ({accountants}) "
             "across every release on the same data (earlier runs included) and enforced by the node against "
             "the budget in its own node config."]
    if worst is not None:
        budget = "not recorded" if worst.budget is None else f"{worst.budget:g}"
        at = f" at δ = {', '.join(f'{d:g}' for d in deltas)}" if deltas else ""
        parts.append(f"After this run the largest spend is ε = {_num(worst.spent)} "
                     f"(node {md_escape(worst.node)}, budget {budget}){at}.")
    parts.append("The model updates are covered (post-processing of DP-SGD).")
    noised = sorted(p.node for p in nodes.values() if p.count_noise)
    exact = sorted(p.node for p in nodes.values() if not p.count_noise)
    if noised:
        parts.append(f"Evaluation counts of {', '.join(map(md_escape, noised))} were noised (discrete Laplace) "
                     "and are included in the spend by basic composition.")
    if exact:
        parts.append(f"Evaluation counts of {', '.join(map(md_escape, exact))} were sent exact and are outside "
                     "the guarantee.")
    parts.append("Training-set sizes (num-examples) are public by design and outside the guarantee"
                 + (", as are text-cleaning counts a node chose to share." if cfg.clean else "."))
    fixed = sorted(p.node for p in nodes.values() if p.fixed_noise_seed)
    if fixed or cfg.noise_seed >= 0:
        parts.append(f"This run fixed the noise seed (noise-seed {cfg.noise_seed}"
                     + (f"; recorded in the ledgers of {', '.join(map(md_escape, fixed))}" if fixed else "")
                     + "): its noise is reproducible, so it gives no privacy guarantee (simulations and tests "
                     "only).")
    if cfg.central_dp:
        parts.append("The server also added client-level central DP (a separate guarantee per institution, "
                     "not per record; ledgers/server.jsonl).")
    parts.append("The figures are the nodes' signed ledger claims; fedpriv audit RUN_DIR verifies the ledgers "
                 "and recomputes ε with independent accountants.")
    return " ".join(parts)


def privacy_md(cfg: RunConfig, nodes: dict[str, NodePrivacy], *, chart: str | None) -> list[str]:
    """The ``## Privacy`` section: guarantee paragraph, per-node table, refusals, the ε chart."""
    out = ["## Privacy", ""]
    if not cfg.dp:
        return out + ["Differential privacy was **off** for this run (`--no-dp`): the nodes' records have no "
                      "privacy guarantee, and every update, count and metric is exact.", ""]
    out += [_guarantee(cfg, nodes), ""]
    if nodes:
        out += ["| node | budget ε | δ | ε spent | ε left | accountant | noise σ | rate q × steps "
                "| rounds trained | rounds refused | noised counts |",
                "|---" * 11 + "|"]
        for name, p in sorted(nodes.items()):
            left = _num(p.left) + (" (over budget)" if p.left is not None and p.left < 0 else "")
            sampling = f"{p.sample_rate:.4g} × {p.steps}" if p.sample_rate is not None and p.steps else "—"
            counts = (f"{len(p.count_noise)} × ε {p.count_noise[-1]:g}" if p.count_noise else "none")
            delta = "—" if p.delta is None else f"{p.delta:g}"
            out.append(f"| {md_escape(name)} | {_num(p.budget, 2)} | {delta} "
                       f"| {_num(p.spent)} | {left} | {(p.accountant or '—').upper()} "
                       f"| {_num(p.noise_multiplier)} | {sampling} | {len(p.trained)} | {len(p.refusals)} "
                       f"| {counts} |")
        out += ["", "ε spent is cumulative at the node's δ and includes "
                + ("ε spent before this run on the same data (" + ", ".join(
                    f"{md_escape(n)} {_num(p.spent_before)}" for n, p in sorted(nodes.items()) if p.spent_before)
                   + ")." if any(p.spent_before for p in nodes.values()) else "nothing from earlier runs (none "
                   "recorded)."), ""]
    refusals = sorted((r, name, why) for name, p in nodes.items() for r, why in p.refusals)
    out += ["### Refusals", ""]
    if refusals:
        out += ["A node refuses a round when training would exceed its budget or its settings do not hold; the "
                "run continues without it.", "", "| round | node | reason |", "|---|---|---|"]
        out += [f"| {r} | {md_escape(name)} | {md_escape(why)} |" for r, name, why in refusals]
    else:
        out += ["No node refused a round."]
    out.append("")
    if chart:
        out += [f"![ε spent per node against its budget]({chart})", "",
                "Solid: ε spent after each round, every release counted (round 0: spent before this run); "
                "dashed: the node's budget in the same colour; a cross marks a refused round.", ""]
    return out


def data_md(cfg: RunConfig, rows: list[dict[str, Any]], nodes: dict[str, NodePrivacy],
            cleaning: dict[str, Any]) -> list[str]:
    """The ``## Data`` section: rows per node and groups, as far as the nodes shared them, and the eval set."""
    last = rows[-1] if rows else {}
    out = ["## Data", "",
           "Only what the nodes released is shown: training-set sizes (num-examples, sent with every reply, "
           "public by design) and, for groups, the validation counts summed over nodes that the server "
           "computes for the fairness metrics; no node's own group sizes are shown.", ""]
    shared_cleaning = cleaning.get("nodes") or {}
    if nodes:
        out += ["| node | training rows (public) | evaluation counts sent | text-cleaning counts |",
                "|---|---|---|---|"]
        for name, p in sorted(nodes.items()):
            if p.count_noise:
                counts = f"noised (ε {p.count_noise[-1]:g} per round, in its ledger)"
            else:
                counts = "exact (outside the DP guarantee)"
            if name in shared_cleaning:
                c = shared_cleaning[name]
                clean = f"shared: rows {c.get('rows_in')} → {c.get('rows_out')}"
            else:
                clean = "not shared" if cfg.clean else "no cleaning"
            rows_n = "—" if p.num_examples is None else str(p.num_examples)
            out.append(f"| {md_escape(name)} | {rows_n} | {counts} | {clean} |")
        out.append("")
    noised = any(p.count_noise for p in nodes.values())
    groups = (last.get("fairness") or {}).get("groups") or {}
    total = last.get("num_examples_val")
    out += ["### Validation groups (last round, summed over nodes)", ""]
    if groups:
        label = "rows (noised counts)" if noised else "rows"
        out += [f"Federated validation: {total if total is not None else '—'} rows in all"
                + (" (public num-examples)." if total is not None else "."), "",
                f"| group | {label} | below min-group-size {cfg.min_group_size} |", "|---|---|---|"]
        out += [f"| {md_escape(g)} | {m.get('n')} | {'yes' if m.get('small_group') else ''} |"
                for g, m in sorted(groups.items())]
    else:
        out += ["No per-group validation counts in the last round."]
    out += ["", "### Server-held evaluation set", ""]
    if cfg.eval_data:
        ev = last.get("eval_classification") or {}
        out += [f"File {md_escape(Path(cfg.eval_data).name)}, held by the coordinator and evaluated centrally "
                f"every round (not any node's data, not covered by any node's guarantee): "
                f"{ev.get('num_examples', '—')} rows.", ""]
        eg = (last.get("eval_fairness") or {}).get("groups") or {}
        if eg:
            out += ["| group | rows | below min-group-size |", "|---|---|---|"]
            out += [f"| {md_escape(g)} | {m.get('n')} | {'yes' if m.get('small_group') else ''} |"
                    for g, m in sorted(eg.items())]
            out.append("")
    else:
        out += ["None (no --eval-data): every metric comes from the nodes' validation splits.", ""]
    return out
