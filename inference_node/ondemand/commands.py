"""``node-agent load MODEL`` and ``node-agent unload MODEL``, and the models table that
``node-agent status`` prints (loaded / loading / unloaded, last use, when the TTL ends)."""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from typing import Any, Final

from inference_node.client import WAIT_MARGIN_S, AgentClient, client_options
from inference_node.errors import AgentRefused
from shared.cli import EXIT_FAILURE, EXIT_OK

# A load waits for READY: a big model from a slow disk takes minutes.
LOAD_TIMEOUT_S: Final = 900.0
UNLOAD_TIMEOUT_S: Final = 120.0
COLUMNS: Final = ("MODEL", "INSTANCE", "LOAD", "STATE", "BUSY", "EST MIB", "LAST USE",
                  "TTL LEFT")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    client = client_options()
    p = sub.add_parser("load", parents=[client], help="load a model now (its instance, on "
                       "demand); returns once it is READY",
                       description="Ask the agent's scheduler to load MODEL, evicting idle "
                       "on-demand models if memory is short; prints what it decided.")
    p.add_argument("model", help="a name from `node-agent status` (an instance's models)")
    p.add_argument("--timeout", type=float, default=LOAD_TIMEOUT_S,
                   help=f"seconds to wait for READY (default {LOAD_TIMEOUT_S:g})")
    p.set_defaults(func=_load)
    p = sub.add_parser("unload", parents=[client], help="unload an on-demand model now")
    p.add_argument("model")
    p.set_defaults(func=_unload)


def _load(args: argparse.Namespace) -> int:
    try:
        out = AgentClient.from_args(args).post(f"/v1/models/{_quoted(args.model)}/load",
                                               timeout_s=args.timeout + WAIT_MARGIN_S)
    except AgentRefused as exc:
        print(f"node-agent: load {args.model}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if out["load_s"] is None:
        print(f"{args.model}: already loaded (instance {out['instance']})")
    else:
        evicted = f"; evicted {', '.join(out['evicted'])}" if out["evicted"] else ""
        print(f"{args.model}: loaded in {out['load_s']:.1f} s (instance {out['instance']}: "
              f"{out['reason']}){evicted}")
    return EXIT_OK


def _unload(args: argparse.Namespace) -> int:
    try:
        out = AgentClient.from_args(args).post(f"/v1/models/{_quoted(args.model)}/unload",
                                               timeout_s=UNLOAD_TIMEOUT_S)
    except AgentRefused as exc:
        print(f"node-agent: unload {args.model}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{args.model}: unloaded (instance {out['instance']} stopped)")
    return EXIT_OK


def format_models(rows: list[dict[str, Any]]) -> str:
    """The models as aligned columns."""
    cells = [COLUMNS] + [(
        r["model"], r["instance"], r["load"], r["state"].upper(), "yes" if r["busy"] else "no",
        "-" if r["estimated_mib"] is None else f"{sum(r['estimated_mib'].values()):,.0f}",
        _ago(r["last_use_s_ago"]),
        "-" if r["ttl_left_s"] is None else f"{r['ttl_left_s']:.0f}s",
    ) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)),
                                row[-1]]).rstrip() for row in cells)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.0f}s ago" if seconds < 3600 else f"{seconds / 3600:.1f}h ago"


def _quoted(model: str) -> str:
    """A model name as one path segment (``org/model`` is ``org%2Fmodel``)."""
    return urllib.parse.quote(model, safe="")
