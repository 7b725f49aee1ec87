"""``node-agent`` subcommands for power: ``power``, ``hook``, ``inhibit``, ``simulate-sleep``."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from inference_node.client import AgentClient, client_options
from shared.cli import EXIT_OK, EXIT_USAGE
from shared.config.loader import Context
from shared.config.values import parse_hostport, parse_mac
from shared.errors import LlamanapError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d`` into seconds."""
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; use e.g. 90s, 30m, 2h, 1d")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def register_hook(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from inference_node.power import hook

    p = sub.add_parser("hook", parents=[client_options()],
                       help="tell the agent the system sleeps (pre) or woke (post)",
                       description="Called by the system-sleep hook (deploy/system-sleep/llamanap).")
    hook.add_arguments(p)
    p.set_defaults(func=hook.run)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    client = client_options()
    p = sub.add_parser("power", parents=[client], help="what keeps the node awake, when it would sleep",
                       description="Show the power state, what keeps the node awake right now, "
                                   "when it would suspend, inhibits, and the last suspend cycles.")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_power)

    register_hook(sub)

    p = sub.add_parser("inhibit", parents=[client], help="keep the node awake for a while",
                       description='Keep the node awake: node-agent inhibit --for 2h "training run". '
                                   "--list shows the inhibits, --remove ID ends one.")
    p.add_argument("reason", nargs="?", help="why (shown in status and logs)")
    p.add_argument("--for", dest="for_s", type=parse_duration, default=None,
                   help="how long: 90s, 30m, 2h, 1d (default 1h)")
    p.add_argument("--list", action="store_true", help="list active inhibits")
    p.add_argument("--remove", type=int, metavar="ID", help="end the inhibit with this id")
    p.set_defaults(func=_inhibit)

    p = sub.add_parser("simulate-sleep", parents=[client], help="a pretend suspend for demos and tests",
                       description="Use as power.suspend_command to try llamanap without suspending. "
                                   "Like `systemctl suspend` it returns at once; behind it, a "
                                   "detached process waits for a magic packet for --mac on --listen "
                                   "(UDP), then tells the agent 'post' as the sleep hook does after "
                                   "a resume.")
    p.add_argument("--mac", required=True, help="the node's MAC address")
    p.add_argument("--listen", required=True, help="UDP HOST:PORT to hear magic packets on")
    p.add_argument("--log", type=Path, help="where the sleeping process writes what it hears")
    p.add_argument("--foreground", action="store_true", help="block until woken instead")
    p.set_defaults(func=_simulate_sleep)


def _power(args: argparse.Namespace) -> int:
    data = AgentClient.from_args(args).get("/v1/power")
    if args.json:
        print(json.dumps(data, indent=1))
        return EXIT_OK
    print(format_power(data))
    return EXIT_OK


def format_power(data: dict[str, Any]) -> str:
    """The power status as a few readable lines (also appended to ``status``)."""
    lines = [f"power: {data['state']} for {data['in_state_s']:.0f} s ({data['reason']}); {data['verdict']}"]
    if not data.get("enabled", True):
        lines.append("  suspend is disabled (power.enabled = false)")
    for reason in data.get("keeping_awake", []):
        lines.append(f"  awake because: {reason}")
    for item in data.get("inhibits", []):
        lines.append(f"  inhibit {item['id']}: {item['reason']} ({item['remaining_s']:.0f} s left)")
    if data.get("last_error"):
        lines.append(f"  last suspend failed: {data['last_error']}")
    return "\n".join(lines)


def _inhibit(args: argparse.Namespace) -> int:
    client = AgentClient.from_args(args)
    if args.remove is not None:
        client.delete(f"/v1/power/inhibit/{args.remove}")
        print(f"inhibit {args.remove} removed")
        return EXIT_OK
    if args.list or args.reason is None:
        items = client.get("/v1/power").get("inhibits", [])
        for item in items:
            print(f"{item['id']}\t{item['remaining_s']:.0f} s left\t{item['reason']}")
        if not items:
            print("no inhibits")
        if args.reason is None and not args.list:
            print('to add one: node-agent inhibit --for 2h "reason"', file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK
    for_s = args.for_s if args.for_s is not None else 3600.0
    item = client.post("/v1/power/inhibit", {"reason": args.reason, "for_s": for_s})
    print(f"inhibit {item['id']}: staying awake for {for_s:.0f} s ({item['reason']})")
    return EXIT_OK


def _simulate_sleep(args: argparse.Namespace) -> int:
    from inference_node.power import simulated

    mac = parse_mac(args.mac, Context(Path("--mac")), "")
    addr = parse_hostport(args.listen, Context(Path("--listen")), "")
    client = AgentClient.from_args(args)  # a bad --config fails here, before anything "sleeps"
    try:
        sock = simulated.open_wol_socket(addr.host, addr.port)
    except OSError as exc:
        raise LlamanapError(f"simulate-sleep: cannot listen on udp {addr}: {exc.strerror}; "
                            "pick a free --listen port") from exc
    if not args.foreground and not simulated.detach(args.log):
        return EXIT_OK  # the "suspend command" returned; the sleep goes on in the child

    def say(line: str) -> None:
        print(f"simulate-sleep: {line}", file=sys.stderr, flush=True)

    say(f"asleep; waiting for a magic packet for {args.mac} on udp {addr}")
    simulated.wait_for_magic_packet(sock, mac, say)
    sock.close()
    try:
        client.post("/v1/power/hook", {"phase": "post"})
    except LlamanapError as exc:
        say(f"could not tell the agent: {exc}")
        return 1
    say("woke; told the agent (hook post)")
    if not args.foreground:
        os._exit(0)  # a forked child: skip the parent's exit handlers
    return EXIT_OK
