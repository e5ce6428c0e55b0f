"""Every HTML report fedpriv writes opens right: images and links resolve, no Markdown syntax shows; the run
report tells a privacy officer what each node spent against which budget, and what data it shared."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from common.config import RunConfig
from common.fairness import fairness_report
from common.ledger import Ledger, load_or_create_node_key
from common.metrics import classification_metrics
from common.privacy import DpSgdRelease, compute_epsilon
from server.rows import RoundRow
from server.rundir import RunDir

RUN = "run-html"
LABELS = ["negative", "positive"]
Q, STEPS, DELTA, COUNT_EPS = 0.05, 40, 1e-5, 0.1
SIGMA = {"node-0": 1.0, "node-1": 1.5}
BUDGET = {"node-0": 8.0, "node-1": 2.0}
NUM_EXAMPLES = {"node-0": 800, "node-1": 530}
BATCH = {"node-0": 40, "node-1": 27}  # q = 1/ceil(n/B) = Q for both
REFUSAL = "training would spend ε=2.14 > budget 2.00 at δ=1e-05 (spent so far 1.82)"


def _cfg(**over) -> RunConfig:
    return RunConfig(num_server_rounds=3, labels=",".join(LABELS), group_col="group", model="tiny",
                     eval_data="/data/dev set.csv", **over)


def _counts(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {g: rng.integers(low, high, size=(2, 2)) for g, low, high in (("north", 5, 30), ("south", 5, 30),
                                                                          ("tiny-group", 1, 5))}


def _metrics(cms: dict[str, np.ndarray], prefix: str = "") -> dict:
    cls = classification_metrics(np.asarray(sum(cms.values())), labels=LABELS)
    return {f"{prefix}accuracy": cls["accuracy"], f"{prefix}macro_f1": cls["macro_f1"],
            f"{prefix}classification": cls,
            f"{prefix}fairness": fairness_report(cms, labels=LABELS, min_group_size=30)}


def make_run(tmp: Path, *, dp: bool = True) -> Path:
    """A 3-round run of two nodes as the server leaves it: node-1 noises its evaluation counts (count-noise
    entries), runs out of budget and refuses round 3; both ledgers are signed, with the nodes' own copies."""
    run = RunDir(tmp / "run")
    cfg = _cfg(dp=dp)
    run.write_config(cfg.to_mapping(), run_id=RUN)
    ledgers = {}
    for node in SIGMA:
        state = run.path / "nodes" / node / "state"
        ledgers[node] = Ledger(state / "ledger.jsonl", load_or_create_node_key(state))
    for rnd in (1, 2, 3):
        row: dict = {"round": rnd, "run": RUN, "status": "ok", "nodes": {}, "refusals": [], "rejected": [],
                     "errors": [], "nodes_sampled": 2, "seconds": 1.5, "num_examples_val": 330}
        for node, sigma in SIGMA.items():
            if not dp:
                row["nodes"][node] = {"status": "ok", "num-examples": NUM_EXAMPLES[node]}
                continue
            if node == "node-1" and rnd == 3:
                row["nodes"][node] = {"status": "refused", "reason": REFUSAL, "num-examples": 0}
                row["refusals"].append({"node": node, "reason": REFUSAL})
                continue
            pure = (rnd - 1) * COUNT_EPS if node == "node-1" else 0.0
            eps = compute_epsilon([DpSgdRelease(sigma, Q, STEPS)] * rnd, delta=DELTA, accountant="prv") + pure
            prev = compute_epsilon([DpSgdRelease(sigma, Q, STEPS)] * (rnd - 1), delta=DELTA,
                                   accountant="prv") + pure if rnd > 1 else 0.0
            entries = [ledgers[node].append({
                "schema": 1, "kind": "dp-sgd", "run": RUN, "round": rnd, "node": node, "dataset": "d" * 64,
                "accountant": "prv", "delta": DELTA, "noise_multiplier": sigma, "sample_rate": Q, "steps": STEPS,
                "clipping_norm": 1.0, "epsilon": eps, "epsilon_round": eps - prev, "budget_epsilon": BUDGET[node],
                "noise_seed": None, "num_examples": NUM_EXAMPLES[node], "batch_size": BATCH[node], "epochs": 2,
                "steps_executed": STEPS, "time": "2026-11-30T00:00:00+00:00"})]
            if node == "node-1":
                entries.append(ledgers[node].append({
                    "schema": 1, "kind": "count-noise", "run": RUN, "round": rnd, "node": node, "dataset": "d" * 64,
                    "mechanism": "discrete-laplace", "epsilon_release": COUNT_EPS, "epsilon": eps + COUNT_EPS,
                    "delta": DELTA, "budget_epsilon": BUDGET[node], "time": "2026-11-30T00:00:00+00:00"}))
            for e in entries:
                run.store_ledger_entry(node, e, (run.path / "nodes" / node / "state" / "node_ed25519.pub").read_text())
            row["nodes"][node] = {"status": "ok", "epsilon": eps, "noise-multiplier": sigma,
                                  "num-examples": NUM_EXAMPLES[node], "train-loss": 0.6}
        row["epsilon"] = {n: r["epsilon"] for n, r in row["nodes"].items() if "epsilon" in r}
        row["nodes_trained"] = len([r for r in row["nodes"].values() if r["status"] == "ok"])
        row.update(_metrics(_counts(rnd)), loss=0.6, train_loss=0.65)
        row.update(_metrics(_counts(10 + rnd), prefix="eval_"), eval_loss=0.7)
        run.append_metrics(RoundRow.from_json(row))
    return run.path


def write_run_report(run: Path, *, dp: bool = True) -> Path:
    from server.report import write_report

    _, html = write_report(RunDir(run), _cfg(dp=dp))
    return html


def write_audit_report(run: Path) -> Path:
    from audit.run import audit_run, write_reports

    rep = audit_run(run)
    assert rep.passed, [str(f) for f in rep.failures]
    out = run / "audit" / "audit.html"  # a folder that does not exist yet
    write_reports(rep, json_out=None, html_out=out, md_out=run / "audit.md")
    return out


def compress_report() -> dict:
    """A compress report as ``serving.compress.compress`` writes it (figures made up, every section present)."""
    ev_side = {"accuracy": 0.81, "macro_f1": 0.8, "gaps": {"demographic_parity_difference": 0.05}}
    return {
        "model": "runs/sim_a/model", "out": "runs/sim_a/model-int8",
        "request": {"quantize": "all", "prune": 0.3},
        "quantization": {"modules": ["Linear", "Embedding"], "engine": "x86"},
        "pruning": {"amount": 0.3, "scope": "global", "sparsity_before": 0.0, "sparsity_after": 0.3,
                    "layer_sparsity_min": 0.2, "layer_sparsity_max": 0.4},
        "size": {"before_bytes": 90_000_000, "after_bytes": 25_000_000, "ratio": 3.6},
        "latency": {"batch_1": {"before": 4.0, "after": 2.0, "speedup": 2.0},
                    "batch_32": {"before": 1.0, "after": 0.6, "speedup": 1.67}, "torch_threads": 1, "repeats": 10,
                    "warmup": 2, "inputs": "32 texts of dev.csv", "max_length": 128},
        "evaluation": {"num_examples": 32, "data": "dev.csv", "group_col": "site", "before": ev_side,
                       "after": {**ev_side, "gaps": {"demographic_parity_difference": 0.09}},
                       "difference": {"accuracy": 0.0, "macro_f1": 0.0, "gaps": {"demographic_parity_difference": 0.04}},
                       "prediction_agreement": 0.97, "widened_gaps": ["demographic_parity_difference"]},
        "notes": ["Compression can widen group gaps: check the gap rows."],
        "versions": {"torch": "2.x", "transformers": "5.x"},
    }


def write_compress_report(tmp: Path) -> Path:
    from serving.compress import REPORT_HTML, render_html

    out = tmp / REPORT_HTML
    out.write_text(render_html(compress_report()))
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("html"))


@pytest.fixture
def run(run_dir, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


class _Text(HTMLParser):
    """The visible text of a page, and its paragraphs."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.paragraphs: list[str] = []
        self._p: list[str] | None = None
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("style", "title")
        if tag == "p":
            self._p = []

    def handle_endtag(self, tag):
        self._skip -= tag in ("style", "title")
        if tag == "p" and self._p is not None:
            self.paragraphs.append("".join(self._p))
            self._p = None

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)
            if self._p is not None:
                self._p.append(data)


def _page(path: Path) -> _Text:
    t = _Text()
    t.feed(path.read_text(encoding="utf-8"))
    return t


def _section(text: str, title: str) -> str:
    """The text between the heading ``title`` and the next heading of the Markdown file."""
    md = text.split(f"## {title}\n", 1)[1]
    return re.split(r"^## ", md, maxsplit=1, flags=re.M)[0]


# ------------------------------------------------------------------------------------------------ every page


@pytest.mark.parametrize("which", ["run report", "run report without DP", "audit report", "compress report"])
def test_every_html_report_resolves_its_images_and_links_and_shows_no_markdown(which, run, tmp_path, check_html):
    if which == "run report":
        html = write_run_report(run)
    elif which == "run report without DP":
        html = write_run_report(make_run(tmp_path / "nodp", dp=False), dp=False)
    elif which == "audit report":
        html = write_audit_report(run)
    else:
        html = write_compress_report(tmp_path)
    assert check_html(html) == []
    assert '<img src="' in html.read_text() or which == "compress report"
    if which == "audit report":  # the Markdown written to another folder gets its own copy of the chart
        assert (run / "audit_epsilon.png").is_file() and "](audit_epsilon.png)" in (run / "audit.md").read_text()


def test_the_checker_catches_the_faults_of_the_old_converter(tmp_path, check_html):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "epsilon.png").write_bytes(b"png")
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><h1>fedpriv run report — `sim-1`</h1><p>**Result**</p>"
                   '<img src="ε per node)](plots/epsilon.png"><a href="missing.html">x</a></body></html>')
    problems = check_html(bad)
    assert len(problems) == 4, problems
    ok = tmp_path / "ok.html"
    ok.write_text('<html><body><h1>report <code>sim-1</code></h1><img src="plots/epsilon.png">'
                  '<a href="https://example.org">x</a><a href="#top">top</a></body></html>')
    assert check_html(ok) == []


def test_text_from_other_parties_is_shown_as_written_not_as_markup():
    from server.htmlreport import markdown_to_html, md_escape

    reason = "budget | 2 * 3 _x_ [a](b) <b>bold</b> `code` & **not bold**"
    page = markdown_to_html(f"| node | reason |\n|---|---|\n| n | {md_escape(reason)} |\n", title="<t>")
    assert "<b>bold</b>" not in page and "<strong>" not in page and "<a " not in page
    cells = [c for c in re.findall(r"<td>(.*?)</td>", page)]
    assert len(cells) == 2
    t = _Text()
    t.feed(cells[1])
    assert "".join(t.parts) == reason
    assert "<title>&lt;t&gt;</title>" in page


# ------------------------------------------------------------------------------------------------ privacy


def test_privacy_section_states_budget_spent_left_and_refusals_per_node(run):
    from server.htmlreport import md_escape

    html = write_run_report(run)
    md = (run / "report.md").read_text()
    privacy = _section(md, "Privacy")
    spent0 = compute_epsilon([DpSgdRelease(1.0, Q, STEPS)] * 3, delta=DELTA, accountant="prv")
    spent1 = compute_epsilon([DpSgdRelease(1.5, Q, STEPS)] * 2, delta=DELTA, accountant="prv") + 2 * COUNT_EPS
    row0 = next(x for x in privacy.splitlines() if x.startswith("| node-0 |")).split(" | ")
    row1 = next(x for x in privacy.splitlines() if x.startswith("| node-1 |")).split(" | ")
    header = next(x for x in privacy.splitlines() if x.startswith("| node |")).split(" | ")
    col = {h.strip("| "): i for i, h in enumerate(header)}
    for row, budget, spent, trained, refused, counts in ((row0, 8.0, spent0, 3, 0, "none"),
                                                          (row1, 2.0, spent1, 2, 1, f"2 × ε {COUNT_EPS:g}")):
        assert row[col["budget ε"]] == f"{budget:.2f}"
        assert row[col["δ"]] == "1e-05"
        assert row[col["ε spent"]] == f"{spent:.3f}"
        assert row[col["ε left"]] == f"{budget - spent:.3f}"
        assert row[col["accountant"]] == "PRV"
        assert row[col["noise σ"]] == f"{SIGMA[row[0].strip('| ')]:.3f}"
        assert row[col["rounds trained"]] == str(trained) and row[col["rounds refused"]] == str(refused)
        assert row[col["noised counts"]].strip(" |") == counts
    assert f"| 3 | node-1 | {md_escape(REFUSAL)} |" in privacy and REFUSAL in "".join(_page(html).parts)
    assert "![ε spent per node against its budget](plots/epsilon.png)" in privacy
    # the guarantee statement is one paragraph of the page
    statement = [p for p in _page(html).paragraphs if "record-level" in p]
    assert len(statement) == 1
    for phrase in ("(ε, δ)-differential privacy", "add/remove-one", "clipping to norm 1", "PRV",
                   f"ε = {spent0:.3f} (node node-0, budget 8)", "δ = 1e-05",
                   "Evaluation counts of node-1 were noised", "Evaluation counts of node-0 were sent exact",
                   "num-examples", "public", "fedpriv audit"):
        assert phrase in statement[0], phrase


def test_fixed_noise_seed_and_dp_off_are_said_plainly(run, tmp_path):
    led = run / "ledgers" / "node-0.jsonl"
    led.write_text(led.read_text().replace('"noise_seed":null', '"noise_seed":7'))
    write_run_report(run)
    assert "gives no privacy guarantee" in _section((run / "report.md").read_text(), "Privacy")
    nodp = make_run(tmp_path / "nodp", dp=False)
    write_run_report(nodp, dp=False)
    md = (nodp / "report.md").read_text()
    assert "Differential privacy was **off**" in _section(md, "Privacy") and "plots/epsilon.png" not in md


def test_epsilon_chart_draws_each_budget_dashed_in_the_nodes_colour_from_zero():
    from server.plots import epsilon_figure

    fig = epsilon_figure({"a": [(0, 0.0), (1, 5.7), (2, 7.9)], "b": [(0, 1.0), (1, 1.6)]},
                         budgets={"a": 8.0, "b": 2.0}, refused={"b": [2]})
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] >= 8.0
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    for node, budget in (("a", 8.0), ("b", 2.0)):
        spent, line = lines[f"{node} spent"], lines[f"{node} budget {budget:g}"]
        assert line.get_linestyle() == "--" and list(line.get_ydata()) == [budget, budget]
        assert line.get_color() == spent.get_color()
    assert list(lines["b refused"].get_xdata()) == [2] and list(lines["b refused"].get_ydata()) == [1.6]
    assert lines["a spent"].get_color() != lines["b spent"].get_color()


# ------------------------------------------------------------------------------------------------ data


def test_data_section_shows_public_sizes_summed_groups_and_the_eval_set_only(run):
    write_run_report(run)
    data = _section((run / "report.md").read_text(), "Data")
    assert "| node-0 | 800 | exact (outside the DP guarantee) | no cleaning |" in data
    assert f"| node-1 | 530 | noised (ε {COUNT_EPS:g} per round, in its ledger) | no cleaning |" in data
    rows = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for g, m in rows["fairness"]["groups"].items():
        assert f"| {g} | {m['n']} |" in data
    assert "rows (noised counts)" in data  # a node noised its counts: the sums are flagged
    assert re.search(r"\| tiny-group \| \d+ \| yes \|", data)  # below min-group-size
    assert "dev set.csv" in data and f"{rows['eval_classification']['num_examples']} rows" in data
    for g, m in rows["eval_fairness"]["groups"].items():
        assert f"| {g} | {m['n']} |" in data


# ------------------------------------------------------------------------------------------------ browser


@pytest.mark.slow
def test_chromium_screenshot_of_the_run_report(run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium): no browser screenshot")
    html = write_run_report(run)
    png = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,3000",
                    html.as_uri()], check=True, capture_output=True, timeout=120)
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 3000)


def test_epsilon_series_ends_at_the_spend_with_every_release_counted(run):
    from server.report_privacy import epsilon_series, node_privacy

    nodes = node_privacy(RunDir(run).read_metrics(), run / "ledgers", run_id=RUN)
    series = epsilon_series(nodes)
    for name, p in nodes.items():
        assert series[name][0] == (0, 0.0) and series[name][-1][1] == p.spent
        assert [r for r, _ in series[name]] == ([0, 1, 2, 3] if name == "node-0" else [0, 1, 2])
    # node-1's line includes its noised-count releases: above its DP-SGD ε of round 2
    assert series["node-1"][-1][1] == pytest.approx(dict(nodes["node-1"].trained)[2] + COUNT_EPS)
    assert nodes["node-1"].refusals == [(3, REFUSAL)] and nodes["node-1"].num_examples == 530


def test_spend_from_earlier_runs_is_the_starting_point_and_other_runs_are_ignored(tmp_path):
    from server.report_privacy import epsilon_series, node_privacy

    led = tmp_path / "ledgers"
    led.mkdir()
    base = {"kind": "dp-sgd", "node": "n", "accountant": "rdp", "delta": DELTA, "budget_epsilon": 8.0,
            "noise_multiplier": 1.0, "sample_rate": Q, "steps": STEPS, "noise_seed": None}
    lines = [{**base, "run": "old", "round": 1, "epsilon": 3.0, "epsilon_round": 3.0},
             {**base, "run": RUN, "round": 1, "epsilon": 4.5, "epsilon_round": 1.5},
             {**base, "run": RUN, "round": 2, "epsilon": 5.5, "epsilon_round": 1.0}]
    (led / "n.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    p = node_privacy([], led, run_id=RUN)["n"]
    assert (p.spent_before, p.spent, p.left, p.accountant, len(p.trained)) == (3.0, 5.5, 2.5, "rdp", 2)
    assert epsilon_series({"n": p})["n"] == [(0, 3.0), (1, 4.5), (2, 5.5)]
