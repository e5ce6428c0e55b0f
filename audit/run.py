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
4. ``parameters``: noise multiplier, sample rate, steps, clipping norm, δ and accountant stay fixed within a run.
5. ``epsilon``: ε is recomputed from the recorded mechanism parameters alone, with accountants that share no
   code with the training path: Opacus RDP and PRV, and Google's dp-accounting PLD (and RDP). A claimed ε below
   the recomputed value of its own accountant by more than ``tolerance`` (relative) fails.
6. ``budget``: the recomputed ε (the PLD value, the tightest of the independent ones) stays within the node's
   recorded budget (``budget_epsilon``) up to the same tolerance.

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

TOLERANCE = 0.02  # relative slack between a claimed ε and the recomputed one (accountant numerics)
TRAINING_KINDS = ("dp-sgd",)


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
        return {"run_dir": self.run_dir, "passed": self.passed, "tolerance": TOLERANCE, "nodes": self.nodes,
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


def audit_run(run_dir: str | Path, *, pubkeys: str | Path | None = None,
              node_ledgers: str | Path | None = None) -> AuditReport:

    run_dir = Path(run_dir)
    rep = AuditReport(run_dir=str(run_dir))
    ledgers_dir = run_dir / "ledgers"
    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    run_id = cfg.get("fedpriv-run")
    metrics = []
    if (run_dir / "metrics.jsonl").exists():
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    trained_rounds: dict[str, set[int]] = {}
    claimed_in_metrics: dict[tuple[str, int], float] = {}
    for row in metrics:
        for node, n in (row.get("nodes") or {}).items():
            if n.get("status") in ("ok", "rejected") and "epsilon" in n:
                trained_rounds.setdefault(node, set()).add(int(row["round"]))
                claimed_in_metrics[(node, int(row["round"]))] = float(n["epsilon"])
    ledger_files = sorted(p for p in ledgers_dir.glob("*.jsonl") if p.stem != "server") if ledgers_dir.exists() else []
    if cfg.get("dp", True) and not ledger_files and metrics:
        rep.findings.append(Finding("ledgers", "-", "DP was on but RUN_DIR/ledgers holds no node ledger"))
    for led in ledger_files:
        node = led.stem
        key_path = Path(pubkeys) / f"{node}.pub" if pubkeys else ledgers_dir / f"{node}.pub"
        if not key_path.exists():
            rep.findings.append(Finding("signature", node, f"no public key at {key_path}"))
            continue
        own = _node_copy(run_dir, node, Path(node_ledgers) if node_ledgers else None)
        # The server copy holds the entries of the runs it saw: a segment of the node's chain that may start
        # after entry 0 when the node took part in earlier runs; the node's own copy is checked from entry 0.
        res = verify_ledger(led, load_public_key(key_path), segment=True)
        for p in res.problems:
            rep.findings.append(Finding("chain", node, p.message, entry=p.index))
        if res.ok:
            rep.findings.append(Finding("chain", node, f"{len(res.entries)} entries verify under {key_path.name}",
                                        ok=True))
        entries = res.entries
        # ---- node's own copy
        accounting_entries = entries
        if own is not None:
            own_res = verify_ledger(own, load_public_key(key_path))
            if own_res.ok:
                accounting_entries = own_res.entries  # the full history, earlier runs included
            for p in own_res.problems:
                rep.findings.append(Finding("copies", node, f"node's own ledger: {p.message}", entry=p.index))
            mine = [e["hash"] for e in own_res.entries if e.get("run") == run_id]
            theirs = [e.get("hash") for e in entries if e.get("run") == run_id]
            if mine != theirs:
                extra = [i for i, h in enumerate(theirs) if h not in mine]
                missing = [i for i, h in enumerate(mine) if h not in theirs]
                rep.findings.append(Finding("copies", node, f"server copy and node copy differ for this run: "
                                                            f"{len(missing)} missing, {len(extra)} extra entries",
                                            entry=(extra or missing or [None])[0]))
            else:
                rep.findings.append(Finding("copies", node, f"server copy equals the node's {len(mine)} entries",
                                            ok=True))
        # ---- rounds and parameters within this run
        train = [e for e in entries if e.get("kind") in TRAINING_KINDS]
        this_run = [e for e in train if e.get("run") == run_id] if run_id else train
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
        if metrics:
            expected = trained_rounds.get(node, set())
            for r in sorted(expected - set(seen)):
                rep.findings.append(Finding("rounds", node, f"metrics.jsonl shows training in round {r} but the "
                                                            "ledger has no entry for it (missing entry)"))
            done_rounds = {int(row["round"]) for row in metrics}
            for r in sorted(set(seen) - expected):
                if r in done_rounds:
                    rep.findings.append(Finding("rounds", node, f"ledger entry for round {r} but metrics.jsonl shows "
                                                                "no training by this node (extra entry)",
                                                entry=seen[r]))
            for (n2, r), eps in claimed_in_metrics.items():
                if n2 == node and r in seen:
                    e = next(x for x in this_run if int(x["round"]) == r)
                    if not math.isclose(float(e["epsilon"]), eps, rel_tol=1e-9):
                        rep.findings.append(Finding("rounds", node, f"round {r}: metrics.jsonl reports ε={eps:.4f}, "
                                                                    f"the ledger ε={float(e['epsilon']):.4f}",
                                                    entry=e.get("index")))
        fixed = ("noise_multiplier", "sample_rate", "steps", "clipping_norm", "delta", "accountant")
        for k in fixed:
            values = {json.dumps(e.get(k)) for e in this_run}
            if len(values) > 1:
                first_change = next(e for e in this_run if json.dumps(e.get(k)) != json.dumps(this_run[0].get(k)))
                rep.findings.append(Finding("parameters", node, f"{k} changed within the run: {sorted(values)}",
                                            entry=first_change.get("index")))
        # ---- recompute ε entry by entry (cumulative over every release in the ledger)
        history: list[tuple[float, float, int]] = []
        pure = 0.0
        per_entry = []
        node_fail = False
        last_recomputed: dict[str, float] = {}
        for e in accounting_entries:
            kind = e.get("kind")
            if kind == "count-noise":
                pure += float(e.get("epsilon_release", 0.0))
            elif kind in TRAINING_KINDS:
                history.append((float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])))
            else:
                continue
            delta = float(e.get("delta", 1e-5))
            rec = {k: v + pure for k, v in recompute_epsilon(history, delta=delta).items()}
            last_recomputed = rec
            claimed = float(e.get("epsilon", math.nan)) if kind in TRAINING_KINDS else None
            if claimed is not None:
                ref = rec[_claimed_key(str(e.get("accountant", "prv")))]
                if claimed < ref * (1 - TOLERANCE):
                    node_fail = True
                    rep.findings.append(Finding("epsilon", node, f"claimed ε={claimed:.4f} is below the recomputed "
                                                                 f"{ref:.4f} ({e.get('accountant')})",
                                                entry=e.get("index")))
            budget = e.get("budget_epsilon")
            if budget is not None and rec["dp_accounting_pld"] > float(budget) * (1 + TOLERANCE):
                node_fail = True
                rep.findings.append(Finding("budget", node, f"recomputed ε={rec['dp_accounting_pld']:.4f} exceeds "
                                                            f"the budget {float(budget):.4f}", entry=e.get("index")))
            per_entry.append({"index": e.get("index"), "round": e.get("round"), "run": e.get("run"), "kind": kind,
                              "claimed": claimed, "budget": budget, **rec})
        if not node_fail and per_entry:
            rep.findings.append(Finding("epsilon", node, "every claimed ε matches its recomputation and stays "
                                                         "within the budget", ok=True))
        rep.nodes[node] = {"entries": len(entries), "entries_this_run": len(this_run),
                           "claimed_final": per_entry[-1]["claimed"] if per_entry else None,
                           "recomputed_final": last_recomputed, "budget": per_entry[-1]["budget"] if per_entry else None,
                           "per_entry": per_entry}
    # ---- the server's central-DP ledger
    server = ledgers_dir / "server.jsonl"
    if server.exists():
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
            ok = not claimed < eps * (1 - TOLERANCE)
            rep.findings.append(Finding("central-dp", "server", f"claimed ε={claimed:.4f}, recomputed {eps:.4f} "
                                                                f"(client-level, {len(sigmas)} releases)", ok=ok,
                                        entry=res.entries[-1].get("index")))
            rep.nodes["server"] = {"entries": len(res.entries), "claimed_final": claimed,
                                   "recomputed_final": {"dp_accounting_rdp": eps}}
    return rep


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
          f"tolerance {TOLERANCE:.0%})", "", "| node | entries | claimed ε | Opacus RDP | Opacus PRV | dp-accounting PLD | budget |",
          "|---|---|---|---|---|---|---|"]
    for node, info in sorted(rep.nodes.items()):
        r = info.get("recomputed_final") or {}

        def f(v):
            return "—" if v is None else f"{v:.4f}"

        md.append(f"| {md_escape(node)} | {info.get('entries')} | {f(info.get('claimed_final'))} | {f(r.get('opacus_rdp'))} | "
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
