"""What both command lines share: one-line errors, exit codes, logging set-up, subcommands.

``main()`` functions return an exit code. An expected error (``LlamanapError``) prints one line
to stderr; a traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from shared.errors import ConfigError, LlamanapError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3

Handler = Callable[[argparse.Namespace], int]


class CommandModule(Protocol):
    """A module that adds subcommands to a parser (each sets ``func`` to its handler)."""

    def register(self, sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None: ...


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # 30 ms: only when asked

    try:
        return version("llamanap")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def make_parser(prog: str, description: str) -> tuple[
    argparse.ArgumentParser, argparse._SubParsersAction[argparse.ArgumentParser]
]:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    return parser, sub


def setup_logging(level: str, *, debug: bool = False) -> None:
    """Plain lines to stderr; journald adds its own timestamps, so keep ours short."""
    logging.basicConfig(
        level=logging.DEBUG if debug else getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def run(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run the chosen handler, turn expected errors into one line."""
    args = parser.parse_args(argv)
    try:
        func: Handler = args.func
        return func(args)
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LlamanapError as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
