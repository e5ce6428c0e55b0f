"""A real federation on 127.0.0.1: flower-superlink (TLS, node authentication, SQLite) and flower-supernodes.

Three registered SuperNodes hold encrypted datasets and train with DP; a fourth one, whose dataset key is
wrong, fails cleanly while the run completes; an unregistered SuperNode is refused. The SuperLink is killed
after round 1 and restarted, the run is started again on the same run directory and must resume (same run id,
rounds 2-3 from the second `flwr run`), and the final ledgers show every round once. Every process is started here and stopped by PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROUNDS = 3  # the SuperLink is killed after round 1: rounds 2 and 3 must come from the resumed run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Wait until ``proc`` listens on ``port``; fail at once, with its log, if it exits first."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on "
                               f"127.0.0.1:{port}:\n{log.read_text(errors='replace')[-4000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class Procs:
    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env, self.logdir, self.procs, self.logs = env, logdir, {}, []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop_all)
        self.logs.append(log)
        p = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        for log in self.logs:
            log.close()

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def test_tls_authenticated_federation_with_failures_and_resume(tmp_path: Path) -> None:
    from common import crypto
    from common.data import Schema, encode_records, to_records
    from deploy.certs import create_node_keypair, init_ca_and_server
    from simulations.partition import iid
    from simulations.synthetic import make_synthetic

    home = tmp_path / "flwr-home"
    home.mkdir()
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", FLWR_LOG_LEVEL="INFO",
               # flower-superlink starts flower-superexec by name: the venv's bin must be on PATH even when
               # pytest runs as .venv/bin/python without an activated venv (as `make test` and CI do).
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    certs = tmp_path / "certs"
    init_ca_and_server(certs, server_hosts=["localhost", "127.0.0.1"])
    names = ["n0", "n1", "n2", "badkey", "unregistered"]
    for n in names:
        create_node_keypair(certs, n)
    # ---- each institution's encrypted dataset and node config
    ds = make_synthetic(360, seed=3)
    schema = Schema("text", "label", "group")
    node_cfg: dict[str, str] = {}
    for name, idx in zip(names[:4], iid(len(ds), 4, seed=0), strict=True):
        d = tmp_path / "sites" / name
        d.mkdir(parents=True)
        key = d / "dataset.key"
        crypto.write_key_file(key, crypto.generate_key())
        blob = crypto.encrypt_bytes(encode_records(to_records(ds.subset(idx), schema=schema), fmt="jsonl"),
                                    key_source=crypto.KeySource.from_key_file(key), inner_name="data.jsonl")
        (d / "data.fpenc").write_bytes(blob)
        key_used = key
        if name == "badkey":
            key_used = d / "other.key"
            crypto.write_key_file(key_used, crypto.generate_key())
        node_cfg[name] = (f'node-name="{name}" data-path="{d / "data.fpenc"}" key-file="{key_used}" '
                          f'require-encryption=true epsilon=8.0 delta=1e-5 accountant="rdp" state-dir="{d / "state"}"')
    port = free_port()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedtest"\n\n[superlink.fedtest]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n')
    procs = Procs(env, tmp_path)
    superlink_cmd = [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
                     "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
                     "--enable-supernode-auth", "--database", str(tmp_path / "state.db"), "--host", "127.0.0.1",
                     "--port", str(port), "--disable-runtime-dependency-installation"]
    run_dir = tmp_path / "run"
    run_config = (f'num-server-rounds={ROUNDS} model="tiny" labels="negative,positive" group-col="group" '
                  f'out="{run_dir}" min-nodes=2 train-part="head" local-epochs=1 '
                  f'round-timeout=600.0 accountant="rdp"')
    try:
        link = procs.start("superlink", superlink_cmd)
        wait_port(port, link, tmp_path / "superlink.log")
        for n in names[:4]:
            r = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(certs / f"{n}.pub"), "fedtest"],
                               env=env, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
        for n in names[:4]:
            procs.start(n, [str(BIN / "flower-supernode"), "--root-certificates", str(certs / "ca.crt"),
                            "--auth-supernode-private-key", str(certs / n), "--superlink", f"127.0.0.1:{port}",
                            "--port", str(free_port()), "--node-config", node_cfg[n]])
        # An unregistered SuperNode is refused (Flower exits with code 305).
        rogue = procs.start("unregistered", [str(BIN / "flower-supernode"), "--root-certificates",
                                             str(certs / "ca.crt"), "--auth-supernode-private-key",
                                             str(certs / "unregistered"), "--superlink", f"127.0.0.1:{port}",
                                             "--port", str(free_port()), "--max-retries", "2"])
        assert rogue.wait(timeout=180) != 0, procs.log("unregistered")
        assert "Exit Code: 305" in procs.log("unregistered")
        assert "No SuperNode found with the given public key" in procs.log("superlink")

        def flwr_run() -> str:
            r = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "fedtest", "--run-config", run_config],
                               env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr
            found = re.findall(r"\b(\d{6,})\b", r.stdout + r.stderr)  # the Flower run id it started
            assert found, r.stdout + r.stderr
            return found[-1]

        flwr_run()
        end = time.time() + 600
        while len(_rows(run_dir)) < 1 and time.time() < end:
            time.sleep(0.2)
        assert len(_rows(run_dir)) >= 1, procs.log("superlink")
        # ---- the coordinator's SuperLink dies after round 1; it is restarted and the run started again.
        procs.stop("superlink", signal.SIGKILL)
        done_before = len(_rows(run_dir))
        run_id = json.loads((run_dir / "config.json").read_text())["fedpriv-run"]
        # The second `flwr run` must have something to resume (issue 15: the test could pass without resuming).
        assert done_before < ROUNDS, f"the first run finished {done_before} rounds before the kill"
        assert not (run_dir / "report.md").exists()
        link = procs.start("superlink2", superlink_cmd)
        wait_port(port, link, tmp_path / "superlink2.log")
        flower_run = flwr_run()
        end = time.time() + 900
        while not (run_dir / "report.md").exists() and time.time() < end:
            time.sleep(1.0)
        rows = _rows(run_dir)
        assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), procs.log("superlink2")
        # ... and it resumed rather than started over: same fedpriv run id in config.json and in every row (a
        # fresh start draws a new id and rewrites metrics.jsonl), rounds after the kill came from the second run
        assert json.loads((run_dir / "config.json").read_text())["fedpriv-run"] == run_id
        assert {r["run"] for r in rows} == {run_id}
        assert all(r["status"] == "ok" for r in rows)
        # The node with the wrong dataset key fails cleanly; the others train every round.
        for r in rows:
            assert set(r["nodes"]) == {"n0", "n1", "n2"}
            assert any("wrong key" in e["reason"] for e in r["errors"]), r["errors"]
        # Ledgers verify and show every round once, with no double spending after the restart.
        from common.ledger import load_public_key, verify_ledger

        for n in ("n0", "n1", "n2"):
            node_ledger = tmp_path / "sites" / n / "state" / "ledger.jsonl"
            key = load_public_key(tmp_path / "sites" / n / "state" / "node_ed25519.pub")
            own = verify_ledger(node_ledger, key)
            assert own.ok, own.problems
            assert [e["round"] for e in own.entries if e["kind"] == "dp-sgd"] == list(range(1, ROUNDS + 1))
            assert {e["run"] for e in own.entries} == {run_id}  # one run, resumed: every round once
            server_copy = verify_ledger(run_dir / "ledgers" / f"{n}.jsonl", key)
            assert [e["hash"] for e in server_copy.entries] == [e["hash"] for e in own.entries]
        # `flwr log` shows the coordinator the ServerApp's lines: the resume and every round after it (issue 17)
        shown = subprocess.run([str(BIN / "flwr"), "log", flower_run, "fedtest", "--show"], env=env,
                               capture_output=True, text=True, timeout=120)
        assert f"run={run_id} resuming after round " in shown.stdout + shown.stderr, shown.stdout[-3000:]
        assert f"run={run_id} round={ROUNDS} status=ok" in shown.stdout + shown.stderr, shown.stdout[-3000:]
        # Each SuperNode's output tells its institution what the node did, one INFO line per round (issue 17)
        for n in ("n0", "n1", "n2"):
            text = (tmp_path / f"{n}.log").read_text(errors="replace")
            for r in range(1, ROUNDS + 1):
                assert (f"round={r} node={n} trained" in text or f"round={r} node={n} re-sent" in text), text[-3000:]
        from audit.run import audit_run

        rep = audit_run(run_dir, node_ledgers=None)
        assert not [f for f in rep.failures if f.check in ("chain", "epsilon", "budget", "rounds")], \
            [str(f) for f in rep.failures]
    finally:
        procs.stop_all()
