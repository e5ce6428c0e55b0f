"""The privacy ledger: every kind of tampering is detected and named; keys are created safely."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.ledger import (
    Ledger,
    canonical,
    entry_hash,
    load_or_create_node_key,
    load_public_key,
    verify_ledger,
)
from fedpriv.cli import main


def _fields(r: int, eps: float) -> dict:
    return {"schema": 1, "kind": "dp-sgd", "run": "r1", "round": r, "node": "node-0", "dataset": "ab" * 32,
            "accountant": "prv", "delta": 1e-5, "noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 100,
            "clipping_norm": 1.0, "epsilon": eps, "epsilon_round": 0.5, "budget_epsilon": 8.0,
            "noise_seed": None, "time": "2026-11-28T00:00:00+00:00"}


@pytest.fixture
def ledger(tmp_path: Path) -> tuple[Path, Path]:
    state = tmp_path / "state"
    key = load_or_create_node_key(state)
    led = Ledger(state / "ledger.jsonl", key)
    for r, eps in ((1, 1.0), (2, 1.6), (3, 2.1)):
        led.append(_fields(r, eps))
    return state / "ledger.jsonl", state / "node_ed25519.pub"


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(x + "\n" for x in lines))


def _verify(path: Path, pub: Path, **kw):
    return verify_ledger(path, load_public_key(pub), **kw)


def test_fresh_ledger_verifies_and_chains(ledger) -> None:
    path, pub = ledger
    res = _verify(path, pub)
    assert res.ok, res.problems
    assert [e["index"] for e in res.entries] == [0, 1, 2]
    assert res.entries[0]["prev_hash"] == "0" * 64
    assert res.entries[1]["prev_hash"] == res.entries[0]["hash"] == entry_hash(res.entries[0])


def test_private_key_is_0600_and_group_readable_key_is_refused(tmp_path: Path) -> None:
    load_or_create_node_key(tmp_path)
    key_path = tmp_path / "node_ed25519.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert (tmp_path / "node_ed25519.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    key_path.chmod(0o640)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_or_create_node_key(tmp_path)


def test_edited_epsilon_is_detected_and_named(ledger) -> None:
    path, pub = ledger
    lines = _lines(path)
    e = json.loads(lines[1])
    e["epsilon"] = 0.1
    lines[1] = canonical(e).decode()
    _write(path, lines)
    res = _verify(path, pub)
    assert not res.ok and any(p.index == 1 and "edited" in p.message for p in res.problems)


def test_edited_noise_multiplier_recomputed_hash_still_fails_signature(ledger) -> None:
    path, pub = ledger
    lines = _lines(path)
    e = json.loads(lines[0])
    e["noise_multiplier"] = 5.0
    e["hash"] = entry_hash(e)  # an attacker can recompute the hash, not the signature
    lines[0] = canonical(e).decode()
    _write(path, lines)
    res = _verify(path, pub)
    assert any(p.index == 0 and "signature" in p.message for p in res.problems)
    assert any(p.index == 1 and "prev_hash" in p.message for p in res.problems)


@pytest.mark.parametrize("change", ["delete-middle", "reorder", "insert-duplicate"])
def test_structure_changes_are_detected(ledger, change: str) -> None:
    path, pub = ledger
    lines = _lines(path)
    if change == "delete-middle":
        del lines[1]
    elif change == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines.insert(2, lines[1])
    _write(path, lines)
    res = _verify(path, pub)
    assert not res.ok
    assert any("deleted, inserted or reordered" in p.message or "chain is broken" in p.message for p in res.problems)


def test_truncation_is_detected_against_the_signed_head_and_anchors(ledger) -> None:
    path, pub = ledger
    full = _verify(path, pub)
    _write(path, _lines(path)[:2])
    assert not _verify(path, pub).ok  # ledger.jsonl.head says 3 entries
    path.with_name(path.name + ".head").unlink()
    assert _verify(path, pub).ok  # without any anchor a clean prefix is indistinguishable
    assert not _verify(path, pub, expected_count=3).ok
    assert not _verify(path, pub, expected_head=full.head).ok


def test_forged_signature_and_wrong_public_key(ledger, tmp_path: Path) -> None:
    path, pub = ledger
    other = Ed25519PrivateKey.generate()
    res = verify_ledger(path, other.public_key())
    assert not res.ok and all("signature" in p.message for p in res.problems if p.index is not None)
    forged = Ledger(tmp_path / "forged.jsonl", other)
    for r in (1, 2):
        forged.append(_fields(r, 0.1))
    res = _verify(tmp_path / "forged.jsonl", pub)
    assert {p.index for p in res.problems if "signature" in p.message} == {0, 1}


def test_appending_onto_a_broken_chain_is_refused(ledger) -> None:
    path, pub = ledger
    lines = _lines(path)
    del lines[0]
    _write(path, lines)
    key = load_or_create_node_key(path.parent)
    with pytest.raises(ValueError, match="refusing to append"):
        Ledger(path, key).append(_fields(4, 3.0))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=0, max_value=10_000), new=st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_is_detected(ledger, pos: int, new: int) -> None:
    path, pub = ledger
    original = path.read_bytes()
    data = bytearray(original)
    i = pos % len(data)
    if data[i] == new:
        new = (new + 1) % 256
    data[i] = new
    path.write_bytes(bytes(data))
    try:
        res = _verify(path, pub)
        assert not res.ok, f"byte {i} changed to {new} went unnoticed"
    finally:
        path.write_bytes(original)


def test_cli_verify_ok_and_tampered(ledger, capsys) -> None:
    path, pub = ledger
    assert main(["ledger", "verify", str(path), "--pubkey", str(pub)]) == 0
    assert "OK, 3 entries" in capsys.readouterr().out
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    _write(path, lines)
    assert main(["ledger", "verify", str(path), "--pubkey", str(pub)]) == 1
    err = capsys.readouterr().err
    assert "line 2 (entry 2)" in err
