"""The ``sanitizer`` command. Each subcommand lives in its own module with a ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands; each defines register(subparsers) and sets a handler via
# parser.set_defaults(handler=callable(args) -> int).
COMMAND_MODULES = (
    "sanitizer.demo",
    "sanitizer.certificate.command",
    "sanitizer.attacks.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sanitizer", description="Defend PyTorch training against data poisoning.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
