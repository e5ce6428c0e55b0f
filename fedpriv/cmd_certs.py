"""``fedpriv certs``: a CA + SuperLink TLS certificate, and SuperNode authentication keys."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("certs", help="TLS certificates and node authentication keys for a real federation")
    csub = p.add_subparsers(dest="certs_command", metavar="COMMAND")
    i = csub.add_parser("init", help="create a CA and a SuperLink certificate")
    i.add_argument("dir", metavar="DIR")
    i.add_argument("--server-host", action="append", default=[], metavar="NAME",
                   help="host name or IP address nodes use to reach the SuperLink (repeat for several)")
    i.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    i.add_argument("--force", action="store_true", help="overwrite existing files")
    i.set_defaults(func=init)
    n = csub.add_parser("node", help="create a SuperNode authentication key pair (Flower's OpenSSH EC format)")
    n.add_argument("dir", metavar="DIR")
    n.add_argument("name", metavar="NAME")
    n.add_argument("--force", action="store_true", help="overwrite existing files")
    n.set_defaults(func=node)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def init(args: argparse.Namespace) -> int:
    from common.certs import init_ca_and_server

    try:
        paths = init_ca_and_server(args.dir, server_hosts=args.server_host, days=args.days, overwrite=args.force)
    except (ValueError, FileExistsError) as exc:
        print(f"fedpriv certs: {exc}", file=sys.stderr)
        return 2
    d = args.dir
    print(f"wrote {', '.join(str(p) for p in paths.values())} (keys mode 0600)")
    print("start the SuperLink with:\n  flower-superlink --ssl-ca-certfile "
          f"{d}/ca.crt --ssl-certfile {d}/server.pem --ssl-keyfile {d}/server.key "
          "--enable-supernode-auth --database state.db --host 0.0.0.0")
    print(f"give {d}/ca.crt (never ca.key or server.key) to every institution")
    return 0


def node(args: argparse.Namespace) -> int:
    from common.certs import create_node_keypair

    try:
        priv, pub = create_node_keypair(args.dir, args.name, overwrite=args.force)
    except (ValueError, FileExistsError) as exc:
        print(f"fedpriv certs: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {priv} (private, mode 0600, stays at the institution) and {pub}")
    print(f"the coordinator registers it with:\n  flwr supernode register {pub} <connection>")
    print(f"the institution starts its node with:\n  flower-supernode --auth-supernode-private-key {priv} "
          "--root-certificates ca.crt --superlink HOST:8000 --node-config '...'")
    return 0
