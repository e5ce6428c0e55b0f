"""`fedpriv certs`: a CA that signs the SuperLink certificate with the right SANs; node keys in Flower's format.

The slow tests start a real flower-superlink (TLS from these certificates, node authentication, SQLite) on
127.0.0.1, register a node key with `flwr supernode register`, and check that the registered SuperNode comes
online while an unregistered one is refused (Flower exit code 305). With nginx installed, the shipped
deploy/nginx-fleet-only.conf is run in front of it: Fleet traffic passes, the Control API does not.
Every process is started here and stopped by PID.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from common.fsutil import ERR_OUT_IS_INPUT, ERR_OUT_NOT_FILE, ERR_OUT_SYMLINK
from deploy.certs import (
    ERR_NO_HOSTS,
    certificate_fingerprint,
    create_node_keypair,
    init_ca_and_server,
    ssh_public_key_fingerprint,
)
from fedpriv.cli import main

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _sans(cert: x509.Certificate) -> tuple[list[str], list]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.IPAddress)


# ------------------------------------------------------------------------------------------ certificates


def test_ca_signs_server_certificate_with_sans_and_server_auth(tmp_path: Path) -> None:
    paths = init_ca_and_server(tmp_path / "c", server_hosts=["superlink.example.org", "10.0.0.5"])
    assert set(paths) == {"ca.crt", "ca.key", "server.pem", "server.key"}
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    srv = x509.load_pem_x509_certificate(paths["server.pem"].read_bytes())
    srv.verify_directly_issued_by(ca)  # raises if the signature or issuer do not match
    dns, ips = _sans(srv)
    assert dns == ["superlink.example.org", "localhost"]  # given names first; loopback always added
    assert ips == [ipaddress.ip_address(a) for a in ("10.0.0.5", "127.0.0.1", "::1")]
    assert ExtendedKeyUsageOID.SERVER_AUTH in srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    ku = srv.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical and ca_bc.value.ca is True and ca_bc.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert isinstance(srv.public_key(), ec.EllipticCurvePublicKey) and srv.public_key().curve.name == "secp384r1"
    assert (srv.not_valid_after_utc - srv.not_valid_before_utc).days in (825, 824)
    assert _mode(paths["ca.key"]) == 0o600 and _mode(paths["server.key"]) == 0o600
    assert _mode(paths["ca.crt"]) == 0o644 and _mode(paths["server.pem"]) == 0o644
    assert _mode(tmp_path / "c") == 0o700


def test_full_chain_verifies_with_a_tls_policy_for_every_name(tmp_path: Path) -> None:
    from cryptography.x509.verification import PolicyBuilder, Store

    paths = init_ca_and_server(tmp_path, server_hosts=["superlink.example.org"], days=30)
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    srv = x509.load_pem_x509_certificate(paths["server.pem"].read_bytes())
    for name in (x509.DNSName("superlink.example.org"), x509.DNSName("localhost"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = PolicyBuilder().store(Store([ca])).build_server_verifier(name).verify(srv, [])
        assert chain[-1] == ca
    from cryptography.x509.verification import VerificationError

    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("evil.example.org")).verify(srv, [])


def test_python_ssl_accepts_the_pair(tmp_path: Path) -> None:
    """What uvicorn (flower-superlink) loads and what httpx (flower-supernode, flwr) verifies with."""
    paths = init_ca_and_server(tmp_path, server_hosts=["localhost"])
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(paths["server.pem"], paths["server.key"])
    ssl.create_default_context(cafile=str(paths["ca.crt"]))


def test_no_loopback_gives_exactly_the_given_names(tmp_path: Path) -> None:
    paths = init_ca_and_server(tmp_path, server_hosts=["SuperLink.Example.org.", "*.fed.example.org", "fd00::1"],
                               include_loopback=False)
    dns, ips = _sans(x509.load_pem_x509_certificate(paths["server.pem"].read_bytes()))
    assert dns == ["superlink.example.org", "*.fed.example.org"]
    assert ips == [ipaddress.ip_address("fd00::1")]


@pytest.mark.parametrize("host", ["https://superlink.example.org", "superlink.example.org:8000", "[::1]",
                                  "bad_name.org", "-x.org", "a b", "10.0.5", "999.1.1.1", "*", "*.org", "a..b"])
def test_rejects_what_is_not_a_host(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="^--server-host"):
        init_ca_and_server(tmp_path / "c", server_hosts=[host])
    assert not (tmp_path / "c").exists()


def test_refuses_to_overwrite_and_requires_hosts(tmp_path: Path) -> None:
    first = init_ca_and_server(tmp_path, server_hosts=["localhost"])
    before = {k: p.read_bytes() for k, p in first.items()}
    with pytest.raises(FileExistsError, match="ca.crt: already exists"):
        init_ca_and_server(tmp_path, server_hosts=["localhost"])
    assert {k: p.read_bytes() for k, p in first.items()} == before
    init_ca_and_server(tmp_path, server_hosts=["localhost"], overwrite=True)
    assert first["ca.key"].read_bytes() != before["ca.key"] and _mode(first["ca.key"]) == 0o600
    # one leftover file blocks the whole set, and is named; nothing else gets written
    other = tmp_path / "o"
    other.mkdir(mode=0o755)
    (other / "server.key").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"server\.key: already exists"):
        init_ca_and_server(other, server_hosts=["localhost"])
    assert sorted(p.name for p in other.iterdir()) == ["server.key"]
    assert _mode(other) == 0o755  # an existing directory is left as it is
    for hosts in ([], ["", "  "]):
        with pytest.raises(ValueError) as info:
            init_ca_and_server(tmp_path / "x", server_hosts=hosts)
        assert str(info.value) == ERR_NO_HOSTS
    with pytest.raises(ValueError, match="--days"):
        init_ca_and_server(tmp_path / "x", server_hosts=["localhost"], days=0)
    assert not (tmp_path / "x").exists()


def test_private_keys_stay_private_under_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        paths = init_ca_and_server(tmp_path / "c", server_hosts=["localhost"])
        priv, _ = create_node_keypair(tmp_path / "k", "n")
    finally:
        os.umask(old)
    assert _mode(paths["ca.key"]) == _mode(paths["server.key"]) == _mode(priv) == 0o600
    assert _mode(tmp_path / "c") == _mode(tmp_path / "k") == 0o700


# ------------------------------------------------------------------------------------------ node keys


def test_node_keypair_loads_the_way_flower_loads_it(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    priv, pub = create_node_keypair(tmp_path / "keys", "site-a")
    assert _mode(priv) == 0o600 and _mode(pub) == 0o644 and _mode(tmp_path / "keys") == 0o700
    key = load_ssh_private_key(priv.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(pub.read_bytes()).public_numbers() == key.public_key().public_numbers()
    # Flower's own loaders: flower-supernode --auth-supernode-private-key and flwr supernode register
    ns = argparse.Namespace(auth_supernode_private_key=str(priv), auth_supernode_public_key=None)
    flower_priv, flower_pub = _try_setup_client_authentication(ns)
    assert flower_pub.public_numbers() == key.public_key().public_numbers()
    assert try_load_public_key(pub) == public_key_to_bytes(flower_pub)
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ") and pub.read_text().endswith(" fedpriv-node-site-a\n")


def test_node_keypair_refuses_overwrite_and_bad_names(tmp_path: Path) -> None:
    priv, pub = create_node_keypair(tmp_path, "site-a")
    old = priv.read_bytes()
    with pytest.raises(FileExistsError, match="site-a: already exists"):
        create_node_keypair(tmp_path, "site-a")
    pub.unlink()
    with pytest.raises(FileExistsError, match="site-a: already exists"):  # the private key alone blocks too
        create_node_keypair(tmp_path, "site-a")
    assert priv.read_bytes() == old
    create_node_keypair(tmp_path, "site-a", overwrite=True)
    assert priv.read_bytes() != old and pub.exists()
    for bad in ("../evil", "a/b", ".hidden", "", "x.pub", "a b"):
        with pytest.raises(ValueError, match="node name"):
            create_node_keypair(tmp_path, bad)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_fingerprints_match_the_standard_tools(tmp_path: Path) -> None:
    priv, pub = create_node_keypair(tmp_path, "n")
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout
    assert ssh_public_key_fingerprint(pub) == out.split()[1]
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(priv)], capture_output=True, text=True, check=True)
    assert derived.stdout.split()[:2] == pub.read_text().split()[:2]  # OpenSSH itself reads the private key
    ca = init_ca_and_server(tmp_path / "c", server_hosts=["localhost"])["ca.crt"]
    if shutil.which("openssl"):
        out = subprocess.run(["openssl", "x509", "-in", str(ca), "-noout", "-fingerprint", "-sha256"],
                             capture_output=True, text=True, check=True).stdout
        assert out.strip().split("=", 1)[1] == certificate_fingerprint(ca)


# ------------------------------------------------------------------------------------------ CLI


def test_cli(tmp_path: Path, capsys) -> None:
    c = tmp_path / "c"
    assert main(["certs", "init", str(c), "--server-host", "superlink.example.org", "--server-host", "10.0.0.5",
                 "--days", "30"]) == 0
    out = capsys.readouterr().out
    assert f"--ssl-ca-certfile {c}/ca.crt --ssl-certfile {c}/server.pem --ssl-keyfile {c}/server.key" in out
    assert "--enable-supernode-auth" in out and "--superlink superlink.example.org:443" in out
    assert "--disable-runtime-dependency-installation" in out and f"--database {tmp_path}/state.db" in out
    assert f"export FLWR_HOME={tmp_path}/flwr-home" in out and "/config.toml" in out
    assert certificate_fingerprint(c / "ca.crt") in out
    srv = x509.load_pem_x509_certificate((c / "server.pem").read_bytes())
    assert _sans(srv)[0] == ["superlink.example.org", "localhost"]
    assert main(["certs", "node", str(tmp_path / "k"), "n0"]) == 0
    out = capsys.readouterr().out
    assert f"flwr supernode register {tmp_path}/k/n0.pub fed --name n0" in out
    assert f"--auth-supernode-private-key {tmp_path}/k/n0" in out
    assert f'node-name="n0" data-path="{tmp_path}/data.fpenc" key-file="{tmp_path}/dataset.key" ' \
           f'require-encryption=true epsilon=8 delta=1e-5 state-dir="{tmp_path}/state"' in out
    assert f"export FLWR_HOME={tmp_path}/flwr-home" in out
    assert "SUPERLINK_HOST:PORT" in out  # no invented address without --superlink
    assert ssh_public_key_fingerprint(tmp_path / "k" / "n0.pub") in out
    assert main(["certs", "init", str(tmp_path / "nl"), "--server-host", "sl.example.org", "--no-loopback"]) == 0
    capsys.readouterr()
    assert _sans(x509.load_pem_x509_certificate((tmp_path / "nl" / "server.pem").read_bytes())) == (
        ["sl.example.org"], [])


@pytest.mark.parametrize(("argv", "needle"), [
    (["certs", "node", "{t}/c", "n0"], "n0: already exists; pass --force"),
    (["certs", "init", "{t}/c", "--server-host", "localhost"], "ca.crt: already exists; pass --force"),
    (["certs", "init", "{t}/d"], "--server-host"),
    (["certs", "init", "{t}/d", "--server-host", "h:80"], "--server-host 'h:80'"),
    (["certs", "init", "{t}/d", "--server-host", "h", "--days", "-1"], "--days -1"),
    (["certs", "node", "{t}/c", "../x"], "node name '../x'"),
    (["certs", "node", "{t}/c/ca.crt", "x"], "ca.crt: exists and is not a directory"),
])
def test_cli_errors_are_one_line(tmp_path: Path, capsys, argv: list[str], needle: str) -> None:
    assert main(["certs", "init", str(tmp_path / "c"), "--server-host", "localhost"]) == 0
    assert main(["certs", "node", str(tmp_path / "c"), "n0"]) == 0
    capsys.readouterr()
    assert main([a.replace("{t}", str(tmp_path)) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpriv certs: ") and needle in lines[0], captured.err
    assert not (tmp_path / "d").exists()


def test_cli_force_and_help(tmp_path: Path, capsys) -> None:
    assert main(["certs", "node", str(tmp_path), "n0"]) == 0
    assert main(["certs", "node", str(tmp_path), "n0", "--force"]) == 0
    assert main(["certs"]) == 2
    assert "init" in capsys.readouterr().out


# --force replaces ordinary files only (docs/safety.md): the same refusals and messages as `fedpriv dataset`.
COMMANDS = {"init": (["certs", "init", "{dir}", "--server-host", "localhost", "--force"], "ca.key"),
            "node": (["certs", "node", "{dir}", "n0", "--force"], "n0")}


def _one_error(capsys, message: str) -> None:
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == ["fedpriv certs: " + message], captured.err


def _argv(command: str, directory: Path, *extra: str) -> list[str]:
    return [a.replace("{dir}", str(directory)) for a in COMMANDS[command][0]] + list(extra)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_force_never_replaces_what_is_not_an_ordinary_file(tmp_path: Path, capsys, command: str, kind: str) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    keys = tmp_path / "keys"
    keys.mkdir()
    target = keys / COMMANDS[command][1]
    if kind == "symlink":
        target.symlink_to(victim)
        message = ERR_OUT_SYMLINK.format(out=target)
    elif kind == "fifo":
        os.mkfifo(target)
        message = ERR_OUT_NOT_FILE.format(out=target, kind="a FIFO (named pipe)")
    else:
        target.mkdir()
        message = ERR_OUT_NOT_FILE.format(out=target, kind="a directory")
    assert main(_argv(command, keys)) == 2
    _one_error(capsys, message)
    assert [p.name for p in keys.iterdir()] == [target.name]  # nothing written, the target untouched
    assert victim.read_text() == "keep me" and os.path.lexists(target)
    assert target.is_symlink() == (kind == "symlink") and stat.S_ISFIFO(os.lstat(target).st_mode) == (kind == "fifo")


def test_force_never_replaces_a_device(tmp_path: Path, capsys) -> None:
    """As root a device node is made in tmp_path (deleting it, as --force did, would be harmless); otherwise
    /dev/null itself, which a user other than root could not have deleted either."""
    try:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        device = tmp_path / "null"
    except PermissionError:
        device = Path("/dev/null")
    assert main(["certs", "node", str(device.parent), "null", "--force"]) == 2
    _one_error(capsys, ERR_OUT_NOT_FILE.format(out=device, kind="a character device"))
    assert stat.S_ISCHR(os.lstat(device).st_mode) and not (device.parent / "null.pub").exists()


@pytest.mark.parametrize("which", ["n0", "n0.pub"])
def test_force_never_replaces_the_data_file(tmp_path: Path, capsys, which: str) -> None:
    """`certs node DIR NAME --data FILE`: neither key file may be the dataset, also through a hard link."""
    data = tmp_path / "data.csv"
    data.write_text("text,label\nhello,positive\n")
    os.link(data, tmp_path / which)
    assert main(["certs", "node", str(tmp_path), "n0", "--data", str(data), "--force"]) == 2
    _one_error(capsys, ERR_OUT_IS_INPUT.format(out=tmp_path / which, what="the --data file", inp=data))
    assert data.read_text() == "text,label\nhello,positive\n"
    assert main(["certs", "node", str(tmp_path), "data.csv", "--data", str(data), "--force"]) == 2
    _one_error(capsys, ERR_OUT_IS_INPUT.format(out=data, what="the --data file", inp=data))
    assert data.read_text() == "text,label\nhello,positive\n"


def test_force_replaces_atomically(tmp_path: Path, capsys, monkeypatch) -> None:
    """A write that fails under --force leaves the earlier files as they were, and no temporary file."""
    assert main(["certs", "init", str(tmp_path), "--server-host", "localhost"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def no_space(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    assert main(["certs", "init", str(tmp_path), "--server-host", "localhost", "--force"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    assert main(["certs", "init", str(tmp_path), "--server-host", "localhost", "--force"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == set(before) and (tmp_path / "ca.key").read_bytes() != before["ca.key"]
    assert _mode(tmp_path / "ca.key") == 0o600 and _mode(tmp_path / "ca.crt") == 0o644


# ------------------------------------------------------------------------------------------ real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Procs:
    """Processes started by a test, each in its own session; stopped by PID (terminate, wait, kill)."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env, self.logdir, self.procs = env, logdir, {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.logdir / f"{name}.log", "ab") as log:
            p = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, cwd=self.logdir)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        try:  # children it started in its session (a SuperNode's flower-superexec), if still there
            os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def _wait_tls(port: int, ca: Path, proc: subprocess.Popen, *, timeout: float = 90) -> None:
    """Until a TLS handshake that verifies the certificate against ca.crt for localhost and 127.0.0.1 works."""
    ctx = ssl.create_default_context(cafile=str(ca))
    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before accepting TLS")
        try:
            for name in ("localhost", "127.0.0.1"):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                        ctx.wrap_socket(raw, server_hostname=name) as tls:
                    assert tls.version() in ("TLSv1.2", "TLSv1.3")
            return
        except (ConnectionError, TimeoutError, OSError):
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


def _post(url: str, ca: Path, body: bytes = b"") -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/protobuf"})
    try:
        with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=str(ca)), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


class _Federation:
    """flower-superlink with TLS (certs from fedpriv) + node auth + SQLite, a flwr connection, node keys."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.certs = tmp_path / "certs"
        init_ca_and_server(self.certs, server_hosts=["localhost"])  # 127.0.0.1 comes from the loopback default
        self.keys = tmp_path / "keys"
        self.home = tmp_path / "flwr-home"
        self.home.mkdir()
        self.port = _free_port()
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONUNBUFFERED": "1"}
        self.connections = {"fedtest": self.port}
        self.procs = _Procs(self.env, tmp_path)

    def write_config(self) -> None:
        text = '[superlink]\ndefault = "fedtest"\n'
        for name, port in self.connections.items():
            text += (f'\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\n'
                     f'root-certificates = "{self.certs / "ca.crt"}"\n')
        (self.home / "config.toml").write_text(text)

    def start_superlink(self) -> None:
        self.write_config()
        c = self.certs
        p = self.procs.start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile",
            str(c / "server.pem"), "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth",
            "--database", str(self.tmp / "state.db"), "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation"])
        try:
            _wait_tls(self.port, c / "ca.crt", p)
        except (AssertionError, OSError) as exc:
            raise AssertionError(f"{exc}\n{self.procs.log('superlink')[-3000:]}") from exc

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.tmp, stdin=subprocess.DEVNULL)

    def register(self, name: str, connection: str = "fedtest") -> dict:
        """`flwr supernode register KEY.pub CONNECTION --format json` (exits 0 either way; see "success")."""
        r = self.flwr("supernode", "register", str(self.keys / f"{name}.pub"), connection, "--name", name,
                      "--format", "json")
        assert r.returncode == 0 and "{" in r.stdout, r.stdout + r.stderr
        return json.loads(r.stdout[r.stdout.index("{"):])

    def start_supernode(self, name: str, superlink: str) -> subprocess.Popen:
        if not (self.keys / name).exists():
            create_node_keypair(self.keys, name)
        return self.procs.start(name, [
            str(BIN / "flower-supernode"), "--root-certificates", str(self.certs / "ca.crt"),
            "--auth-supernode-private-key", str(self.keys / name), "--superlink", superlink,
            "--port", str(_free_port()), "--max-retries", "3"])

    def online_nodes(self) -> set[str]:
        r = self.flwr("supernode", "list", "fedtest", "--format", "json")
        assert r.returncode == 0, r.stdout + r.stderr
        return {str(n["node-id"]) for n in json.loads(r.stdout)["nodes"] if n["status"] == "online"}

    def wait_online(self, node_id: str, proc: subprocess.Popen, name: str, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while node_id not in self.online_nodes():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{self.procs.log(name)[-3000:]}"
            assert time.monotonic() < end, f"{name} not online:\n{self.procs.log(name)[-3000:]}"
            time.sleep(0.5)


def _registered_id(out: dict) -> str:
    assert out["success"] is True, out
    return str(out["node-id"])


@pytest.mark.slow
def test_superlink_with_these_certs_admits_only_registered_nodes(tmp_path: Path) -> None:
    fed = _Federation(tmp_path)
    create_node_keypair(fed.keys, "registered")
    create_node_keypair(fed.keys, "stranger")
    try:
        fed.start_superlink()
        node_id = _registered_id(fed.register("registered"))
        again = fed.register("registered")
        assert again["success"] is False and "already in use" in again["error-message"], again

        good = fed.start_supernode("registered", f"127.0.0.1:{fed.port}")
        fed.wait_online(node_id, good, "registered")

        bad = fed.start_supernode("stranger", f"localhost:{fed.port}")
        try:
            rc = bad.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"unregistered SuperNode still running:\n{fed.procs.log('stranger')[-3000:]}")
        assert rc != 0 and "Exit Code: 305" in fed.procs.log("stranger"), fed.procs.log("stranger")[-3000:]
        assert fed.online_nodes() == {node_id}

        # the SuperLink's own flower-superexec reached its Runtime API at 127.0.0.1 over TLS with ca.crt
        log = fed.procs.log("superlink")
        assert "Starting Flower SuperExec" in log
        assert "CERTIFICATE_VERIFY_FAILED" not in log and "handshake error" not in log, log[-3000:]
        assert good.poll() is None
    finally:
        fed.procs.stop_all()
    for p in (good, bad):
        assert p.returncode is not None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
def test_shipped_nginx_config_passes_fleet_and_blocks_control(tmp_path: Path) -> None:
    fed = _Federation(tmp_path)
    proxy_port = _free_port()
    fed.connections["viaproxy"] = proxy_port
    ng = tmp_path / "nginx"
    ng.mkdir()
    site = (ROOT / "deploy" / "nginx-fleet-only.conf").read_text()
    for old, new in (("/etc/fedpriv/certs/", f"{fed.certs}/"), ("127.0.0.1:8000", f"127.0.0.1:{fed.port}"),
                     ("listen 443 ssl;", f"listen 127.0.0.1:{proxy_port} ssl;")):
        assert old in site
        site = site.replace(old, new)
    (ng / "site.conf").write_text(site)
    temp = " ".join(f"{k}_temp_path {ng / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (ng / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\nworker_processes 1;\npid {ng / 'nginx.pid'};\nerror_log {ng / 'error.log'} info;\n"
        f"events {{}}\nhttp {{\n  access_log {ng / 'access.log'};\n  {temp}\n  include {ng / 'site.conf'};\n}}\n")
    nginx = [shutil.which("nginx") or "nginx", "-p", str(ng), "-c", str(ng / "nginx.conf"), "-e", str(ng / "stderr.log")]
    check = subprocess.run([*nginx, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    ca = fed.certs / "ca.crt"
    try:
        fed.start_superlink()
        proxy = fed.procs.start("nginx", nginx)
        _wait_tls(proxy_port, ca, proxy, timeout=30)
        base = f"https://localhost:{proxy_port}"

        # the Control API, the Runtime API and everything else stay behind the proxy, however spelled
        for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/get-nodes", "/health",
                     "/docs", "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
                     "//v1/control/list-runs", "/v1/Fleet/../control/start-run"):
            assert _post(base + path, ca) == 403, path
        create_node_keypair(fed.keys, "viaproxy")
        r = fed.register("viaproxy", "viaproxy")  # the flwr CLI through the proxy is refused...
        assert r["success"] is False and "403 Forbidden" in r["error-message"], r
        node_id = _registered_id(fed.register("viaproxy"))  # ...and works on the SuperLink host

        # Fleet routes reach the SuperLink (its own 4xx for an empty body, not nginx's 403/404/413)
        assert _post(base + "/v1/fleet/get-run", ca) not in (403, 404, 413, 502)
        assert _post(base + "/v1/fleet/push-object", ca, b"\0" * 6_000_000) not in (403, 404, 413, 502)
        node = fed.start_supernode("viaproxy", f"localhost:{proxy_port}")
        fed.wait_online(node_id, node, "viaproxy")
        access = (ng / "access.log").read_text()
        assert '"POST /v1/fleet/activate-node HTTP/1.1" 200' in access
        assert '"POST /v1/fleet/send-node-heartbeat HTTP/1.1" 200' in access or "pull-messages" in access
    finally:
        fed.procs.stop_all()
