"""``edge-proxy`` command line: check-config, run, wake, status, history, energy."""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from edge_proxy import doctor
from edge_proxy.control import STATUS_PATH, WAKE_PATH
from edge_proxy.errors import ControlError, WolError
from edge_proxy.history import cli as history_cli
from edge_proxy.service import first_user_error, run_service
from edge_proxy.wake.wol import UdpWolSender, magic_packet
from shared.cli import EXIT_FAILURE, EXIT_OK, make_parser, run, setup_logging
from shared.config.edge import EdgeConfig, load_edge_config
from shared.config.notes import edge_notes

DESCRIPTION = """\
Relay TCP (and HTTP) connections to a GPU box that sleeps, waking it with Wake-on-LAN.

Frontends point at the proxy instead of the GPU box. While the box sleeps, the proxy holds
their connections, sends magic packets until the backend is ready, then delivers every byte.
"""

DEFAULT_CONFIG = Path("/etc/llamanap/edge-proxy.toml")
CONTROL_TIMEOUT_S = 5.0  # the control endpoint answers from memory; slower means it is stuck
_ANY_HOST = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def _check_config(args: argparse.Namespace) -> int:
    cfg = load_edge_config(args.path)  # the same load and checks as `run` and a reload
    print(f"{args.path}: ok ({len(cfg.nodes)} node(s), {len(cfg.routes)} route(s))")
    for note in edge_notes(cfg):
        print(f"note: {note}")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    cfg = load_edge_config(args.config)
    setup_logging(cfg.log_level, debug=args.debug)
    try:
        trio.run(run_service, args.config)
    except BaseExceptionGroup as group:
        raise first_user_error(group) from group
    return EXIT_OK


def control_base(cfg: EdgeConfig) -> str:
    """The URL this machine reaches the running proxy's control endpoint at."""
    host, _, port = cfg.control.listen.rpartition(":")
    host = _ANY_HOST.get(host.strip("[]"), host.strip("[]"))
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _request(cfg: EdgeConfig, method: str, path: str) -> Any:
    import httpx  # only the commands that talk to a running proxy need it, not `run`

    headers = {}
    if cfg.control.token is not None:
        headers["Authorization"] = f"Bearer {cfg.control.token.reveal()}"
    url = control_base(cfg) + path
    try:
        response = httpx.request(method, url, headers=headers, timeout=CONTROL_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise ControlError(f"cannot reach the proxy at {url}: {exc}; is `edge-proxy run` up?") \
            from exc
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text.strip()
        raise ControlError(f"{method} {url}: {response.status_code}: {message}")
    return response.json()


def _wake(args: argparse.Namespace) -> int:
    cfg = load_edge_config(args.config)
    if args.node not in cfg.nodes:
        raise ControlError(f"unknown node {args.node!r}; known nodes: {', '.join(sorted(cfg.nodes))}")
    if not args.direct:
        try:
            answer = _request(cfg, "POST", WAKE_PATH.replace("{node}", args.node))
        except ControlError as exc:
            print(f"edge-proxy: {exc}; sending the packet directly")
        else:
            print(f"magic packet sent to {args.node} by the running proxy "
                  f"(state {answer['state']})")
            return EXIT_OK
    node = cfg.nodes[args.node]
    try:
        trio.run(UdpWolSender().send, magic_packet(node.mac_bytes, node.wol.password_bytes),
                 node.wol)
    except WolError as exc:
        print(f"edge-proxy: error: {exc}")
        return EXIT_FAILURE
    print(f"magic packet sent to {args.node} ({node.mac}) via {node.wol.broadcast}:{node.wol.port}")
    return EXIT_OK


def format_status(status: dict[str, Any]) -> str:
    """The status table `edge-proxy status` prints."""
    rows = [("NODE", "STATE", "FOR", "HELD", "ACTIVE", "LAST WAKE", "REASON")]
    for name, node in status["nodes"].items():
        last = node.get("last_wake") or {}
        if last.get("duration_s") is not None:
            wake = f"{last['outcome']} in {last['duration_s']:.1f}s"
        else:
            wake = "running" if last else "-"
        reason = node["reason"]
        if node.get("wake_cooldown_left_s"):  # absent from an older proxy's status
            reason += f"; no new wake for {math.ceil(node['wake_cooldown_left_s'])} s"
        rows.append((name, node["state"], _ago(node["time_in_state_s"]), str(node["held"]),
                     str(node["active"]), wake, reason))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
             for r in rows]
    lines.append("")
    for r in status["routes"]:
        if r.get("protocol") == "http":
            nodes = ", ".join(f"{n.get('node', name)}:{n['backend_port']}"
                              for name, n in r["nodes"].items())
            busy = ", ".join(f"{name} {n['in_flight']}" for name, n in r["nodes"].items()
                             if n.get("in_flight"))
            flying = r.get("requests_in_flight", 0)
            note = f", {flying} request(s) in flight" + (f": {busy}" if busy else "") \
                if flying else ""
            lines.append(f"route {r['listen']} -> {nodes} (http{note})")
        else:
            lines.append(f"route {r['listen']} -> {r['node']}:{r['backend_port']} "
                         f"(ready: {r['ready']})")
    for alert in status.get("alerts", []):  # absent from an older proxy's status
        lines.append(f"alert {alert['kind']}: {alert['message']}")
    return "\n".join(lines)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _status(args: argparse.Namespace) -> int:
    cfg = load_edge_config(args.config)
    status = _request(cfg, "GET", STATUS_PATH)
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser, sub = make_parser("edge-proxy", DESCRIPTION)
    p = sub.add_parser("check-config", help="check a config file and exit",
                       description="Check an edge-proxy config file; print one line per error.")
    p.add_argument("path", type=Path, help="the TOML file to check")
    p.set_defaults(func=_check_config)

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG,
                       help=f"config file (default {DEFAULT_CONFIG})")

    p = sub.add_parser("run", help="run the proxy",
                       description="Serve the routes and the control endpoint. SIGHUP reloads "
                       "the config; SIGTERM stops accepting and lets relays finish.")
    config_arg(p)
    p.set_defaults(func=_run)
    p = sub.add_parser("wake", help="send a magic packet to a node now",
                       description="Ask the running proxy to wake NODE now (its state machine "
                       "follows the wake); if the proxy is not running, send the packet directly.")
    config_arg(p)
    p.add_argument("node", help="node name from the config")
    p.add_argument("--direct", action="store_true", help="send from this process, not the proxy")
    p.set_defaults(func=_wake)
    p = sub.add_parser("status", help="show the running proxy's nodes and routes",
                       description="Read the running proxy's /status and print a table.")
    config_arg(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=_status)
    doctor.register(sub, DEFAULT_CONFIG)
    history_cli.register(sub, DEFAULT_CONFIG)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run("edge-proxy", build_parser(), argv)


logging.getLogger("hpack").setLevel(logging.WARNING)
