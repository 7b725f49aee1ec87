"""``edge-proxy`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from shared.cli import EXIT_OK, make_parser, run
from shared.config.edge import load_edge_config

DESCRIPTION = """\
Relay TCP (and HTTP) connections to a GPU box that sleeps, waking it with Wake-on-LAN.

Frontends point at the proxy instead of the GPU box. While the box sleeps, the proxy holds
their connections, sends magic packets until the backend is ready, then delivers every byte.
"""

DEFAULT_CONFIG = Path("/etc/llamanap/edge-proxy.toml")


def _check_config(args: argparse.Namespace) -> int:
    cfg = load_edge_config(args.path)
    print(f"{args.path}: ok ({len(cfg.nodes)} node(s), {len(cfg.routes)} route(s))")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser, sub = make_parser("edge-proxy", DESCRIPTION)
    p = sub.add_parser("check-config", help="check a config file and exit",
                       description="Check an edge-proxy config file; print one line per error.")
    p.add_argument("path", type=Path, help="the TOML file to check")
    p.set_defaults(func=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run("edge-proxy", build_parser(), argv)
