"""``node-agent`` subcommands that talk to a running agent through its API:
``status`` / ``get instances``, ``logs``, ``start|stop|restart|enable|disable``, ``reload``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from inference_node.client import WAIT_MARGIN_S, AgentClient, client_options
from inference_node.errors import AgentRefused
from inference_node.gpu.report import activity_cells, format_gpu_table
from shared.cli import EXIT_FAILURE, EXIT_OK

DEFAULT_LOG_LINES = 100
FOLLOW_INTERVAL_S = 1.0
# enable/disable without --wait still wait this long for the state they lead to (READY or
# STOPPED), so what they print is what the agent did, not the state before it acted.
SETTLE_TIMEOUT_S = 10.0
SETTLING_ACTIONS = ("enable", "disable")
# Starting an on-demand instance is the scheduler's decision: it may wait for a busy model to
# finish its task (agent.evict_wait_s) and for the ones it evicts to exit before answering.
START_DECISION_S = 600.0
ACTION_HELP = {
    "start": "start an instance now (until stopped; does not change enabled); an on-demand "
             "one as a load would: idle models may be evicted for it, or it is refused",
    "stop": "stop an instance now (does not change enabled)",
    "restart": "stop and start an instance",
    "enable": "enable an instance (kept across reloads and restarts) and start it",
    "disable": "disable an instance (kept across reloads and restarts) and stop it",
}
COLUMNS = ("NAME", "STATE", "PID", "PORT", "GPUS", "BUSY", "TASKS", "TOK/S", "UPTIME", "RESTARTS",
           "ENABLED", "REASON")

def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    client = client_options()

    p = sub.add_parser("status", parents=[client], help="show the instances as a table")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead")
    p.set_defaults(func=_status)
    p = sub.add_parser("get", parents=[client], help="get instances: the same table as status")
    p.add_argument("resource", choices=["instances"])
    p.add_argument("--json", action="store_true", help="print the API's JSON instead")
    p.set_defaults(func=_status)

    p = sub.add_parser("logs", parents=[client], help="recent output of an instance")
    p.add_argument("name")
    p.add_argument("-n", "--lines", type=int, default=DEFAULT_LOG_LINES)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.set_defaults(func=_logs)

    for action, text in ACTION_HELP.items():
        p = sub.add_parser(action, parents=[client], help=text, description=text)
        p.add_argument("name")
        p.add_argument("--wait", action="store_true", help="return once READY (or STOPPED)")
        p.add_argument("--timeout", type=float, default=300.0, help="seconds --wait may take")
        p.set_defaults(func=_act, action=action)

    p = sub.add_parser("reload", parents=[client], help="re-read the config, apply the difference")
    p.set_defaults(func=_reload)


def _status(args: argparse.Namespace) -> int:
    client = AgentClient.from_args(args)
    data = client.get("/v1/status")
    activity, gpus = _optional(client, "/v1/activity"), _optional(client, "/v1/gpus")
    power = _optional(client, "/v1/power")
    models = _optional(client, "/v1/models")
    if args.json:
        print(json.dumps(data | {"activity": activity, "gpus": gpus, "power": power,
                                 "models": models}, indent=1))
        return EXIT_OK
    print(format_table(data["instances"], (activity or {}).get("instances", {})))
    if models is not None and models["models"]:
        from inference_node.ondemand.commands import format_models

        print("\n" + format_models(models["models"]))
    if gpus is not None:
        print("\n" + format_gpu_table(gpus))
    if power is not None:
        from inference_node.power.commands import format_power

        print("\n" + format_power(power))
    last = data.get("last_reload")
    if last and not last["ok"]:
        print(f"\nlast reload failed: {last['message']}")
    return EXIT_OK


def _optional(client: AgentClient, path: str) -> Any:
    """A route some agents lack (activity, GPUs): None when this one does not have it."""
    try:
        return client.get(path)
    except AgentRefused:
        return None


def format_table(rows: list[dict[str, Any]], activity: dict[str, Any] | None = None) -> str:
    """The instances as aligned columns (what `status` prints)."""
    activity = activity or {}
    cells = [COLUMNS] + [(
        r["name"], r["state"].upper(), _dash(r["pid"]), str(r["port"]),
        _gpus(r["gpus"]), *activity_cells(activity.get(r["name"])), _duration(r["uptime_s"]),
        str(r["restarts"]),
        "yes" if r["enabled"] else "no", r["reason"],
    ) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]]).rstrip()
             for row in cells]
    return "\n".join(lines)


def _logs(args: argparse.Namespace) -> int:
    client = AgentClient.from_args(args)
    path = f"/v1/instances/{args.name}/logs"
    after = 0
    while True:
        lines = client.get(path, lines=str(max(args.lines, 1)), after=str(after))["lines"]
        for line in lines:
            print(line["text"], flush=True)
        if lines:
            after = lines[-1]["seq"]
        if not args.follow:
            return EXIT_OK
        time.sleep(FOLLOW_INTERVAL_S)


def _act(args: argparse.Namespace) -> int:
    settle = not args.wait and args.action in SETTLING_ACTIONS
    body: dict[str, Any] = {}
    if args.wait or settle:
        body = {"wait": True, "timeout_s": args.timeout if args.wait else SETTLE_TIMEOUT_S}
    budget = body.get("timeout_s", 0.0) + WAIT_MARGIN_S
    if args.action in ("start", "restart"):
        budget += START_DECISION_S
    row = AgentClient.from_args(args).post(f"/v1/instances/{args.name}/{args.action}", body, timeout_s=budget)
    state = row["state"].upper()
    if settle and row["timed_out"]:
        print(f"{row['name']}: {args.action}: still {state} after {SETTLE_TIMEOUT_S:g} s "
              f"({row['reason']}); see `node-agent status`")
    else:
        print(f"{row['name']}: {args.action}: now {state} ({row['reason']})")
    if args.wait and (row["timed_out"] or row["state"] == "failed"):
        return EXIT_FAILURE
    return EXIT_OK


def _reload(args: argparse.Namespace) -> int:
    try:
        plan = AgentClient.from_args(args).post("/v1/reload", timeout_s=120.0)
    except AgentRefused as exc:
        print(f"node-agent: reload refused: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    changes = [f"{k}: {', '.join(v)}" for k, v in plan.items() if k not in ("ok", "unchanged") and v]
    print("reloaded; " + ("; ".join(changes) if changes else "no instance changed"))
    return EXIT_OK


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _gpus(gpus: object) -> str:
    if gpus is None:
        return "-"
    return ",".join(str(g) for g in gpus) if isinstance(gpus, list) else str(gpus)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s < 86400 else f"{s // 86400}d{s % 86400 // 3600:02d}h"
