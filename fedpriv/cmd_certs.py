"""``fedpriv certs``: a CA + SuperLink TLS certificate, and SuperNode authentication keys (docs/deploy.md).

* ``fedpriv certs init DIR --server-host NAME [--server-host NAME ...] [--days N] [--no-loopback] [--force]``
* ``fedpriv certs node DIR NAME [--force]``

Each prints what it wrote and the next commands to run; an error is one line ``fedpriv certs: ...`` on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys

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
    i.add_argument("--force", action="store_true", help="overwrite existing files")
    i.set_defaults(func=init)

    n = csub.add_parser(
        "node", help="create a SuperNode authentication key pair (institution)",
        description="Create DIR/NAME (OpenSSH EC P-384 private key, 0600; flower-supernode "
                    "--auth-supernode-private-key) and DIR/NAME.pub (for `flwr supernode register`).")
    n.add_argument("dir", metavar="DIR", help="output directory (created with mode 0700)")
    n.add_argument("name", metavar="NAME", help="key name: letters, digits, '-', '_', '.'")
    n.add_argument("--force", action="store_true", help="overwrite existing files")
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
    q = {k: shlex.quote(str(v)) for k, v in paths.items()}
    host = args.server_host[0].strip()
    host = f"[{host}]" if ":" in host else host
    print(f"wrote {paths['ca.crt']}, {paths['server.pem']}; private keys {paths['ca.key']}, "
          f"{paths['server.key']} (mode 0600)")
    print(f"CA SHA-256 fingerprint: {fp}")
    print()
    print("next, on the SuperLink host (binds 127.0.0.1; expose only the Fleet API via "
          "deploy/nginx-fleet-only.conf):")
    print(f"  flower-superlink --ssl-ca-certfile {q['ca.crt']} --ssl-certfile {q['server.pem']} "
          f"--ssl-keyfile {q['server.key']} \\\n      --enable-supernode-auth --database state.db "
          "--host 127.0.0.1 --port 8000")
    print("  # $FLWR_HOME/config.toml (default ~/.flwr/config.toml):")
    print("  #   [superlink.fed]")
    print('  #   address = "127.0.0.1:8000"')
    print(f'  #   root-certificates = "{paths["ca.crt"].resolve()}"')
    print(f"send {paths['ca.crt']} to every institution (never ca.key or server.key; keep ca.key offline); "
          "they compare the fingerprint above and start:")
    print(f"  flower-supernode --root-certificates ca.crt --auth-supernode-private-key KEY "
          f"--superlink {host}:443 --node-config '...'")
    return 0


def node(args: argparse.Namespace) -> int:
    try:
        priv, pub = create_node_keypair(args.dir, args.name, overwrite=args.force)
        fp = ssh_public_key_fingerprint(pub)
    except (ValueError, OSError) as exc:
        return _fail(exc)
    print(f"wrote {priv} (private key, mode 0600: stays on this machine) and {pub} (public key)")
    print(f"public key fingerprint: {fp}")
    print()
    print(f"next: send {pub} to the coordinator, who checks the fingerprint and registers it:")
    print(f"  flwr supernode register {shlex.quote(str(pub))} <connection> --name {shlex.quote(args.name)}")
    print("then start this institution's node:")
    print(f"  flower-supernode --root-certificates ca.crt --auth-supernode-private-key {shlex.quote(str(priv))} "
          "\\\n      --superlink SUPERLINK_HOST:443 --node-config 'data-path=\"...\" state-dir=\"...\" "
          "epsilon=8 delta=1e-5'")
    return 0
