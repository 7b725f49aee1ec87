"""``node-agent`` command line. Subcommands live beside the code they drive."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from shared.cli import (
    EXIT_FAILURE,
    EXIT_OK,
    CommandModule,
    make_parser,
    quiet_on_closed_pipe,
    run,
    setup_logging,
)
from shared.config.node import DEFAULT_CONFIG, load_node_config
from shared.config.notes import node_notes

DESCRIPTION = """\
Supervise llama-server instances on a GPU box, keep each GPU in its low-power P-state while
its models are idle, place models in VRAM, and suspend the machine when nobody uses it.
"""

# Modules of the `node` extra (pyproject.toml) that the edge box does not install.
NODE_EXTRA_MODULES: Final = frozenset({"pynvml", "gguf", "numpy", "tomli_w"})


def _check_config(args: argparse.Namespace) -> int:
    from inference_node.supervisor.launch import instance_problems

    cfg = load_node_config(args.path)  # the same load and checks as `run` and `reload`
    enabled = sum(1 for i in cfg.instances.values() if i.enabled)
    print(f"{args.path}: ok ({len(cfg.instances)} instance(s), {enabled} enabled)")
    for note in node_notes(cfg):
        print(f"note: {note}")
    problems = instance_problems(cfg)  # files on this machine: warnings unless --strict
    for line in problems:
        print(f"node-agent: warning: {line}", file=sys.stderr)
    return EXIT_FAILURE if problems and args.strict else EXIT_OK


def _run(args: argparse.Namespace) -> int:
    # The only importer of the agent's root: its imports (trio, NVML, the API server) are for `run`.
    import trio

    from inference_node.agent import run_agent
    from shared import systemd

    cfg = load_node_config(args.config)
    setup_logging(cfg.log_level, debug=args.debug)
    systemd.claim()  # children (llama-server, busctl, suspend) must not speak for the unit
    trio.run(run_agent, args.config)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser, sub = make_parser("node-agent", DESCRIPTION)
    p = sub.add_parser("check-config", help="check a config file and exit",
                       description="Check a node-agent config file (and its instances_dir).")
    p.add_argument("path", type=Path, help="the TOML file to check")
    p.add_argument("--strict", action="store_true",
                   help="fail on a missing model or program, not only on config errors")
    p.set_defaults(func=_check_config)
    p = sub.add_parser("run", help="run the agent (what the systemd unit starts)",
                       description="Supervise the configured instances and serve the control API.")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"default {DEFAULT_CONFIG}")
    p.set_defaults(func=_run)
    for module in _command_modules():
        module.register(sub)
    return parser


def _command_modules() -> list[CommandModule]:
    # Each module adds its own subcommands; keep this list in the order of `--help`.
    from inference_node import commands, doctor
    from inference_node.ondemand import commands as ondemand
    from inference_node.placement import cli as placement
    from inference_node.power import commands as power

    return [commands, ondemand, power, doctor, placement]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["hook"]:
        # The sleep hook runs this on a resume's critical path: only `hook`, standard library
        # only, so the other commands' imports (trio, httpx, NVML, numpy) do not delay the wake.
        from inference_node.power import hook

        return quiet_on_closed_pipe(lambda: hook.main(args[1:]))
    try:
        return run("node-agent", build_parser(), args)
    except ModuleNotFoundError as exc:
        if exc.name not in NODE_EXTRA_MODULES:
            raise
        # An edge-box install (`pip install llamanap`) has no NVML, GGUF or numpy.
        print(f"node-agent: error: Python package {exc.name!r} is missing; the node-agent needs "
              "the node extra: pip install 'llamanap[node]'", file=sys.stderr)
        return EXIT_FAILURE
