"""The ``sanitizer`` command. Each subcommand lives in its own module with a ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys

from sanitizer.errors import SanitizerError

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
    """Run a subcommand. Bad input (a :class:`~sanitizer.errors.SanitizerError`, ``ValueError`` or an
    ``OSError`` about a named file, or a subcommand's ``SystemExit("message")``) ends in one line
    ``sanitizer: error: <message>`` on stderr and exit status 2; any other exception is a bug and keeps
    its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        print("sanitizer: error: name a command (sanitizer COMMAND --help shows its options)", file=sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except (SanitizerError, ValueError) as exc:
        return _user_error(exc)
    except SystemExit as exc:  # a subcommand's SystemExit("message"): the same one line and status 2
        if isinstance(exc.code, str):
            return _user_error(exc)
        raise
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: keep it visible
            raise
        return _user_error(exc)


def _user_error(exc: BaseException) -> int:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"sanitizer: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
