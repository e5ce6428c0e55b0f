"""The run report: ``report.md`` and ``report.html`` with PNG charts, written from ``metrics.jsonl``.

Sections: summary, classification, privacy (per node: budget ε and δ, spent, left, accountant, noise, refusals,
the guarantee statement and the ε chart against each budget; ``server.report_privacy``), data (rows and groups as
far as the nodes shared them, the eval set), cleaning, fairness (per-group table of the last round, per-group
TPR/FPR and gaps over rounds), a per-round table and the charts. ``report.html`` is ``report.md`` rendered by
``server.htmlreport`` (markdown-it-py); image paths are relative to the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.cleaning import RULES
from common.config import RunConfig
from common.fairness import FairnessReport
from common.fsutil import atomic_write_text
from server import plots
from server.htmlreport import markdown_to_html
from server.report_privacy import data_md, epsilon_series, node_privacy, privacy_md, run_id_of
from server.rundir import RunDir


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_report(rundir: RunDir, cfg: RunConfig) -> tuple[Path, Path]:
    """Write report.md and report.html (+ plots/) for the run; returns both paths."""

    rows = rundir.read_metrics()
    plot_dir = rundir.path / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    charts: list[tuple[str, Path]] = []
    privacy = node_privacy(rows, rundir.ledgers_dir, run_id=run_id_of(rows, rundir.path))
    eps_chart: Path | None = None
    if rows:
        acc_keys = [k for k in ("accuracy", "macro_f1", "eval_accuracy", "eval_macro_f1") if any(k in r for r in rows)]
        charts.append(("Accuracy over rounds", plots.plot_metric_over_rounds(
            rows, acc_keys, plot_dir / "accuracy.png", title="Accuracy and macro-F1", ylabel="score")))
        loss_keys = [k for k in ("loss", "train_loss", "eval_loss") if any(k in r for r in rows)]
        charts.append(("Loss over rounds", plots.plot_metric_over_rounds(
            rows, loss_keys, plot_dir / "loss.png", title="Loss", ylabel="cross-entropy")))
        series = epsilon_series(privacy)
        if cfg.dp and series:
            eps_chart = plots.plot_epsilon_against_budget(
                series, plot_dir / "epsilon.png", budgets={n: p.budget for n, p in privacy.items()},
                refused={n: [r for r, _ in p.refusals] for n, p in privacy.items() if p.refusals})
        if any(r.get("fairness") for r in rows):
            charts.append(("Per-group TPR/FPR over rounds", plots.plot_group_rates_over_rounds(
                rows, plot_dir / "group_rates.png")))
            charts.append(("Fairness gaps over rounds", plots.plot_gaps_over_rounds(rows, plot_dir / "gaps.png")))

    last = rows[-1] if rows else {}
    md: list[str] = [f"# fedpriv run report — `{rundir.path.name}`", ""]
    md += ["## Summary", "",
           f"- Model: `{cfg.model}` (train part `{cfg.train_part}`), labels: {', '.join(cfg.label_names)}",
           f"- Rounds completed: {len(rows)} of {cfg.num_server_rounds}; aggregation `{cfg.aggregation}`",
           f"- Differential privacy: {'DP-SGD, accountant ' + cfg.accountant + f', clipping norm {cfg.clipping_norm}' if cfg.dp else 'off'}",
           f"- Last round: accuracy {_fmt(last.get('accuracy'))}, macro-F1 {_fmt(last.get('macro_f1'))}"
           + (f", eval accuracy {_fmt(last.get('eval_accuracy'))}" if "eval_accuracy" in last else "")]
    stop = next((r["stopped"] for r in rows if r.get("stopped")), "")
    if stop:
        md += [f"- Stopped early: {stop}"]
    sel = last.get("selection") or {}
    if sel.get("best_round") and (cfg.keep_best or cfg.early_stopping_patience):
        md += [f"- Best round by `{sel['metric']}`: {sel['best_round']} ({_fmt(sel.get('best_value'))}), kept in "
               "`best/` beside the final `model/`"]
    md += [""]
    for prefix, title in (("", "federated validation"), ("eval_", "server-held evaluation set")):
        md += _classification_md(last.get(f"{prefix}classification"), title)
    md += privacy_md(cfg, privacy, chart=f"plots/{eps_chart.name}" if eps_chart else None)
    cleaning = rundir.read_cleaning()
    md += data_md(cfg, rows, privacy, cleaning)
    if cleaning:
        md += _cleaning_md(cleaning, spec=cfg.clean)
    fair = last.get("fairness")
    if fair:
        md += ["## Fairness (last round, federated validation)", ""]
        md += _fairness_md(FairnessReport.from_json(fair))
    md += ["## Rounds", "", "| round | status | accuracy | macro-F1 | loss | eval acc | nodes | seconds |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['round']} | {r.get('status')} | {_fmt(r.get('accuracy'))} | {_fmt(r.get('macro_f1'))} | "
                  f"{_fmt(r.get('loss'))} | {_fmt(r.get('eval_accuracy'))} | {r.get('nodes_trained')} | "
                  f"{_fmt(r.get('seconds'), 1)} |")
    md.append("")
    for title, path in charts:
        md += [f"### {title}", "", f"![{title}](plots/{path.name})", ""]
    md_text = "\n".join(md)
    md_path = rundir.path / "report.md"
    atomic_write_text(md_path, md_text)
    html_path = rundir.path / "report.html"
    atomic_write_text(html_path, markdown_to_html(md_text, title=f"fedpriv report {rundir.path.name}"))
    return md_path, html_path


def _cleaning_md(cleaning: dict[str, Any], *, spec: str) -> list[str]:
    """cleaning.json as a table: rows in/out per dataset and, per rule, rows changed / rows removed."""

    datasets = sorted((cleaning.get("nodes") or {}).items())
    if "eval_data" in cleaning:
        datasets.append(("eval-data (server)", cleaning["eval_data"]))
    rules = [r for r in RULES if any(r in c for _, c in datasets)]
    out = ["## Data cleaning", "", f"Rules `{spec}`; per rule: rows changed / rows removed "
           "(dedup also: texts kept with conflicting labels).", "",
           "| dataset | rows in | rows out | " + " | ".join(rules) + " |", "|---" * (3 + len(rules)) + "|"]
    for name, c in datasets:
        cells = []
        for r in rules:
            rc = c.get(r) or {}
            cell = f"{rc.get('changed', 0)} / {rc.get('removed', 0)}"
            if "conflicting_labels" in rc:
                cell += f" (conflicting {rc['conflicting_labels']})"
            cells.append(cell)
        out.append(f"| {name} | {c.get('rows_in')} | {c.get('rows_out')} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def _fairness_md(fair: FairnessReport) -> list[str]:
    out: list[str] = []
    groups = fair.groups
    if groups:
        out += ["| group | n | selection rate | accuracy | TPR | FPR | small |", "|---|---|---|---|---|---|---|"]
        for g, m in sorted(groups.items()):
            vals = [_fmt(fair.rate(g, k)) for k in ("selection_rate", "accuracy", "tpr", "fpr")]
            out.append(f"| {g} | {m.get('n')} | " + " | ".join(vals) + f" | {'yes' if m.get('small_group') else ''} |")
        out.append("")
    gaps = fair.gaps
    if gaps:
        out += ["| gap | value |", "|---|---|"]
        out += [f"| {k} | {_fmt(v.value)} |" for k, v in sorted(gaps.items())]
        out.append("")
    if not groups and not gaps:
        out += ["```", json.dumps(fair.to_json(), indent=1)[:4000], "```", ""]
    return out


def _classification_md(cls: dict | None, title: str) -> list[str]:
    """Per-class precision/recall/F1, the averages and the confusion matrix of one round, as Markdown."""
    if not cls or not cls.get("per_class"):
        return []
    names = list(cls["per_class"])
    md = [f"## Classification, last round ({title})", "", "| class | precision | recall | F1 | support |",
          "|---|---|---|---|---|"]
    md += [f"| {n} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['f1'])} | {v['support']} |"
           for n, v in cls["per_class"].items()]
    md += [f"| macro avg | {_fmt(cls['macro_precision'])} | {_fmt(cls['macro_recall'])} | {_fmt(cls['macro_f1'])} "
           f"| {cls['num_examples']} |",
           f"| micro avg | {_fmt(cls['micro_precision'])} | {_fmt(cls['micro_recall'])} | {_fmt(cls['micro_f1'])} "
           f"| {cls['num_examples']} |", ""]
    md += ["Confusion matrix (rows: true class, columns: predicted):", "",
           "| true \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    md += [f"| {n} | " + " | ".join(str(int(x)) for x in row) + " |"
           for n, row in zip(names, cls["confusion_matrix"], strict=False)]
    return md + [""]
