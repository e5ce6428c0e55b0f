"""``fedpriv dataset``: keygen, encrypt, decrypt, inspect, rekey fedpriv containers."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser("dataset", help="encrypted dataset containers (see docs/container-format.md)")
    dsub = p.add_subparsers(dest="dataset_command", metavar="COMMAND")

    k = dsub.add_parser("keygen", help="write a new random 256-bit key file (mode 0600)")
    k.add_argument("keyfile", metavar="KEYFILE")
    k.set_defaults(func=keygen)

    def key_args(q, *, new: bool = False) -> None:
        g = q.add_mutually_exclusive_group(required=True)
        g.add_argument("--key-file", metavar="K", help="key file made by `fedpriv dataset keygen`")
        g.add_argument("--passphrase-env", metavar="VAR", help="environment variable holding a passphrase (scrypt)")
        if new:
            h = q.add_mutually_exclusive_group(required=True)
            h.add_argument("--new-key-file", metavar="NEW")
            h.add_argument("--new-passphrase-env", metavar="VAR")

    e = dsub.add_parser("encrypt", help="encrypt a dataset file")
    e.add_argument("input", metavar="IN")
    e.add_argument("output", metavar="OUT")
    e.add_argument("--chunk-size", type=int, default=None, help="bytes per chunk (default 1 MiB)")
    key_args(e)
    e.set_defaults(func=encrypt)

    d = dsub.add_parser("decrypt", help="decrypt a container (OUT '-' = stdout); verifies everything first")
    d.add_argument("input", metavar="IN")
    d.add_argument("output", metavar="OUT")
    key_args(d)
    d.set_defaults(func=decrypt)

    i = dsub.add_parser("inspect", help="show header facts (no key needed)")
    i.add_argument("file", metavar="FILE")
    i.set_defaults(func=inspect)

    r = dsub.add_parser("rekey", help="re-encrypt under a new key; plaintext stays in memory")
    r.add_argument("input", metavar="IN")
    r.add_argument("output", metavar="OUT")
    key_args(r, new=True)
    r.set_defaults(func=rekey)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _fail(msg: str) -> int:
    print(f"fedpriv dataset: {msg}", file=sys.stderr)
    return 1


def _source(key_file: str | None, env: str | None):
    from common.crypto import KeySource

    return KeySource.from_key_file(key_file) if key_file else KeySource.from_passphrase_env(env or "")


def _run(fn) -> int:
    from common.crypto import ContainerError, KeyFileError

    try:
        return fn() or 0
    except (ContainerError, KeyFileError) as exc:
        return _fail(str(exc))
    except FileNotFoundError as exc:
        return _fail(f"{exc.filename}: no such file")
    except OSError as exc:
        return _fail(f"{getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}")


def keygen(args: argparse.Namespace) -> int:
    from common.crypto import generate_key, write_key_file

    def go() -> int:
        write_key_file(args.keyfile, generate_key())
        print(f"wrote 256-bit key to {args.keyfile} (mode 0600); keep it on this node only", file=sys.stderr)
        return 0

    return _run(go)


def encrypt(args: argparse.Namespace) -> int:
    from common.crypto import DEFAULT_CHUNK_SIZE, encrypt_file, is_container

    def go() -> int:
        if is_container(args.input):
            return _fail(f"{args.input}: is already a fedpriv container")
        encrypt_file(args.input, args.output, key_source=_source(args.key_file, args.passphrase_env),
                     chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE)
        print(f"encrypted {args.input} -> {args.output}", file=sys.stderr)
        return 0

    return _run(go)


def decrypt(args: argparse.Namespace) -> int:
    from common.crypto import decrypt_file

    def go() -> int:
        decrypt_file(args.input, args.output, key_source=_source(args.key_file, args.passphrase_env))
        if args.output != "-":
            print(f"decrypted {args.input} -> {args.output} (mode 0600)", file=sys.stderr)
        return 0

    return _run(go)


def inspect(args: argparse.Namespace) -> int:
    from common.crypto import inspect as inspect_container

    def go() -> int:
        print(json.dumps(inspect_container(args.file), indent=2))
        return 0

    return _run(go)


def rekey(args: argparse.Namespace) -> int:
    from common.crypto import rekey_file

    def go() -> int:
        rekey_file(args.input, args.output, old_key_source=_source(args.key_file, args.passphrase_env),
                   new_key_source=_source(args.new_key_file, args.new_passphrase_env))
        print(f"re-encrypted {args.input} -> {args.output} under the new key", file=sys.stderr)
        return 0

    return _run(go)
