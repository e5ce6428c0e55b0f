"""Audit a run directory's privacy spending without trusting the platform.

What is checked (each failure names the check and the ledger entry behind it):

1. ``signature``/``chain``: every ledger (``RUN_DIR/ledgers/<node>.jsonl``) verifies: canonical lines, SHA-256
   chain, contiguous indexes, Ed25519 signatures under the node's public key (``--pubkeys DIR`` holding
   ``<node>.pub`` as obtained from each institution; otherwise the copies in ``RUN_DIR/ledgers``, which only
   proves internal consistency).
2. ``copies``: where the node's own ledger is available (``--node-ledgers DIR/<node>.jsonl``, or a simulation's
   ``RUN_DIR/nodes/*/state/ledger.jsonl``), the server's copy holds exactly the node's entries for this run.
3. ``rounds``: this run's training entries have strictly increasing rounds without duplicates, and agree with
   ``metrics.jsonl``: an entry for every round the node trained in, no entry for a round it did not.
4. ``parameters``: noise multiplier, sample rate, steps, clipping norm, δ, accountant and the dataset
   fingerprint stay fixed within a run (a changed fingerprint means the node's data changed mid-run).
5. ``mechanism``: what the node ran matches what it accounted: no fixed noise seed (a release whose noise
   seed is known carries no guarantee), the sample rate q equals 1/ceil(n/B) for the recorded
   ``num_examples`` n (and the ``num-examples`` the node reported in ``metrics.jsonl``) and ``batch_size`` B,
   and the steps executed equal the steps accounted.
6. ``epsilon``: ε is recomputed from the recorded mechanism parameters alone, with accountants that share no
   code with the training path: Opacus RDP and PRV, and Google's dp-accounting PLD (and RDP). A claimed ε below
   the recomputed value of its own accountant (beyond ``NUMERIC_TOLERANCE``, float noise) fails.
7. ``budget``: with zero slack, the claimed ε and the dp-accounting PLD recomputation (the recomputation held
   to the budget: :data:`HELD_TO_BUDGET`) stay within the node's recorded budget (``budget_epsilon``).
8. ``coverage``: the recomputation covers the node's whole ledger from its first entry; a server copy that
   starts later (the node took part in earlier runs) without the node's own ledger fails, since the spend of
   the earlier entries is not in view. The report says which entries and runs it covered.

Composition rule: DP-SGD releases compose through the accountants; pure-ε releases (noised evaluation counts)
add by basic composition; the server's client-level central DP (``ledgers/server.jsonl``) is a separate
guarantee (per institution, not per record) recomputed with dp-accounting RDP.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.accounting import recompute_epsilon as independent
from common.ledger import load_public_key, verify_ledger
from server.htmlreport import markdown_to_html, md_escape

NUMERIC_TOLERANCE = 1e-6  # relative: a claim may differ from the same accountant's recomputation by float noise
HELD_TO_BUDGET = "dp_accounting_pld"  # the independent recomputation every node's budget is held to
TRAINING_KINDS = ("dp-sgd",)
FIXED_PER_RUN = ("noise_multiplier", "sample_rate", "steps", "clipping_norm", "delta", "accountant", "dataset")


@dataclass
class Finding:
    check: str
    node: str
    message: str
    entry: int | None = None
    ok: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "node": self.node, "entry": self.entry, "ok": self.ok, "message": self.message}

    def __str__(self) -> str:
        where = f"{self.node}" + (f" entry {self.entry}" if self.entry is not None else "")
        return f"[{'ok' if self.ok else 'FAIL'}] {self.check}: {where}: {self.message}"


@dataclass
class AuditReport:
    run_dir: str
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "passed": self.passed, "held_to_budget": HELD_TO_BUDGET,
                "numeric_tolerance": NUMERIC_TOLERANCE, "nodes": self.nodes,
                "failures": [f.to_dict() for f in self.failures], "checks": [f.to_dict() for f in self.findings]}


# --------------------------------------------------------------------------------------------- recompute


def recompute_epsilon(history: list[tuple[float, float, int]], *, delta: float) -> dict[str, float]:
    """ε by Opacus RDP/PRV and dp-accounting PLD/RDP (``audit.accounting``, not the training path)."""
    import logging


    logging.getLogger("absl").setLevel(logging.ERROR)
    return independent(history, delta=delta)


def recompute_central(noise_multipliers: list[float], *, delta: float) -> float:
    """Client-level central DP without subsampling credit: composed Gaussian mechanisms (dp-accounting RDP)."""
    import dp_accounting as dpa
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant()
    for s in noise_multipliers:
        acc.compose(dpa.GaussianDpEvent(s))
    return float(acc.get_epsilon(delta))


# --------------------------------------------------------------------------------------------- audit


def _load_entries(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _node_copy(run_dir: Path, node: str, node_ledgers: Path | None) -> Path | None:
    if node_ledgers is not None:
        p = node_ledgers / f"{node}.jsonl"
        return p if p.exists() else None
    p = run_dir / "nodes" / node / "state" / "ledger.jsonl"
    return p if p.exists() else None


def _claimed_key(accountant: str) -> str:
    return {"prv": "opacus_prv", "rdp": "opacus_rdp"}.get(accountant, "dp_accounting_pld")


@dataclass
class _RunFacts:
    """What ``metrics.jsonl`` and ``config.json`` say about the run (the coordinator's side)."""

    run_id: str | None
    dp: bool
    batch_size: int | None
    rounds: set[int]
    trained: dict[str, set[int]]  # node -> rounds it trained in
    claimed: dict[tuple[str, int], float]  # (node, round) -> ε reported with the update
    num_examples: dict[tuple[str, int], int]  # (node, round) -> num-examples reported with the update


def _run_facts(run_dir: Path) -> _RunFacts:
    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    metrics = []
    if (run_dir / "metrics.jsonl").exists():
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    facts = _RunFacts(run_id=cfg.get("fedpriv-run"), dp=bool(cfg.get("dp", True)),
                      batch_size=cfg.get("batch-size"), rounds={int(r["round"]) for r in metrics},
                      trained={}, claimed={}, num_examples={})
    for row in metrics:
        for node, n in (row.get("nodes") or {}).items():
            if n.get("status") in ("ok", "rejected") and "epsilon" in n:
                key = (node, int(row["round"]))
                facts.trained.setdefault(node, set()).add(int(row["round"]))
                facts.claimed[key] = float(n["epsilon"])
                if isinstance(n.get("num-examples"), int):
                    facts.num_examples[key] = int(n["num-examples"])
    return facts


def audit_run(run_dir: str | Path, *, pubkeys: str | Path | None = None,
              node_ledgers: str | Path | None = None) -> AuditReport:
    """Audit ``run_dir``; every check of the module docstring, per node, in one report."""
    run_dir = Path(run_dir)
    rep = AuditReport(run_dir=str(run_dir))
    ledgers_dir = run_dir / "ledgers"
    facts = _run_facts(run_dir)
    ledger_files = sorted(p for p in ledgers_dir.glob("*.jsonl") if p.stem != "server") if ledgers_dir.exists() else []
    if facts.dp and not ledger_files and facts.rounds:
        rep.findings.append(Finding("ledgers", "-", "DP was on but RUN_DIR/ledgers holds no node ledger"))
    if ledger_files and not facts.run_id:
        rep.findings.append(Finding("run", "-", "config.json names no fedpriv run (fedpriv-run): the ledgers cannot "
                                                "be matched to this run"))
    if ledger_files and not (run_dir / "metrics.jsonl").exists():
        rep.findings.append(Finding("run", "-", "metrics.jsonl is missing although the run has ledgers: the rounds "
                                                "and what nodes reported cannot be checked"))
    for node in sorted(set(facts.trained) - {p.stem for p in ledger_files}):
        rep.findings.append(Finding("ledgers", node, f"metrics.jsonl shows {node} training in rounds "
                                                     f"{sorted(facts.trained[node])} but RUN_DIR/ledgers/{node}.jsonl "
                                                     "is missing: its spend cannot be checked"))
    for led in ledger_files:
        _audit_node(rep, led, facts, run_dir=run_dir, pubkeys=pubkeys, node_ledgers=node_ledgers)
    _audit_server(rep, ledgers_dir, pubkeys)
    return rep


def _audit_node(rep: AuditReport, led: Path, facts: _RunFacts, *, run_dir: Path, pubkeys, node_ledgers) -> None:
    node = led.stem
    ledgers_dir = led.parent
    key_path = Path(pubkeys) / f"{node}.pub" if pubkeys else ledgers_dir / f"{node}.pub"
    if not key_path.exists():
        rep.findings.append(Finding("signature", node, f"no public key at {key_path}"))
        return
    public_key = load_public_key(key_path)
    # The server copy holds the entries of the runs it saw: a segment of the node's chain that may start
    # after entry 0 when the node took part in earlier runs; the node's own copy is checked from entry 0.
    res = verify_ledger(led, public_key, segment=True)
    for p in res.problems:
        rep.findings.append(Finding("chain", node, p.message, entry=p.index))
    if res.ok:
        rep.findings.append(Finding("chain", node, f"{len(res.entries)} entries verify under {key_path.name}", ok=True))
    entries = res.entries
    accounting = _compare_copies(rep, node, entries, facts.run_id,
                                 _node_copy(run_dir, node, Path(node_ledgers) if node_ledgers else None), public_key)
    train = [e for e in entries if e.get("kind") in TRAINING_KINDS]
    this_run = [e for e in train if e.get("run") == facts.run_id] if facts.run_id else train
    if entries and facts.run_id and not any(e.get("run") == facts.run_id for e in entries):
        rep.findings.append(Finding("run", node, f"no entry of this ledger belongs to the run config.json names "
                                                 f"({facts.run_id}): the run directory does not match its ledgers"))
    _check_rounds(rep, node, this_run, facts)
    _check_parameters(rep, node, this_run)
    # what ran is checked on every release accounted, earlier runs included
    _check_mechanism(rep, node, [e for e in accounting if e.get("kind") in (*TRAINING_KINDS, "count-noise")],
                     facts)
    _check_coverage(rep, node, accounting)
    per_entry, last = _recompute(rep, node, accounting)
    rep.nodes[node] = {"entries": len(entries), "entries_this_run": len(this_run),
                       "accounted_count": len(accounting),
                       "accounted_entries": [accounting[0].get("index"), accounting[-1].get("index")] if accounting
                       else None,
                       "accounted_runs": sorted({str(e.get("run")) for e in accounting if e.get("run") is not None}),
                       "held_to_budget": HELD_TO_BUDGET,
                       "claimed_final": per_entry[-1]["claimed"] if per_entry else None,
                       "recomputed_final": last, "budget": per_entry[-1]["budget"] if per_entry else None,
                       "per_entry": per_entry}


def _compare_copies(rep: AuditReport, node: str, entries: list[dict[str, Any]], run_id: str | None,
                    own: Path | None, public_key) -> list[dict[str, Any]]:
    """Check the server copy against the node's own ledger; return the entries to account (the node's own
    whole ledger when it verifies, else the server copy)."""
    if own is None:
        return entries
    own_res = verify_ledger(own, public_key)
    for p in own_res.problems:
        rep.findings.append(Finding("copies", node, f"node's own ledger: {p.message}", entry=p.index))
    mine = [e["hash"] for e in own_res.entries if e.get("run") == run_id]
    theirs = [e.get("hash") for e in entries if e.get("run") == run_id]
    if mine != theirs:
        extra = [i for i, h in enumerate(theirs) if h not in mine]
        missing = [i for i, h in enumerate(mine) if h not in theirs]
        rep.findings.append(Finding("copies", node, f"server copy and node copy differ for this run: {len(missing)} "
                                                    f"missing, {len(extra)} extra entries (extra entries in the "
                                                    "server copy mean the node's ledger was cut)",
                                    entry=(extra or missing or [None])[0]))
    else:
        rep.findings.append(Finding("copies", node, f"server copy equals the node's {len(mine)} entries", ok=True))
    return own_res.entries if own_res.ok else entries


def _check_rounds(rep: AuditReport, node: str, this_run: list[dict[str, Any]], facts: _RunFacts) -> None:
    seen: dict[int, int] = {}
    prev_round = 0
    for e in this_run:
        r = int(e.get("round", -1))
        if r in seen:
            rep.findings.append(Finding("rounds", node, f"round {r} recorded twice (entries {seen[r]} and "
                                                        f"{e.get('index')})", entry=e.get("index")))
        elif r <= prev_round:
            rep.findings.append(Finding("rounds", node, f"round {r} after round {prev_round}: out of order",
                                        entry=e.get("index")))
        seen[r] = int(e.get("index", -1))
        prev_round = max(prev_round, r)
    if not facts.rounds:
        return
    expected = facts.trained.get(node, set())
    for r in sorted(expected - set(seen)):
        rep.findings.append(Finding("rounds", node, f"metrics.jsonl shows training in round {r} but the ledger has "
                                                    "no entry for it (missing entry)"))
    for r in sorted((set(seen) - expected) & facts.rounds):
        rep.findings.append(Finding("rounds", node, f"ledger entry for round {r} but metrics.jsonl shows no "
                                                    "training by this node (extra entry)", entry=seen[r]))
    for (n2, r), eps in facts.claimed.items():
        if n2 == node and r in seen:
            e = next(x for x in this_run if int(x["round"]) == r)
            if not math.isclose(float(e["epsilon"]), eps, rel_tol=1e-9):
                rep.findings.append(Finding("rounds", node, f"round {r}: metrics.jsonl reports ε={eps:.4f}, the "
                                                            f"ledger ε={float(e['epsilon']):.4f}", entry=e.get("index")))


def _check_parameters(rep: AuditReport, node: str, this_run: list[dict[str, Any]]) -> None:
    for k in FIXED_PER_RUN:
        values = {json.dumps(e.get(k)) for e in this_run}
        if len(values) > 1:
            first_change = next(e for e in this_run if json.dumps(e.get(k)) != json.dumps(this_run[0].get(k)))
            what = "the node's data changed mid-run" if k == "dataset" else f"{k} changed within the run"
            rep.findings.append(Finding("parameters", node, f"{what}: {sorted(values)}",
                                        entry=first_change.get("index")))


def _check_mechanism(rep: AuditReport, node: str, this_run: list[dict[str, Any]], facts: _RunFacts) -> None:
    """What ran is what was accounted: secret noise, the sample rate of the data, the steps."""
    bad = len(rep.failures)
    for e in this_run:
        idx, rnd = e.get("index"), e.get("round")
        if e.get("noise_seed") is not None:
            rep.findings.append(Finding("mechanism", node, f"round {rnd} used the fixed noise seed "
                                                           f"{e['noise_seed']}: whoever knows the seed can remove the "
                                                           "noise, so this release carries no DP guarantee", entry=idx))
        if e.get("kind") not in TRAINING_KINDS:
            continue
        this = e.get("run") == facts.run_id
        n, batch = e.get("num_examples"), e.get("batch_size") or (facts.batch_size if this else None)
        reported = facts.num_examples.get((node, int(rnd))) if this and isinstance(rnd, int) else None
        if n is None:
            n = reported
        elif reported is not None and reported != n:
            rep.findings.append(Finding("mechanism", node, f"round {rnd}: the ledger records n={n} training "
                                                           f"examples, the reply reported num-examples={reported}",
                                        entry=idx))
        if isinstance(n, int) and n > 0 and isinstance(batch, int) and batch > 0:
            q = 1.0 / math.ceil(n / min(batch, n))
            if not math.isclose(float(e.get("sample_rate", math.nan)), q, rel_tol=1e-12):
                rep.findings.append(Finding("mechanism", node, f"round {rnd}: sample rate {e.get('sample_rate')} "
                                                               f"does not match n={n}, batch size {batch} "
                                                               f"(q = 1/ceil(n/B) = {q:.6g})", entry=idx))
        else:
            rep.findings.append(Finding("mechanism", node, f"round {rnd}: the sample rate cannot be checked "
                                                           "(no num_examples/batch_size recorded or reported)",
                                        entry=idx))
        if "steps_executed" not in e:
            rep.findings.append(Finding("mechanism", node, f"round {rnd}: the ledger does not record the steps "
                                                           "executed", entry=idx))
        elif int(e["steps_executed"]) != int(e.get("steps", -1)):
            rep.findings.append(Finding("mechanism", node, f"round {rnd}: {e['steps_executed']} steps executed, "
                                                           f"{e.get('steps')} accounted", entry=idx))
    if this_run and len(rep.failures) == bad:
        rep.findings.append(Finding("mechanism", node, "secret noise, sample rates and steps match what was "
                                                       "accounted", ok=True))


def coverage(info: dict[str, Any]) -> str:
    """What a node's recomputation covered, in words: ``12 entries accounted (entries 0-11, runs a, b), 6 in this
    run's copy``. The run directory's copy holds only this run's entries; the count accounted is the node's."""
    covered = info.get("accounted_entries")
    if not covered:
        return f"{info.get('entries')} entries"
    return (f"{info.get('accounted_count')} entries accounted (entries {covered[0]}-{covered[1]}, runs "
            f"{', '.join(info.get('accounted_runs') or [])}), {info.get('entries')} in this run's copy")


def _check_coverage(rep: AuditReport, node: str, accounting: list[dict[str, Any]]) -> None:
    if not accounting:
        return
    first = accounting[0].get("index")
    runs = sorted({str(e.get("run")) for e in accounting if e.get("run") is not None})
    span = f"entries {first}-{accounting[-1].get('index')} of runs {', '.join(runs)}"
    if first != 0:
        rep.findings.append(Finding("coverage", node, f"the recomputation covers only {span}: the node's "
                                                      f"{first} earlier entries are not in view, so its total spend "
                                                      "is not checked; pass the node's own ledger (--node-ledgers)"))
    else:
        rep.findings.append(Finding("coverage", node, f"the recomputation covers the whole ledger: {span}", ok=True))


def _recompute(rep: AuditReport, node: str, accounting: list[dict[str, Any]]
               ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Recompute ε entry by entry (cumulative over every release) and hold claims and budgets to it."""
    history: list[tuple[float, float, int]] = []
    pure = 0.0
    per_entry: list[dict[str, Any]] = []
    last: dict[str, float] = {}
    bad = len(rep.failures)
    for e in accounting:
        kind = e.get("kind")
        if kind == "count-noise":
            pure += float(e.get("epsilon_release", 0.0))
        elif kind in TRAINING_KINDS:
            history.append((float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])))
        else:
            continue
        delta = float(e.get("delta", 1e-5))
        rec = {k: v + pure for k, v in recompute_epsilon(history, delta=delta).items()}
        last = rec
        claimed = float(e["epsilon"]) if isinstance(e.get("epsilon"), int | float) else None
        if claimed is not None and kind in TRAINING_KINDS:
            ref = rec[_claimed_key(str(e.get("accountant", "prv")))]
            if claimed < ref * (1 - NUMERIC_TOLERANCE):
                rep.findings.append(Finding("epsilon", node, f"claimed ε={claimed:.4f} is below the recomputed "
                                                             f"{ref:.4f} ({e.get('accountant')})", entry=e.get("index")))
        budget = e.get("budget_epsilon")
        if budget is not None:
            for what, value in ((f"recomputed ε ({HELD_TO_BUDGET})", rec[HELD_TO_BUDGET]), ("claimed ε", claimed)):
                if value is not None and value > float(budget):
                    rep.findings.append(Finding("budget", node, f"{what}={value:.4f} exceeds the budget "
                                                                f"{float(budget):.4f}", entry=e.get("index")))
        per_entry.append({"index": e.get("index"), "round": e.get("round"), "run": e.get("run"), "kind": kind,
                          "claimed": claimed, "budget": budget, **rec})
    if per_entry and len(rep.failures) == bad:
        rep.findings.append(Finding("epsilon", node, f"every claimed ε matches its recomputation and, with the "
                                                     f"{HELD_TO_BUDGET} recomputation, stays within the budget",
                                    ok=True))
    return per_entry, last


def _audit_server(rep: AuditReport, ledgers_dir: Path, pubkeys) -> None:
    """The server's central-DP ledger (client-level guarantee), when the run used central DP."""
    server = ledgers_dir / "server.jsonl"
    if not server.exists():
        return
    key_path = Path(pubkeys) / "server.pub" if pubkeys and (Path(pubkeys) / "server.pub").exists() \
        else ledgers_dir / "server.pub"
    res = verify_ledger(server, load_public_key(key_path))
    for p in res.problems:
        rep.findings.append(Finding("chain", "server", p.message, entry=p.index))
    sigmas = [float(e["noise_multiplier"]) for e in res.entries if e.get("kind") == "central-dp"]
    if sigmas:
        delta = float(res.entries[-1].get("delta", 1e-5))
        eps = recompute_central(sigmas, delta=delta)
        claimed = float(res.entries[-1].get("epsilon", math.nan))
        ok = not claimed < eps * (1 - NUMERIC_TOLERANCE)
        rep.findings.append(Finding("central-dp", "server", f"claimed ε={claimed:.4f}, recomputed {eps:.4f} "
                                                            f"(client-level, {len(sigmas)} releases)", ok=ok,
                                    entry=res.entries[-1].get("index")))
        rep.nodes["server"] = {"entries": len(res.entries), "claimed_final": claimed,
                               "recomputed_final": {"dp_accounting_rdp": eps}}


# --------------------------------------------------------------------------------------------- reports


def write_reports(rep: AuditReport, *, json_out: Path | None, html_out: Path | None, md_out: Path | None) -> None:
    """Write the JSON, HTML and Markdown reports that are asked for (folders are created); the HTML is the
    Markdown rendered by ``server.htmlreport``, with the chart ``audit_epsilon.png`` beside each file."""
    for out in (json_out, html_out, md_out):
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
    if json_out:
        Path(json_out).write_text(json.dumps(rep.to_dict(), indent=2, default=str))
    if not (html_out or md_out):
        return
    chart = None
    base = Path(html_out or md_out).parent
    rows = []
    for node, info in rep.nodes.items():
        for e in info.get("per_entry", []):
            rows.append((node, e))
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for i, (node, info) in enumerate(sorted(rep.nodes.items())):
            pts = [e for e in info.get("per_entry", []) if e["kind"] in TRAINING_KINDS]
            if not pts:
                continue
            xs = list(range(1, len(pts) + 1))
            ax.plot(xs, [p["dp_accounting_pld"] for p in pts], marker="o", color=f"C{i}", label=f"{node} recomputed")
            ax.plot(xs, [p["claimed"] for p in pts], linestyle=":", color=f"C{i}", label=f"{node} claimed")
            if info.get("budget") is not None:
                ax.axhline(float(info["budget"]), color=f"C{i}", linestyle="--", linewidth=0.8)
        ax.set_xlabel("training release (round)")
        ax.set_ylabel("ε")
        ax.set_ylim(bottom=0.0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("ε per node against its budget (dashed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        chart = base / "audit_epsilon.png"
        fig.savefig(chart, dpi=110)
        plt.close(fig)
    md = [f"# Privacy audit of `{rep.run_dir}`", "",
          f"**Result: {'PASSED' if rep.passed else 'FAILED'}** ({len(rep.failures)} failed checks; "
          f"budgets held to the {HELD_TO_BUDGET} recomputation, zero slack)", "", "| node | entries accounted | claimed ε | Opacus RDP | Opacus PRV | dp-accounting PLD | budget |",
          "|---|---|---|---|---|---|---|"]
    for node, info in sorted(rep.nodes.items()):
        r = info.get("recomputed_final") or {}

        def f(v):
            return "—" if v is None else f"{v:.4f}"

        md.append(f"| {md_escape(node)} | {md_escape(coverage(info))} | {f(info.get('claimed_final'))} | {f(r.get('opacus_rdp'))} | "
                  f"{f(r.get('opacus_prv'))} | {f(r.get('dp_accounting_pld'))} | {f(info.get('budget'))} |")
    md += ["", "## Checks", ""] + [f"- {md_escape(x)}" for x in rep.findings]
    if chart:
        md += ["", f"![ε per node against its budget]({chart.name})"]
    text = "\n".join(md) + "\n"
    if md_out:
        Path(md_out).write_text(text)
        if chart and Path(md_out).parent.resolve() != base.resolve():  # the image link is relative to each file
            shutil.copyfile(chart, Path(md_out).parent / chart.name)
    if html_out:
        Path(html_out).write_text(markdown_to_html(text, title=f"fedpriv audit {rep.run_dir}"))
