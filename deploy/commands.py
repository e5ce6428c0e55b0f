"""The deployment commands that ``fedpriv certs`` prints and docs/deploy.md shows, built in one place.

Pure functions from paths and ports to shell text, so that the printed hints, the guide and the tests agree.
Two directory layouts are assumed, both named after the directory the credentials are written to:

* the coordinator's home ``C`` is the parent of ``fedpriv certs init DIR``: ``C/certs/`` (ca.crt,
  server.pem, server.key), ``C/flwr-home`` (``FLWR_HOME`` for the SuperLink and the ``flwr`` CLI, with the
  CLI connection ``fed`` in its ``config.toml``) and ``C/state.db`` (the SuperLink's ``--database``);
* an institution's home ``H`` is the parent of ``fedpriv certs node DIR NAME``: ``H/keys/NAME`` and
  ``NAME.pub``, ``H/ca.crt`` (the coordinator's CA), ``H/dataset.key``, ``H/data.fpenc``, ``H/state/``
  (accountant, ledger, signing key) and ``H/flwr-home`` (``FLWR_HOME`` for the SuperNode).

A multi-line command is continued with `` \\`` and six spaces of indent; join the lines before parsing.
"""

from __future__ import annotations

import ipaddress
import shlex
from pathlib import Path

CONNECTION = "fed"  # the flwr CLI connection name the guide and the hints use
SUPERLINK_PORT = 8000  # Flower 1.42's default: one HTTP port for the Fleet, Control and Runtime APIs
PROXY_PORT = 443  # the public port of deploy/nginx-fleet-only.conf
EPSILON, DELTA = 8.0, 1e-5  # the node-config defaults, printed so that the institution sees its budget
CONT = " \\\n      "


def q(path: str | Path) -> str:
    """A path as one shell word (absolute, quoted only where needed)."""
    return shlex.quote(str(Path(path).absolute()))


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses: the SuperNodes run on the SuperLink's machine."""
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def export_flwr_home(flwr_home: str | Path) -> str:
    """``export FLWR_HOME=...`` and create it: every Flower process and the CLI write under it."""
    return f"export FLWR_HOME={q(flwr_home)} && mkdir -p \"$FLWR_HOME\""


def superlink_command(certs_dir: str | Path, *, database: str | Path, port: int = SUPERLINK_PORT) -> str:
    """``flower-superlink`` with TLS, node authentication, SQLite state, bound to 127.0.0.1, no uv sync."""
    c = Path(certs_dir)
    return ("flower-superlink"
            f" --ssl-ca-certfile {q(c / 'ca.crt')} --ssl-certfile {q(c / 'server.pem')}"
            f" --ssl-keyfile {q(c / 'server.key')}" + CONT
            + f"--enable-supernode-auth --database {q(database)} --host 127.0.0.1 --port {port}" + CONT
            + "--disable-runtime-dependency-installation")


_CONNECTION_TOML = ('[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\n'
                    'root-certificates = "{ca}"\n')


def connection_toml(ca: str | Path, *, port: int = SUPERLINK_PORT, name: str = CONNECTION) -> str:
    """The ``$FLWR_HOME/config.toml`` of the coordinator's CLI: one TLS connection, the default."""
    return _CONNECTION_TOML.format(name=name, port=port, ca=Path(ca).absolute())


def write_connection_command(ca: str | Path, *, port: int = SUPERLINK_PORT, name: str = CONNECTION) -> str:
    """One ``printf`` that writes :func:`connection_toml` into ``$FLWR_HOME/config.toml``.

    Written explicitly, before any ``flwr`` command: on a fresh ``FLWR_HOME`` Flower 1.42's CLI creates a
    config whose default connection is ``:local:`` and starts a background ``flower-superlink --insecure
    --simulation`` for it. The CA path is a separate argument, so a guide may write it with a variable.
    """
    template = _CONNECTION_TOML.format(name=name, port=port, ca="%s").replace("\n", "\\n")
    return f"printf {shlex.quote(template)} {q(ca)} > \"$FLWR_HOME/config.toml\""


def register_command(pub: str | Path, *, name: str, connection: str = CONNECTION) -> str:
    """``flwr supernode register``; it prints the node ID (write it down: ``--name`` is not listed)."""
    return f"flwr supernode register {q(pub)} {connection} --name {shlex.quote(name)}"


def node_config(*, name: str, data_path: str | Path, key_file: str | Path, state_dir: str | Path,
                epsilon: float = EPSILON, delta: float = DELTA) -> str:
    """The ``--node-config`` value: the institution's data, dataset key, budget and state directory."""
    return (f'node-name="{name}" data-path="{Path(data_path).absolute()}" '
            f'key-file="{Path(key_file).absolute()}" require-encryption=true epsilon={epsilon:g} delta={_num(delta)} '
            f'state-dir="{Path(state_dir).absolute()}"')


def supernode_command(*, ca: str | Path, key: str | Path, superlink: str, config: str,
                      port: int | None = None) -> str:
    """``flower-supernode`` with TLS, its authentication key and its node config.

    ``port``: the SuperNode's own Runtime API port (Flower's default 127.0.0.1:9094); every SuperNode on one
    machine needs a distinct one.
    """
    port_arg = f" --port {port}" if port is not None else ""
    return (f"flower-supernode --root-certificates {q(ca)} --auth-supernode-private-key {q(key)}" + CONT
            + f"--superlink {superlink}{port_arg}" + CONT
            + f"--node-config {shlex.quote(config)}")


def superlink_address(server_host: str, *, port: int = SUPERLINK_PORT) -> str:
    """What a SuperNode passes as ``--superlink``: the SuperLink's own port on a single machine, else the proxy."""
    h = server_host.strip()
    if is_loopback(h):
        return f"127.0.0.1:{port}"
    return f"[{h}]:{PROXY_PORT}" if ":" in h else f"{h}:{PROXY_PORT}"


def _num(x: float) -> str:
    """``1e-5`` rather than Python's ``1e-05``, as a person writes it."""
    return f"{x:g}".replace("e-0", "e-").replace("e+0", "e+")
