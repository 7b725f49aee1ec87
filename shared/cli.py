"""What both command lines share: one-line errors, exit codes, logging set-up, subcommands.

``main()`` functions return an exit code. An expected error (``LlamanapError``) prints one line
to stderr; a traceback is shown only with ``--debug``. A reader that closes the pipe early
(``edge-proxy status | head -1``) ends the command quietly with ``EXIT_PIPE`` (141, what a
shell reports for a program that SIGPIPE stopped, so ``set -o pipefail`` still sees the cut).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from shared.errors import ConfigError, LlamanapError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_PIPE = 141  # 128 + SIGPIPE

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
    return quiet_on_closed_pipe(lambda: _dispatch(prog, parser, argv))


def quiet_on_closed_pipe(main: Callable[[], int]) -> int:
    """Run ``main``; if stdout's reader went away, return ``EXIT_PIPE`` without a traceback.

    Output is flushed here, inside the guard (also on ``SystemExit``, as after ``--help``):
    left to the interpreter's exit, a failed flush prints "Exception ignored" to stderr.
    """
    try:
        try:
            return main()
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        pass
    except BaseExceptionGroup as group:  # raised inside trio.run, wrapped by a nursery
        if group.split(BrokenPipeError)[1] is not None:
            raise
    # Later writes and the interpreter's final flush go nowhere instead of failing again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE


def _dispatch(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
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
