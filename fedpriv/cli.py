"""The ``fedpriv`` command: parse arguments and dispatch. No logic lives here.

Each sub-command lives in a ``fedpriv/cmd_*.py`` module that exposes ``register(subparsers)``; the module
adds its parser and sets ``func`` (a callable taking the parsed namespace and returning an exit code).
Heavy imports (torch, flwr, transformers) happen inside the handlers so that ``fedpriv --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "fedpriv.cmd_simulate",
    "fedpriv.cmd_tune",
    "fedpriv.cmd_dataset",
    "fedpriv.cmd_ledger",
    "fedpriv.cmd_audit",
    "fedpriv.cmd_audit_empirical",
    "fedpriv.cmd_fairness",
    "fedpriv.cmd_certs",
    "fedpriv.cmd_status",
    "fedpriv.cmd_compress",
)


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``fedpriv simulate: error: ... (see fedpriv simulate --help)``,
    exit code 2 (argparse prints the whole usage block first, which buries the message)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fedpriv",
        description="Federated, differentially private fine-tuning of BERT text classifiers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not shipped in this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # "fedpriv audit RUN_DIR" takes a positional run directory, so "fedpriv audit empirical ..." cannot be an
    # argparse sub-command of it: route it to the command registered as "audit-empirical".
    if argv[:2] == ["audit", "empirical"]:
        argv = ["audit-empirical", *argv[2:]]
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("fedpriv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
