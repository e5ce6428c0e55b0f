"""`fedpriv audit`: a clean run passes; every kind of tampering or overspending fails and names the entry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit.run import audit_run, recompute_epsilon
from common.ledger import Ledger, canonical, entry_hash, load_or_create_node_key, public_pem
from common.privacy import DpSgdRelease, compute_epsilon
from fedpriv.cli import main

RUN = "run123"
SIGMA, Q, STEPS, DELTA = 1.0, 0.05, 40, 1e-5
N, BATCH = 640, 32  # q = 1/ceil(N/BATCH) = Q


def _entry(r: int, eps: float, *, sigma: float = SIGMA, budget: float = 8.0, node: str = "node-0") -> dict:
    return {"schema": 1, "kind": "dp-sgd", "run": RUN, "round": r, "node": node, "dataset": "d" * 64,
            "accountant": "prv", "delta": DELTA, "noise_multiplier": sigma, "sample_rate": Q, "steps": STEPS,
            "clipping_norm": 1.0, "epsilon": eps, "epsilon_round": 0.0, "budget_epsilon": budget,
            "noise_seed": None, "num_examples": N, "batch_size": BATCH, "epochs": 2, "steps_executed": STEPS,
            "time": "2026-11-28T00:00:00+00:00"}


def make_run(tmp: Path, *, rounds: int = 3, budget: float = 8.0, sigma: float = SIGMA,
             nodes: tuple[str, ...] = ("node-0",)) -> Path:
    """A run directory as `fedpriv simulate` leaves it: config, metrics, server copy + node copy of each ledger."""
    run = tmp / "run"
    (run / "ledgers").mkdir(parents=True)
    rows = [{"round": r, "status": "ok", "nodes": {}} for r in range(1, rounds + 1)]
    for node in nodes:
        state = run / "nodes" / node / "state"
        key = load_or_create_node_key(state)
        led = Ledger(state / "ledger.jsonl", key)
        for r, row in enumerate(rows, start=1):
            eps = compute_epsilon([DpSgdRelease(sigma, Q, STEPS)] * r, delta=DELTA, accountant="prv")
            entry = led.append(_entry(r, eps, sigma=sigma, budget=budget, node=node))
            row["nodes"][node] = {"status": "ok", "epsilon": eps, "num-examples": N}
            with open(run / "ledgers" / f"{node}.jsonl", "ab") as f:
                f.write(canonical(entry) + b"\n")
        (run / "ledgers" / f"{node}.pub").write_bytes((state / "node_ed25519.pub").read_bytes())
    (run / "config.json").write_text(json.dumps({"fedpriv-run": RUN, "dp": True, "num-server-rounds": rounds,
                                                   "batch-size": BATCH}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("audit"))


@pytest.fixture
def run(clean_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(clean_run, dst)
    return dst


def _server_lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "ledgers" / "node-0.jsonl").read_text().splitlines()]


def _write_server(run: Path, entries: list[dict], *, also_node: bool = True) -> None:
    text = "".join(canonical(e).decode() + "\n" for e in entries)
    (run / "ledgers" / "node-0.jsonl").write_text(text)
    if also_node:  # an attacker who controls the platform rewrites both copies
        (run / "nodes" / "node-0" / "state" / "ledger.jsonl").write_text(text)
        (run / "nodes" / "node-0" / "state" / "ledger.jsonl.head").unlink(missing_ok=True)


def _failed(rep, check: str) -> list:
    return [f for f in rep.failures if f.check == check]


def test_recomputation_matches_independent_accountants_within_1_percent() -> None:
    rec = recompute_epsilon([(1.1, 256 / 60000, 14062)], delta=1e-5)
    assert rec["opacus_prv"] == pytest.approx(rec["dp_accounting_pld"], rel=0.01)
    assert rec["opacus_rdp"] == pytest.approx(rec["dp_accounting_rdp"], rel=0.01)


def test_clean_run_passes(clean_run: Path, capsys) -> None:
    rep = audit_run(clean_run)
    assert rep.passed, [str(f) for f in rep.failures]
    assert main(["audit", str(clean_run), "--json", str(clean_run / "a.json"), "--html", str(clean_run / "a.html")]) == 0
    assert json.loads((clean_run / "a.json").read_text())["passed"] is True
    assert (clean_run / "audit_epsilon.png").stat().st_size > 0
    assert "audit PASSED" in capsys.readouterr().out


def test_edited_epsilon_fails_and_names_the_entry(run: Path) -> None:
    entries = _server_lines(run)
    entries[1]["epsilon"] = 0.5
    _write_server(run, entries, also_node=False)
    rep = audit_run(run)
    assert any(f.entry == 1 for f in _failed(rep, "chain"))


def test_understated_epsilon_resigned_by_the_node_still_fails_recomputation(run: Path) -> None:
    def understate(e: dict) -> None:
        if e["round"] == 2:
            e["epsilon"] = e["epsilon"] / 2  # a node (or a bug) claiming less than it spent

    _resign(run, understate)
    rep = audit_run(run)
    assert [f.entry for f in _failed(rep, "epsilon")] == [1]
    assert not _failed(rep, "chain")


def test_edited_noise_multiplier_fails(run: Path) -> None:
    entries = _server_lines(run)
    entries[0]["noise_multiplier"] = 3.0
    _write_server(run, entries, also_node=False)
    rep = audit_run(run)
    assert any(f.entry == 0 for f in _failed(rep, "chain"))


def test_deleted_entry_fails(run: Path) -> None:
    entries = _server_lines(run)
    del entries[1]
    _write_server(run, entries)
    rep = audit_run(run)
    assert _failed(rep, "chain") and any("round 2" in f.message for f in _failed(rep, "rounds"))


def test_reordered_entries_fail(run: Path) -> None:
    entries = _server_lines(run)
    entries[0], entries[1] = entries[1], entries[0]
    _write_server(run, entries)
    rep = audit_run(run)
    assert _failed(rep, "chain") and _failed(rep, "rounds")


def test_server_copy_differing_from_node_copy_fails(run: Path) -> None:
    entries = _server_lines(run)
    _write_server(run, entries[:2], also_node=False)
    rep = audit_run(run)
    assert _failed(rep, "copies")


def test_forged_signature_and_wrong_public_key_fail(run: Path) -> None:
    other = Ed25519PrivateKey.generate()
    (run / "ledgers" / "node-0.pub").write_bytes(public_pem(other.public_key()))
    rep = audit_run(run)
    assert {f.entry for f in _failed(rep, "chain")} >= {0, 1, 2}


def test_trusted_pubkeys_dir_overrides_run_copies(run: Path, tmp_path: Path) -> None:
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "node-0.pub").write_bytes(public_pem(Ed25519PrivateKey.generate().public_key()))
    assert not audit_run(run, pubkeys=trusted).passed
    (trusted / "node-0.pub").write_bytes((run / "ledgers" / "node-0.pub").read_bytes())
    assert audit_run(run, pubkeys=trusted).passed


def test_overspent_budget_fails(tmp_path: Path) -> None:
    run = make_run(tmp_path, budget=0.5)
    rep = audit_run(run)
    assert _failed(rep, "budget") and main(["audit", str(run)]) == 1


def test_parameters_changed_mid_run_fail(tmp_path: Path) -> None:
    run = make_run(tmp_path, rounds=2)
    state = run / "nodes" / "node-0" / "state"
    led = Ledger(state / "ledger.jsonl", load_or_create_node_key(state))
    eps = compute_epsilon([DpSgdRelease(SIGMA, Q, STEPS)] * 2 + [DpSgdRelease(2.0, Q, STEPS)], delta=DELTA)
    e = led.append(_entry(3, eps, sigma=2.0))
    with open(run / "ledgers" / "node-0.jsonl", "ab") as f:
        f.write(canonical(e) + b"\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": 3, "nodes": {"node-0": {"status": "ok", "epsilon": eps}}}) + "\n")
    rep = audit_run(run)
    assert [f.entry for f in _failed(rep, "parameters")] == [2]


# ------------------------------------------------------------------- issue 13/15: audits that can fail


def _resign(run: Path, mutate) -> None:
    """Rewrite both copies, signed by the node's own key: what a node (or a bug in it) really recorded."""
    import base64

    key = load_or_create_node_key(run / "nodes" / "node-0" / "state")
    prev, out = "0" * 64, []
    for e in _server_lines(run):
        e = {k: v for k, v in e.items() if k not in ("hash", "signature")}
        mutate(e)
        e["prev_hash"] = prev
        e["hash"] = entry_hash(e)
        e["signature"] = base64.b64encode(key.sign(bytes.fromhex(e["hash"]))).decode()
        prev = e["hash"]
        out.append(e)
    _write_server(run, out)
    Ledger(run / "nodes" / "node-0" / "state" / "ledger.jsonl", key)._write_head(len(out), prev)


def test_a_fixed_noise_seed_fails_naming_it(run: Path) -> None:
    _resign(run, lambda e: e.update(noise_seed=5 if e["round"] == 2 else None))
    fails = _failed(audit_run(run), "mechanism")
    assert [f.entry for f in fails] == [1] and "fixed noise seed 5" in fails[0].message


def test_a_claim_above_the_budget_fails_with_zero_slack(tmp_path: Path) -> None:
    eps3 = compute_epsilon([DpSgdRelease(SIGMA, Q, STEPS)] * 3, delta=DELTA, accountant="prv")
    run = make_run(tmp_path, budget=eps3 * 0.999)  # 0.1 % over: the old 2 % slack let it pass
    fails = _failed(audit_run(run), "budget")
    assert fails and all(f.entry == 2 for f in fails)
    assert any(f.message.startswith("claimed ε=") for f in fails)


def test_a_sample_rate_inconsistent_with_n_and_batch_fails(run: Path) -> None:
    _resign(run, lambda e: e.update(num_examples=6400))  # q understated: the node trained on 640 records
    fails = _failed(audit_run(run), "mechanism")
    assert fails and "does not match n=6400" in fails[0].message or "reported num-examples=640" in fails[0].message
    assert any("sample rate 0.05 does not match n=6400" in f.message for f in fails)


def test_steps_executed_other_than_accounted_fail(run: Path) -> None:
    _resign(run, lambda e: e.update(steps_executed=STEPS + 5 if e["round"] == 3 else STEPS))
    fails = _failed(audit_run(run), "mechanism")
    assert [(f.entry, f.message) for f in fails] == [(2, f"round 3: {STEPS + 5} steps executed, {STEPS} accounted")]


def test_data_changed_mid_run_fails(run: Path) -> None:
    _resign(run, lambda e: e.update(dataset="e" * 64 if e["round"] == 3 else e["dataset"]))
    fails = _failed(audit_run(run), "parameters")
    assert [f.entry for f in fails] == [2] and "the node's data changed mid-run" in fails[0].message


def test_a_missing_node_ledger_fails(run: Path) -> None:
    (run / "ledgers" / "node-0.jsonl").unlink()
    fails = _failed(audit_run(run), "ledgers")
    assert fails and any("ledgers/node-0.jsonl is missing" in f.message for f in fails)


def test_a_ledger_cut_at_its_tail_with_its_head_fails(run: Path) -> None:
    state = run / "nodes" / "node-0" / "state"
    lines = (state / "ledger.jsonl").read_text().splitlines(keepends=True)
    (state / "ledger.jsonl").write_text("".join(lines[:-1]))
    (state / "ledger.head").unlink()
    rep = audit_run(run)
    assert any("ledger.head is missing" in f.message for f in _failed(rep, "copies"))
    assert any("1 extra entries" in f.message for f in _failed(rep, "copies"))


def test_a_partial_view_of_the_ledger_fails_and_says_what_it_covered(run: Path) -> None:
    entries = _server_lines(run)
    _write_server(run, entries[1:], also_node=False)  # the server saw this node from entry 1 on
    shutil.rmtree(run / "nodes")  # and the node's own ledger is not given
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = audit_run(run)
    fails = _failed(rep, "coverage")
    assert len(fails) == 1 and "covers only entries 1-2 of runs run123" in fails[0].message
    assert rep.nodes["node-0"]["accounted_entries"] == [1, 2] and rep.nodes["node-0"]["held_to_budget"] == \
        "dp_accounting_pld"


def test_a_run_directory_that_does_not_match_its_ledgers_fails(run: Path) -> None:
    """An edited config.json (another run id) or a deleted metrics.jsonl must not hide what the ledgers show."""
    _resign(run, lambda e: e.update(noise_seed=12345))
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "fedpriv-run": "other"}))
    (run / "metrics.jsonl").unlink()
    rep = audit_run(run)
    assert {f.check for f in rep.failures} >= {"run", "mechanism"}
    assert any("fixed noise seed 12345" in f.message for f in rep.failures)  # checked on every accounted entry
    assert any("metrics.jsonl is missing" in f.message for f in rep.failures)


def test_the_printed_line_counts_what_was_accounted_not_the_runs_copy(run: Path, capsys) -> None:
    """A node that trained in an earlier run: the run directory holds 2 entries, the recomputation covers 3."""
    _resign(run, lambda e: e.update(run="earlier-run" if e["round"] == 1 else RUN))
    _write_server(run, _server_lines(run)[1:], also_node=False)  # the coordinator saw this run only
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["audit", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"node-0: 3 entries accounted (entries 0-2, runs earlier-run, {RUN}), 2 in this run's copy, claimed ε " \
        in out, out
