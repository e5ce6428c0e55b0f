"""The commands `fedpriv certs` prints are the guide's (docs/deploy.md), complete, and they work as printed.

The fast tests compare the printed hints with the guide's single-machine trial and run the printed
connection-file command. The slow test runs the printed commands themselves on 127.0.0.1: the SuperLink
(TLS, node authentication, SQLite, no runtime dependency installation), the CLI connection, registration,
a SuperNode with its own FLWR_HOME and --port, and an unregistered node, whose refusal the SuperLink logs
with the line the guide quotes. Every process is started here and stopped by its PID (process group).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from deploy import commands
from fedpriv.cli import main

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GUIDE = ROOT / "docs" / "deploy.md"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _commands(text: str) -> list[str]:
    """Shell commands in printed or Markdown text: indented or code lines, continuations joined."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and not re.match(r"(export|printf|flower-|flwr |fedpriv |openssl |python )", line):
            continue
        pending += (" " if pending else "") + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            out.append(pending)
            pending = ""
    return out


def _hints(capsys, trial: Path, *, port: int = 8000, node_ports: tuple[int, int] = (9201, 9202)) -> dict:
    """What `fedpriv certs init` and `fedpriv certs node` (two sites) print for the guide's trial layout."""
    assert main(["certs", "init", str(trial / "coordinator" / "certs"), "--server-host", "127.0.0.1",
                 "--port", str(port)]) == 0
    out = {"init": capsys.readouterr().out}
    for site, p in zip(("site-a", "site-b"), node_ports, strict=True):
        assert main(["certs", "node", str(trial / site / "keys"), site, "--superlink", f"127.0.0.1:{port}",
                     "--port", str(p), "--data", str(trial / site / "notes.csv")]) == 0
        out[site] = capsys.readouterr().out
    return out


def test_printed_hints_are_the_guides_commands(tmp_path: Path, capsys) -> None:
    trial = tmp_path / "fedpriv-trial"
    hints = _hints(capsys, trial)
    guide = set(_commands(GUIDE.read_text().replace("'$T'", "$T")))
    printed = [c.replace(str(trial), "$T") for h in hints.values() for c in _commands(h)]
    printed = [c for c in printed if "NAME" not in c]  # "for each institution" placeholders, not commands
    assert len(printed) >= 14
    missing = [c for c in printed if c not in guide]
    assert not missing, "printed by fedpriv certs but not in docs/deploy.md:\n" + "\n".join(missing)


def test_printed_hints_are_complete(tmp_path: Path, capsys) -> None:
    hints = _hints(capsys, tmp_path)
    superlink = next(c for c in _commands(hints["init"]) if c.startswith("flower-superlink"))
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--database", "--disable-runtime-dependency-installation"):
        assert flag in superlink.split(), flag
    assert "--host 127.0.0.1 --port 8000" in superlink
    assert "127.0.0.1:443" not in hints["init"]  # no proxy on a single machine: the SuperLink's own port
    assert "fedpriv certs node keys NAME --superlink 127.0.0.1:8000" in hints["init"]
    node = next(c for c in _commands(hints["site-a"]) if c.startswith("flower-supernode"))
    cfg = shlex.split(node)[shlex.split(node).index("--node-config") + 1]
    for key in ("node-name=", "data-path=", "key-file=", "require-encryption=true", "epsilon=8", "delta=1e-5",
                "state-dir="):
        assert key in cfg, key
    assert "--superlink 127.0.0.1:8000 --port 9201" in node
    assert "127.0.0.1:443" not in hints["site-a"]
    for text in hints.values():  # FLWR_HOME before every Flower process of each role
        cmds = _commands(text)
        for i, c in enumerate(cmds):
            if c.startswith(("flower-superlink", "flower-supernode")):
                assert any(x.startswith("export FLWR_HOME=") for x in cmds[:i]), c


def test_certs_init_behind_a_proxy_points_nodes_at_the_proxy(tmp_path: Path, capsys) -> None:
    assert main(["certs", "init", str(tmp_path / "c"), "--server-host", "superlink.example.org"]) == 0
    out = capsys.readouterr().out
    assert "fedpriv certs node keys NAME --superlink superlink.example.org:443" in out
    assert "deploy/nginx-fleet-only.conf" in out
    assert commands.superlink_address("::1") == "127.0.0.1:8000"
    assert commands.superlink_address("2001:db8::5") == "[2001:db8::5]:443"


def test_printed_printf_writes_the_connection_file(tmp_path: Path, capsys) -> None:
    hints = _hints(capsys, tmp_path / "t", port=8123)
    cmds = _commands(hints["init"])
    script = " && ".join(c for c in cmds if c.startswith(("export FLWR_HOME", "printf ")))
    subprocess.run(["bash", "-c", script], check=True, env={"PATH": os.environ.get("PATH", "")})
    cfg = tomllib.loads((tmp_path / "t" / "coordinator" / "flwr-home" / "config.toml").read_text())
    ca = str(tmp_path / "t" / "coordinator" / "certs" / "ca.crt")
    assert cfg == {"superlink": {"default": "fed", "fed": {"address": "127.0.0.1:8123", "root-certificates": ca}}}


# ------------------------------------------------------------------------------- the single-machine trial

TRIAL_BLOCK = re.compile(r"<!-- terminal: ([\w-]+) -->\n```sh\n(.*?)```", re.S)


def _trial() -> list[tuple[int, str, str]]:
    """The guide's single-machine trial as (step, terminal, commands), in order; step 0 is the set-up."""
    text = GUIDE.read_text()
    section = text[text.index("## Try it on one machine"):text.index("\n## Coordinator\n")]
    blocks = list(TRIAL_BLOCK.finditer(section))
    assert len(blocks) == section.count("```sh"), "a trial block without its <!-- terminal: NAME --> line"
    out = []
    for m in blocks:
        steps = re.findall(r"^\*\*(\d+)\.", section[:m.start()], re.M)
        out.append((int(steps[-1]) if steps else 0, m.group(1), m.group(2)))
    return out


def _guide_env(trial: Path) -> dict[str, str]:
    """What the trial's set-up line gives every terminal: the venv's commands and ``T``."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT),
           "T": str(trial), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("FLWR_HOME", None)
    return env


def _run_config(step: int, trial: Path) -> dict:
    """The run config file that the step's ``printf`` writes, parsed."""
    block = next(c for s, _, c in _trial() if s == step and c.startswith("printf "))
    printf = block.splitlines()[0]
    (trial / "coordinator").mkdir(parents=True, exist_ok=True)  # step 1 made it
    subprocess.run(["bash", "-c", printf], check=True, env=_guide_env(trial))
    return tomllib.loads(Path(trial, printf.rsplit("> ", 1)[1].replace("$T/", "")).read_text())


def test_every_trial_block_names_its_terminal() -> None:
    terminals = [(s, term) for s, term, _ in _trial()]
    assert terminals[0] == (0, "every")
    assert {term for _, term in terminals} == {"every", "coordinator", "superlink", "site-a", "site-b", "site-c"}
    assert [s for s, _ in terminals] == sorted(s for s, _ in terminals)
    # the progress is watched in the logs: every run of the trial streams its ServerApp log
    runs = [c for _, _, b in _trial() for c in _commands(b) if c.startswith("flwr run ")]
    assert len(runs) == 3 and all(c.endswith(" --stream") for c in runs), runs


def test_the_trials_audit_steps_pass_as_written(tmp_path: Path) -> None:
    """Step 7's commands, run as written on real signed ledgers laid out as the trial leaves them."""
    from tests.test_audit import RUN, make_run

    trial = tmp_path / "fedpriv-trial"
    built = make_run(tmp_path / "built", nodes=("site-a", "site-b"))
    for site in ("site-a", "site-b"):  # each institution's state directory, and the coordinator's run directory
        (trial / site).mkdir(parents=True)
        shutil.move(built / "nodes" / site / "state", trial / site / "state")
    shutil.rmtree(built / "nodes")
    (trial / "coordinator" / "runs").mkdir(parents=True)
    shutil.move(built, trial / "coordinator" / "runs" / "trial")
    step7 = [(term, c) for s, term, c in _trial() if s == 7]
    assert [term for term, _ in step7] == ["site-a", "site-b", "coordinator"]
    for _, block in step7:
        r = subprocess.run(["bash", "-e", "-c", block], env=_guide_env(trial), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    assert "audit PASSED" in r.stdout, r.stdout
    for site in ("site-a", "site-b"):  # the coverage line the guide quotes
        line = f"{site}: 3 entries accounted (entries 0-2, runs {RUN}), 3 in this run's copy, claimed ε "
        assert line in r.stdout, r.stdout
    assert (trial / "coordinator" / "audit" / "audit.md").exists()


def test_the_trials_first_run_leaves_budget_for_the_resume_run(tmp_path: Path, server_task) -> None:
    """The guide's two run configs on one node with the guide's node budget: the second run still trains."""
    from common.config import RunConfig
    from common.model import ModelSpec, build_model, resolve_pooling, trainable_state
    from simulations.runner import SimOptions, prepare_nodes
    from tests.test_node_privacy import Node

    first, second = _run_config(6, tmp_path), _run_config(8, tmp_path)
    node = next(c for s, term, b in _trial() if s == 5 and term == "site-a" for c in _commands(b)
                if c.startswith("flower-supernode"))
    words = shlex.split(node.replace("'$T'", "/t"))
    node_cfg = dict(kv.split("=", 1) for kv in shlex.split(words[words.index("--node-config") + 1]))
    cfg = RunConfig(model=first["model"], labels=first["labels"], num_server_rounds=first["num-server-rounds"],
                    out=str(tmp_path / "run"))
    cfg, nodes_dir = prepare_nodes(cfg, SimOptions(nodes=1, synthetic_size=300, epsilon=float(node_cfg["epsilon"]),
                                                   delta=float(node_cfg["delta"])), tmp_path / "run")
    cfg = cfg.resolved()
    cfg = cfg.replace(pooling=resolve_pooling(cfg.pooling, cfg.model))
    arrays = trainable_state(build_model(ModelSpec(source="tiny", labels=tuple(cfg.label_names),
                                                   train_part=cfg.train_part, top_k_layers=cfg.top_k_layers,
                                                   pooling=cfg.pooling)))
    site = Node(cfg, nodes_dir, arrays)
    site.configure(share_cleaning_counts=False)  # the trial's node config: only the keys step 5 sets
    asked = float(first.get("epsilon", 0.0))  # 0: the node's whole budget
    for rnd in range(1, first["num-server-rounds"] + 1):
        _, info = site.train(run="first", rnd=rnd, epsilon=asked)
        assert info["status"] == "ok", info
        assert "error" not in site.evaluate(run="first", rnd=rnd, epsilon=asked)[1]
    assert site.ledger()[-1]["epsilon"] <= (asked or float(node_cfg["epsilon"]))
    _, info = site.train(run="second", rnd=1, epsilon=float(second.get("epsilon", 0.0)))
    assert info["status"] == "ok", info  # not "refusing to train: the target ε=... is already used up"


# ------------------------------------------------------------------------------------------ real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Shells:
    """Each printed command runs in its own bash (its role's exports first), in its own process group."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env, self.logdir, self.procs, self.files = env, logdir, {}, []

    def run(self, script: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", script], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.logdir, stdin=subprocess.DEVNULL)

    def start(self, name: str, exports: str, command: str) -> subprocess.Popen:
        """``exports`` then ``exec command``: the process keeps the PID that is stopped later."""
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop_all)
        self.files.append(log)
        p = subprocess.Popen(["bash", "-c", f"{exports}\nexec {command}"], env=self.env, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                             cwd=self.logdir)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return ANSI.sub("", path.read_text(errors="replace")) if path.exists() else ""

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=20)
                except ProcessLookupError:
                    pass
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)
        for f in self.files:
            f.close()


@pytest.mark.slow
def test_printed_commands_run_a_federation_and_refuse_an_unregistered_node(tmp_path: Path, capsys) -> None:
    from common.data import Schema, write_dataset
    from simulations.synthetic import make_synthetic

    trial = tmp_path / "trial"
    port, pa, pc = _free_port(), _free_port(), _free_port()
    hints = _hints(capsys, trial, port=port, node_ports=(pa, _free_port()))
    assert main(["certs", "node", str(trial / "site-c" / "keys"), "site-c", "--superlink", f"127.0.0.1:{port}",
                 "--port", str(pc)]) == 0
    hints["site-c"] = capsys.readouterr().out
    init, site_a, site_c = (_commands(hints[k]) for k in ("init", "site-a", "site-c"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("FLWR_HOME", None)
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)  # the printed SuperLink command must say it
    sh = _Shells(env, tmp_path)
    coordinator_home = next(c for c in init if c.startswith("export FLWR_HOME"))
    try:
        # the coordinator's shell: FLWR_HOME, the connection file, then flwr before the SuperLink is up
        r = sh.run(" && ".join(c for c in init if c.startswith(("export FLWR_HOME", "printf "))))
        assert r.returncode == 0, r.stderr
        home = trial / "coordinator" / "flwr-home"
        config = (home / "config.toml").read_text()
        r = sh.run(f"{coordinator_home} && flwr ls")
        assert r.returncode != 0 and "unavailable" in r.stdout + r.stderr, r.stdout + r.stderr
        assert (home / "config.toml").read_text() == config  # flwr did not rewrite it to a local connection
        assert not (home / "local-superlink").exists() and not _listening(39091)  # no stray local SuperLink

        link_cmd = next(c for c in init if c.startswith("flower-superlink"))
        link = sh.start("superlink", coordinator_home, link_cmd)
        end = time.monotonic() + 180
        while "Starting Flower SuperExec" not in sh.log("superlink"):
            assert link.poll() is None, sh.log("superlink")[-3000:]
            assert time.monotonic() < end, sh.log("superlink")[-3000:]
            time.sleep(0.5)

        # the institution's printed dataset commands, on a small demo file
        schema = Schema("text", "label", "group")
        write_dataset(make_synthetic(60, seed=1), trial / "site-a" / "notes.csv", schema=schema)
        for site in ("site-a", "site-c"):  # "the coordinator sends you ca.crt"
            (trial / site / "ca.crt").write_bytes((trial / "coordinator" / "certs" / "ca.crt").read_bytes())
        r = sh.run(" && ".join(c for c in site_a if c.startswith(("fedpriv dataset", "openssl "))).replace(
            "fedpriv ", f"{sys.executable} -m fedpriv "))
        assert r.returncode == 0, r.stdout + r.stderr
        assert (trial / "site-a" / "data.fpenc").stat().st_size > 0

        # the coordinator registers the key with the printed command, and the node starts as printed
        register = next(c for c in site_a if c.startswith("flwr supernode register"))
        r = sh.run(f"{coordinator_home} && {register}")
        assert r.returncode == 0 and "registered successfully" in r.stdout, r.stdout + r.stderr
        node_id = re.search(r"SuperNode (\d+) registered", r.stdout).group(1)
        node_home = next(c for c in site_a if c.startswith("export FLWR_HOME"))
        node = sh.start("site-a", node_home, next(c for c in site_a if c.startswith("flower-supernode")))
        end = time.monotonic() + 180
        while True:
            r = sh.run(f"{coordinator_home} && flwr supernode list fed --format json")
            nodes = json.loads(r.stdout[r.stdout.index("{"):])["nodes"] if "{" in r.stdout else []
            if any(str(n["node-id"]) == node_id and n["status"] == "online" for n in nodes):
                break
            assert node.poll() is None, sh.log("site-a")[-3000:]
            assert time.monotonic() < end, sh.log("site-a")[-3000:]
            time.sleep(1.0)
        assert (trial / "site-a" / "flwr-home").is_dir()

        # an unregistered key: the node's message reads like a network problem; the SuperLink's names the key
        c_home = next(c for c in site_c if c.startswith("export FLWR_HOME"))
        c_cmd = next(c for c in site_c if c.startswith("flower-supernode")) + " --max-retries 2"
        rogue = sh.start("site-c", c_home, c_cmd)
        try:
            assert rogue.wait(timeout=180) != 0
        except subprocess.TimeoutExpired:
            pytest.fail("unregistered SuperNode still running:\n" + sh.log("site-c")[-3000:])
        assert "Exit Code: 305" in sh.log("site-c") and "Failed to activate SuperNode." in sh.log("site-c")
        quoted = ("ERROR :     [/v1/fleet/activate-node][ApiError:2004] Attempted to register SuperNode with public "
                  "key: b'-----BEGIN PUBLIC KEY-----")
        assert quoted in sh.log("superlink"), sh.log("superlink")[-3000:]
        assert "exception: No SuperNode found with the given public key." in sh.log("superlink")
        assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in sh.log("superlink")
        guide = GUIDE.read_text()
        assert quoted in guide and "No SuperNode found with the given public key." in guide
        assert node.poll() is None and link.poll() is None
    finally:
        sh.stop_all()
    assert all(p.returncode is not None for p in sh.procs.values())


# ------------------------------------------------------------------------- the trial, followed to the letter

TRIAL_LAYOUT = [(0, "every"), (1, "coordinator"), (2, "superlink"), (3, "site-a"), (3, "site-b"), (4, "coordinator"),
                (5, "site-a"), (5, "site-b"), (6, "coordinator"), (7, "site-a"), (7, "site-b"), (7, "coordinator"),
                (8, "coordinator"), (8, "superlink"), (8, "coordinator"), (8, "site-a"), (8, "site-b"),
                (8, "coordinator"), (9, "site-c")]


def _logical(block: str) -> list[str]:
    """A block's commands as a shell reads them: continuation lines joined."""
    out, pending = [], ""
    for line in block.splitlines():
        pending += line + "\n"
        if not line.endswith("\\"):
            out.append(pending.rstrip("\n"))
            pending = ""
    return [c for c in out if c.strip()]


def _is_service(command: str) -> bool:
    """A command that keeps its terminal: the SuperLink, or a SuperNode that retries forever."""
    return command.startswith(("flower-superlink", "flower-supernode")) and "--max-retries" not in command


class _Terminals(_Shells):
    """The trial's terminals. Each keeps its exports and directory from block to block, as a shell does; a
    service (or a stream watched while something else happens) runs in its own process group."""

    def _state(self, term: str) -> Path:
        return self.logdir / f"{term}.state"

    def _prelude(self, term: str) -> str:
        st = self._state(term)
        return f"source {shlex.quote(str(st))}" if st.exists() else f"cd {shlex.quote(str(ROOT))}"

    def paste(self, term: str, commands: str, timeout: float = 900) -> str:
        """Paste ``commands`` into terminal ``term``; return what it printed (colour codes removed)."""
        st = shlex.quote(str(self._state(term)))
        script = (self._prelude(term) + "\n" + commands
                  + f'\nrc=$?\n{{ export -p; echo cd "$(pwd)"; }} > {st}.new && mv {st}.new {st}\nexit $rc\n')
        r = subprocess.run(["bash", "-c", script], env=self.env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        out = ANSI.sub("", r.stdout + r.stderr)
        with open(self.logdir / f"{term}.transcript", "a") as f:
            f.write(f"$ {commands}\n{out}[rc={r.returncode}]\n")
        return out

    def start_in(self, term: str, name: str, command: str) -> subprocess.Popen:
        return self.start(name, self._prelude(term), command)

    def wait_for(self, name: str, text: str, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while text not in self.log(name):
            p = self.procs[name]
            assert p.poll() is None, f"{name} exited ({p.returncode}) before {text!r}:\n{self.log(name)[-3000:]}"
            assert time.monotonic() < end, f"no {text!r} in {name}:\n{self.log(name)[-3000:]}"
            time.sleep(1.0)

    def ctrl_c(self, name: str, timeout: float = 30) -> int:
        """Ctrl-C in the service's terminal, again if it waits for connections (as the guide says)."""
        p = self.procs[name]
        for _ in range(2):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
                try:
                    return p.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"{name} did not stop on Ctrl-C twice:\n{self.log(name)[-3000:]}")


@pytest.mark.slow
def test_the_single_machine_trial_works_verbatim(tmp_path: Path) -> None:
    """docs/deploy.md's trial, every block pasted as written into its terminal (only the ports are free ones):
    the run's progress and its resume after a `kill -9` of the SuperLink show in the logs, both audits pass,
    the unregistered node is refused with the lines the guide quotes."""
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.skip("the trial activates the checkout's .venv (make test creates it)")
    blocks = _trial()
    assert [(s, term) for s, term, _ in blocks] == TRIAL_LAYOUT
    ports = {"8000": _free_port(), "9201": _free_port(), "9202": _free_port(), "9203": _free_port()}
    blocks = [(s, term, re.sub(r"\b(8000|9201|9202|9203)\b", lambda m: str(ports[m.group(1)]), b))
              for s, term, b in blocks]
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
           "PATH": os.environ.get("PATH", "")}
    for var in ("FLWR_HOME", "T", "VIRTUAL_ENV", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"):
        env.pop(var, None)
    sh = _Terminals(env, tmp_path)
    trial = tmp_path / "fedpriv-trial"
    step = iter(b for _, _, b in blocks)

    def services(term: str, block: str, name: str) -> None:
        cmds = _logical(block)
        before = [c for c in cmds if not _is_service(c)]
        if before:
            sh.paste(term, "\n".join(before))
        service = [c for c in cmds if _is_service(c)]
        assert len(service) == 1 and cmds[-1] == service[0], block
        sh.start_in(term, name, service[0])

    try:
        every = next(step)
        for term in ("coordinator", "superlink", "site-a", "site-b", "site-c"):
            sh.paste(term, every)
        out = sh.paste("coordinator", next(step))  # 1
        fingerprint = re.search(r"CA SHA-256 fingerprint: ([0-9A-F:]+)", out).group(1)
        services("superlink", next(step), "superlink")  # 2
        sh.wait_for("superlink", "Starting Flower SuperExec")
        for site in ("site-a", "site-b"):  # 3
            out = sh.paste(site, next(step))
            assert f"sha256 Fingerprint={fingerprint}" in out and (trial / site / "data.fpenc").exists(), out
        out = sh.paste("coordinator", next(step))  # 4
        assert out.count("registered successfully") == 2, out
        for site in ("site-a", "site-b"):  # 5
            services(site, next(step), site)
        end = time.monotonic() + 300
        while out.count('"status": "online"') < 2:
            assert time.monotonic() < end, sh.log("site-a")[-3000:] + sh.log("site-b")[-3000:]
            time.sleep(2.0)
            out = sh.paste("coordinator", "flwr supernode list fed --format json")

        # 6: the run's progress, in the coordinator's stream and in each SuperNode's output
        out = sh.paste("coordinator", next(step))
        assert "Successfully started run" in out, out
        run1 = re.search(r"fedpriv\.server: run=(\w+) starting in ", out).group(1)
        for r in (1, 2, 3):
            assert f"run={run1} round={r} node=site-a trained n=240 eps=" in out, out[-3000:]
            assert f"run={run1} round={r} status=ok" in out, out[-3000:]
            for site in ("site-a", "site-b"):
                assert f"fedpriv.client: run={run1} round={r} node={site} trained n=240 steps=" in sh.log(site)
        assert "finished:completed" in out and f"run {run1} in {trial}/coordinator/runs/trial: 3/3 rounds (finished)" \
            in out, out[-3000:]
        assert (trial / "coordinator" / "runs" / "trial" / "report.md").exists()

        # 7: each institution sends its files; the audit passes and says what it covered
        for term in ("site-a", "site-b", "coordinator"):
            out = sh.paste(term, next(step))
        assert "audit PASSED" in out, out
        assert re.search(rf"^site-a: 6 entries accounted \(entries 0-5, runs {run1}\), 6 in this run's copy, ", out,
                         re.M), out

        # 8: a second run; the SuperLink is killed (-9) once round 1 is in, restarted, and the run resumes
        printf, flwr_run = _logical(next(step))
        sh.paste("coordinator", printf)
        sh.start_in("coordinator", "stream", flwr_run)
        sh.wait_for("stream", "round=1 status=ok")
        run2 = re.search(r"fedpriv\.server: run=(\w+) starting in ", sh.log("stream")).group(1)
        assert run2 != run1
        os.kill(sh.procs["superlink"].pid, signal.SIGKILL)
        # reaped at once, as by the terminal's shell: Flower's SuperExec and ServerApp watch their parent's PID, and
        # a dead but unreaped SuperLink would keep the old ServerApp running the run beside the resumed one
        sh.procs["superlink"].wait(timeout=30)
        assert sh.procs["stream"].wait(timeout=120) != 0
        assert "Connection to the SuperLink is unavailable" in sh.log("stream"), sh.log("stream")[-3000:]
        services("superlink", next(step), "superlink-again")
        sh.wait_for("superlink-again", "Starting Flower SuperExec")
        out = sh.paste("coordinator", next(step))
        resumed = re.search(rf"run={run2} resuming after round (\d+) from ", out)
        assert resumed, out[-3000:]
        after = int(resumed.group(1))
        assert after >= 1 and "round=1 status=ok" not in out
        for r in range(after + 1, 4):
            assert f"run={run2} round={r} status=ok" in out, out[-3000:]
        assert f"run {run2} in {trial}/coordinator/runs/resume: 3/3 rounds (finished)" in out, out[-3000:]
        for site in ("site-a", "site-b"):  # every round once per node: trained, or re-sent after the restart
            for r in (1, 2, 3):
                assert re.search(rf"run={run2} round={r} node={site} (trained|re-sent its stored update for this "
                                 r"round \(no new training, no new ε\))", sh.log(site)), sh.log(site)[-3000:]
        for term in ("site-a", "site-b", "coordinator"):
            out = sh.paste(term, next(step))
        assert "audit PASSED" in out, out
        runs = ", ".join(sorted((run1, run2)))
        assert re.search(rf"^site-b: 12 entries accounted \(entries 0-11, runs {runs}\), 6 in this run's copy, ",
                         out, re.M), out

        # 9: an unregistered node is refused; the SuperLink's log names the key
        out = sh.paste("site-c", next(step), timeout=180)
        assert "Exit Code: 305" in out and "Failed to activate SuperNode." in out, out[-3000:]
        assert "exception: No SuperNode found with the given public key." in sh.log("superlink-again")
        assert next(step, None) is None

        # clean up: Ctrl-C in each terminal
        for name in ("site-a", "site-b", "superlink-again"):
            sh.ctrl_c(name)
        assert not (trial / "coordinator" / "flwr-home" / "local-superlink").exists()
    finally:
        sh.stop_all()
