"""``fedpriv certs``: a CA + SuperLink TLS certificate, and SuperNode authentication keys (docs/deploy.md).

* ``fedpriv certs init DIR --server-host NAME [--server-host NAME ...] [--port N] [--days N] [--no-loopback]
  [--force]``
* ``fedpriv certs node DIR NAME [--superlink HOST:PORT] [--port N] [--data FILE] [--force]``

Each prints what it wrote and the next commands to run, complete and the same as docs/deploy.md (built by
``deploy/commands.py``); an error is one line ``fedpriv certs: ...`` on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from deploy import commands
from deploy.certs import (
    certificate_fingerprint,
    create_node_keypair,
    init_ca_and_server,
    ssh_public_key_fingerprint,
)

PREFIX = "fedpriv certs: "


def register(sub) -> None:
    p = sub.add_parser("certs", help="TLS certificates and node authentication keys for a real federation",
                       description="Credentials for a real federation (see docs/deploy.md).")
    csub = p.add_subparsers(dest="certs_command", metavar="COMMAND")

    i = csub.add_parser(
        "init", help="create a CA and a SuperLink TLS certificate (coordinator)",
        description="Create ca.crt, ca.key (0600), server.pem and server.key (0600) in DIR. The server "
                    "certificate is signed by the CA, valid for every --server-host (DNS name or IP address) "
                    "plus localhost, 127.0.0.1 and ::1, with serverAuth usage. EC P-384.")
    i.add_argument("dir", metavar="DIR", help="output directory (created with mode 0700)")
    i.add_argument("--server-host", action="append", default=[], metavar="NAME",
                   help="host name or IP address nodes use to reach the SuperLink (or its proxy); repeat for "
                        "several; required")
    i.add_argument("--days", type=int, default=825, help="validity of both certificates in days (default 825)")
    i.add_argument("--no-loopback", action="store_true",
                   help="do not add localhost/127.0.0.1/::1 (flower-superlink then cannot start ServerApps "
                        "unless bound to one of the given names)")
    i.add_argument("--port", type=int, default=commands.SUPERLINK_PORT,
                   help="the SuperLink's port in the printed commands (default 8000)")
    i.add_argument("--force", action="store_true",
                   help="replace existing certificate and key files (ordinary files only, never a link or device)")
    i.set_defaults(func=init)

    n = csub.add_parser(
        "node", help="create a SuperNode authentication key pair (institution)",
        description="Create DIR/NAME (OpenSSH EC P-384 private key, 0600; flower-supernode "
                    "--auth-supernode-private-key) and DIR/NAME.pub (for `flwr supernode register`).")
    n.add_argument("dir", metavar="DIR", help="output directory (created with mode 0700)")
    n.add_argument("name", metavar="NAME", help="key name: letters, digits, '-', '_', '.'")
    n.add_argument("--superlink", metavar="HOST:PORT",
                   help="the SuperLink address the coordinator gave you, for the printed flower-supernode command")
    n.add_argument("--port", type=int, help="this SuperNode's own --port in the printed command (distinct per "
                                            "SuperNode on one machine; Flower's default 9094)")
    n.add_argument("--data", metavar="FILE", help="the dataset file to encrypt, for the printed command")
    n.add_argument("--force", action="store_true",
                   help="replace existing key files (ordinary files only, never a link, a device or --data)")
    n.set_defaults(func=node)

    def _help(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)


def _fail(exc: BaseException) -> int:
    msg = str(exc)
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        msg = f"{exc.filename}: {exc.strerror}"
    print(PREFIX + " ".join(msg.split()), file=sys.stderr)
    return 2


def init(args: argparse.Namespace) -> int:
    try:
        paths = init_ca_and_server(args.dir, server_hosts=args.server_host, days=args.days, overwrite=args.force,
                                   include_loopback=not args.no_loopback)
        fp = certificate_fingerprint(paths["ca.crt"])
    except (ValueError, OSError) as exc:
        return _fail(exc)
    certs = paths["ca.crt"].parent.absolute()
    home = certs.parent
    superlink = commands.superlink_address(args.server_host[0], port=args.port)
    print(f"wrote {paths['ca.crt']}, {paths['server.pem']}; private keys {paths['ca.key']}, "
          f"{paths['server.key']} (mode 0600)")
    print(f"CA SHA-256 fingerprint: {fp}")
    print()
    print("next, on the SuperLink's machine, in one shell (FLWR_HOME for the SuperLink and the flwr CLI alike; "
          "the connection file is written before any flwr command):")
    print("  " + commands.export_flwr_home(home / "flwr-home"))
    print("  " + commands.write_connection_command(paths["ca.crt"], port=args.port))
    print("  " + commands.superlink_command(certs, database=home / "state.db", port=args.port))
    print(f"then, in a second shell with the same FLWR_HOME, register each institution's public key (keep the "
          f"printed node ID: revoke with flwr supernode unregister NODE_ID {commands.CONNECTION}):")
    print("  " + commands.export_flwr_home(home / "flwr-home"))
    print("  " + commands.register_command("NAME.pub", name="NAME").replace(
        shlex.quote(str(Path("NAME.pub").absolute())), "NAME.pub"))
    print(f"  flwr supernode list {commands.CONNECTION}")
    print(f"send {paths['ca.crt']} to every institution (never ca.key or server.key; keep ca.key offline) with "
          "the fingerprint above, over a second channel; each one runs")
    print(f"  fedpriv certs node keys NAME --superlink {superlink}")
    if not commands.is_loopback(args.server_host[0]):
        print(f"  # {superlink}: the reverse proxy deploy/nginx-fleet-only.conf, which exposes only the Fleet API "
              "(the SuperLink itself listens on 127.0.0.1; see docs/deploy.md)")
    return 0


def node(args: argparse.Namespace) -> int:
    try:
        priv, pub = create_node_keypair(args.dir, args.name, overwrite=args.force,
                                        inputs=[("the --data file", args.data)])
        fp = ssh_public_key_fingerprint(pub)
    except (ValueError, OSError) as exc:
        return _fail(exc)
    home = priv.parent.absolute().parent
    superlink = args.superlink or "SUPERLINK_HOST:PORT"
    print(f"wrote {priv} (private key, mode 0600: stays on this machine) and {pub} (public key)")
    print(f"public key fingerprint: {fp}")
    print()
    print(f"next: send {pub} to the coordinator with the fingerprint, who checks it and registers the key:")
    print("  " + commands.register_command(pub, name=args.name))
    print(f"save the coordinator's ca.crt as {home / 'ca.crt'} and compare its fingerprint with the "
          "coordinator's:")
    print(f"  openssl x509 -in {commands.q(home / 'ca.crt')} -noout -fingerprint -sha256")
    print("encrypt this institution's dataset (the key stays here):")
    print(f"  fedpriv dataset keygen {commands.q(home / 'dataset.key')}")
    data = commands.q(args.data) if args.data else "YOUR_DATA.csv"
    print(f"  fedpriv dataset encrypt {data} {commands.q(home / 'data.fpenc')} --key-file "
          f"{commands.q(home / 'dataset.key')}")
    print("then start this institution's node once the key is registered (FLWR_HOME: where the SuperNode keeps "
          "its files; epsilon and delta are this institution's whole budget for this data):")
    print("  " + commands.export_flwr_home(home / "flwr-home"))
    config = commands.node_config(name=args.name, data_path=home / "data.fpenc", key_file=home / "dataset.key",
                                  state_dir=home / "state")
    print("  " + commands.supernode_command(ca=home / "ca.crt", key=priv, superlink=superlink, config=config,
                                            port=args.port))
    if args.superlink is None:
        print("  # SUPERLINK_HOST:PORT: the address your coordinator gives you (pass --superlink to print it)")
    if args.port is None:
        print("  # several SuperNodes on one machine: give each a distinct --port (Flower's default is 9094)")
    return 0
