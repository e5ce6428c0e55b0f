"""``fedpriv dataset``: keygen, encrypt, decrypt, inspect and rekey encrypted dataset containers.

Parsing and dispatch only; the work is in :mod:`common.crypto` (imported inside the handlers). Every failure
prints one line, ``fedpriv dataset: <message>``, to stderr and returns 1. Key material is never printed.
"""

from __future__ import annotations

import argparse
import sys

from common.crypto import (
    DEFAULT_CHUNK_SIZE,
    ContainerError,
    KeySource,
    KeySourceError,
    decrypt_file,
    encrypt_file,
    generate_key,
    is_container,
    rekey_file,
    write_key_file,
)
from common.crypto import inspect as inspect_container
from common.fsutil import UnsafeOutputError

PREFIX = "fedpriv dataset: "
ERR_ALREADY_CONTAINER = "{file}: is already a fedpriv container; refusing to encrypt it again"
ERR_NO_SUCH_FILE = "{file}: no such file"
ERR_OS = "{file}: {reason}"
ERR_STDOUT_CLOSED = "standard output was closed before all plaintext was written"
MSG_KEYGEN = "wrote a new 256-bit key to {file} (mode 0600); keep it on this node only"
MSG_ENCRYPTED = "encrypted {src} -> {dst} ({size} bytes in {chunks} chunk(s), {kdf})"
MSG_DECRYPTED = "decrypted {src} -> {dst} (mode 0600)"
MSG_REKEYED = "re-encrypted {src} -> {dst} under the new {kind}"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of bytes, got {text!r}")
    return value


def _key_args(parser: argparse.ArgumentParser, *, prefix: str = "", what: str = "") -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(f"--{prefix}key-file", metavar="K", help=f"{what}key file made by `fedpriv dataset keygen`")
    group.add_argument(f"--{prefix}passphrase-env", metavar="VAR",
                       help=f"environment variable holding the {what}passphrase (scrypt)")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "dataset", help="encrypted dataset containers (AES-256-GCM; spec: docs/container-format.md)",
        description="Encrypt a dataset file for storage at rest; nodes decrypt it in memory only.")
    sub = parser.add_subparsers(dest="dataset_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])

    p = sub.add_parser("keygen", help="write a new random 256-bit key file (mode 0600, never overwrites)")
    p.add_argument("keyfile", metavar="KEYFILE")
    p.set_defaults(func=keygen)

    p = sub.add_parser("encrypt", help="encrypt a dataset file (CSV, TSV, JSONL, Parquet)")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    _key_args(p)
    p.add_argument("--chunk-size", type=_positive_int, default=None, metavar="BYTES",
                   help="plaintext bytes per chunk (default 1 MiB)")
    p.set_defaults(func=encrypt)

    p = sub.add_parser("decrypt", help="verify and decrypt a container; OUT '-' writes to stdout")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    _key_args(p)
    p.set_defaults(func=decrypt)

    p = sub.add_parser("inspect", help="print header facts as JSON (no key needed)")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=inspect)

    p = sub.add_parser("rekey", help="re-encrypt under a new key or passphrase (plaintext stays in memory)")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    _key_args(p)
    _key_args(p, prefix="new-", what="new ")
    p.set_defaults(func=rekey)


def _fail(message: str) -> int:
    print(PREFIX + message, file=sys.stderr)
    return 1


def _key_source(key_file: str | None, passphrase_env: str | None):
    if key_file is not None:
        return KeySource.from_key_file(key_file)
    return KeySource.from_passphrase_env(passphrase_env or "")


def _guarded(work) -> int:
    """Run ``work()``; turn the errors a user can cause into one line and exit code 1."""

    try:
        return work()
    except (ContainerError, KeySourceError, UnsafeOutputError) as exc:
        return _fail(str(exc))
    except BrokenPipeError:
        return _fail(ERR_STDOUT_CLOSED)
    except FileNotFoundError as exc:
        return _fail(ERR_NO_SUCH_FILE.format(file=exc.filename))
    except OSError as exc:
        return _fail(ERR_OS.format(file=exc.filename2 or exc.filename or "", reason=exc.strerror or exc))


def keygen(args: argparse.Namespace) -> int:
    def work() -> int:
        write_key_file(args.keyfile, generate_key())
        print(MSG_KEYGEN.format(file=args.keyfile), file=sys.stderr)
        return 0

    return _guarded(work)


def encrypt(args: argparse.Namespace) -> int:
    def work() -> int:
        if is_container(args.input):
            return _fail(ERR_ALREADY_CONTAINER.format(file=args.input))
        source = _key_source(args.key_file, args.passphrase_env)
        encrypt_file(args.input, args.output, key_source=source, chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE)
        info = inspect_container(args.output)
        print(MSG_ENCRYPTED.format(src=args.input, dst=args.output, size=info["plaintext_size"],
                                   chunks=info["chunk_count"], kdf=info["kdf"]),
              file=sys.stderr)
        return 0

    return _guarded(work)


def decrypt(args: argparse.Namespace) -> int:
    def work() -> int:
        decrypt_file(args.input, args.output, key_source=_key_source(args.key_file, args.passphrase_env))
        if args.output != "-":
            print(MSG_DECRYPTED.format(src=args.input, dst=args.output), file=sys.stderr)
        return 0

    return _guarded(work)


def inspect(args: argparse.Namespace) -> int:
    import json


    def work() -> int:
        print(json.dumps(inspect_container(args.file), indent=2))
        return 0

    return _guarded(work)


def rekey(args: argparse.Namespace) -> int:
    def work() -> int:
        old = _key_source(args.key_file, args.passphrase_env)
        new = _key_source(args.new_key_file, args.new_passphrase_env)
        rekey_file(args.input, args.output, old_key_source=old, new_key_source=new)
        print(MSG_REKEYED.format(src=args.input, dst=args.output, kind=new.kind), file=sys.stderr)
        return 0

    return _guarded(work)
