"""``edge-proxy history`` and ``edge-proxy energy``: tables from the history database.

Both read the database directly (read-only), so they work with the proxy stopped. Output
cut short by a closed pipe (``| head``) ends quietly.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from edge_proxy.history import query
from edge_proxy.history.energy import EnergyRow, HostPower, by_week, energy_by_day
from edge_proxy.history.records import ConnectionRecord, RequestRecord, WakeRecord
from shared.cli import EXIT_OK, EXIT_USAGE
from shared.config.edge import EdgeConfig, NodeConfig, load_edge_config

_UNITS_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SINCE_RE: Final = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
DEFAULT_SINCE: Final = "24h"
DEFAULT_ENERGY_SINCE: Final = "7d"
DEFAULT_LIMIT: Final = 100
_DEFAULT_HOST = HostPower(idle_w=NodeConfig.host_idle_watts, sleep_w=NodeConfig.host_sleep_watts)


def parse_since(text: str) -> float:
    """``"24h"``, ``"30m"``, ``"7d"``, ``"2w"``, ``"90s"`` into seconds."""
    m = _SINCE_RE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"found {text!r}; expected a number and a unit "
                                         "(s, m, h, d, w) such as 24h or 7d")
    return float(m.group(1)) * _UNITS_S[m.group(2)]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], default_config: Path) -> None:
    """Add the ``history`` and ``energy`` subcommands."""
    def common(p: argparse.ArgumentParser, since: str) -> None:
        p.add_argument("-c", "--config", type=Path, default=None,
                       help=f"config file naming [history] and the nodes (default {default_config})")
        p.add_argument("--db", type=Path, default=None, help="the history database to read")
        p.add_argument("--node", help="only this node")
        p.add_argument("--since", type=parse_since, default=parse_since(since),
                       help=f"how far back, e.g. 30m, 24h, 7d (default {since})")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(default_config=default_config)

    p = sub.add_parser("history", help="show recent requests, connections and wakes",
                       description="Requests on HTTP routes, connections on TCP routes and "
                       "wakes, newest first, from the history database (works with the proxy "
                       "stopped).")
    common(p, DEFAULT_SINCE)
    p.add_argument("--model", help="only requests for this model")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="at most this many rows")
    p.set_defaults(func=_history)
    p = sub.add_parser("energy", help="show energy used and saved per node and day",
                       description="Time asleep, awake idle and busy (a GPU with a task), the "
                       "energy each node used, and what sleeping saved, per day and week, from "
                       "the power states, busy spans and GPU samples in the history database.")
    common(p, DEFAULT_ENERGY_SINCE)
    p.set_defaults(func=_energy)


def _config(args: argparse.Namespace) -> EdgeConfig | None:
    if args.config is not None:
        return load_edge_config(args.config)
    if args.db is None:
        return load_edge_config(args.default_config)
    return None  # --db alone: read that file, with default host watts


def _db(args: argparse.Namespace, cfg: EdgeConfig | None) -> Path:
    return args.db if args.db is not None or cfg is None else cfg.history.db_path


def _history(args: argparse.Namespace) -> int:
    if args.limit < 1:
        print("edge-proxy: --limit: expected at least 1", file=sys.stderr)
        return EXIT_USAGE
    cfg = _config(args)
    flt = query.Filter(since=time.time() - args.since, node=args.node, model=args.model,
                       limit=args.limit)
    with query.open_readonly(_db(args, cfg)) as conn:
        reqs = query.requests(conn, flt)
        unmodelled = dataclasses.replace(flt, model=None)
        conns = [] if args.model else query.connections(conn, unmodelled)
        wakes = query.wakes(conn, unmodelled)
    if args.json:
        return _emit(json.dumps({"requests": [dataclasses.asdict(r) for r in reqs],
                                 "connections": [dataclasses.asdict(c) for c in conns],
                                 "wakes": [dataclasses.asdict(w) for w in wakes]}, indent=1))
    parts = [format_requests(reqs)]
    if conns:  # TCP routes only
        parts.append(format_connections(conns))
    parts.append(format_wakes(wakes))
    return _emit("\n\n".join(parts))


def _energy(args: argparse.Namespace) -> int:
    cfg = _config(args)
    now = time.time()
    flt = query.Filter(since=now - args.since, until=now, node=args.node)
    with query.open_readonly(_db(args, cfg)) as conn:
        intervals = query.power_intervals(conn, flt)
        samples = query.gpu_samples(conn, flt)
        busy = query.busy_intervals(conn, flt)
        names = [args.node] if args.node else query.nodes(conn)
    tz = dt.datetime.now().astimezone().tzinfo or dt.UTC
    days: list[EnergyRow] = []
    for name in names:
        node_cfg = cfg.nodes.get(name) if cfg is not None else None
        host = _DEFAULT_HOST if node_cfg is None else HostPower(node_cfg.host_idle_watts,
                                                                node_cfg.host_sleep_watts)
        days += energy_by_day(name, intervals, samples, host, since=flt.since or 0.0,
                              until=now, tz=tz, busy=busy)
    price = cfg.history.price_per_kwh if cfg is not None else None
    currency = cfg.history.currency if cfg is not None else ""
    if args.json:
        return _emit(json.dumps({"days": [dataclasses.asdict(r) for r in days],
                                 "weeks": [dataclasses.asdict(r) for r in by_week(days)],
                                 "price_per_kwh": price}, indent=1))
    text = format_energy(days, price, currency) + "\n\n" + format_energy(by_week(days), price,
                                                                        currency)
    if cfg is None:
        text += (f"\n\nhost watts: defaults ({_DEFAULT_HOST.idle_w:g} W idle, "
                 f"{_DEFAULT_HOST.sleep_w:g} W asleep); pass -c CONFIG for the nodes' own")
    return _emit(text)


def _emit(text: str) -> int:
    """Print ``text``; a reader that went away (``| head``) ends the command quietly."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that is silent too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_OK


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}ms" if value < 10_000 else f"{value / 1000:.1f}s"


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def format_requests(rows: Sequence[RequestRecord]) -> str:
    """The requests table of ``edge-proxy history``."""
    if not rows:
        return "no requests in this window"
    head = ("TIME", "NODE", "MODEL", "REQUEST", "STATUS", "OUTCOME", "HELD", "TTFB", "TOTAL",
            "PROMPT", "GEN", "PROMPT/S", "GEN/S")
    body = [(_when(r.t), r.node, r.model or "-", f"{r.method} {r.path}", _num(r.status),
             r.outcome, _ms(r.held_ms) if r.held_ms else "-", _ms(r.ttfb_ms), _ms(r.total_ms),
             _num(r.prompt_tokens), _num(r.predicted_tokens), _num(r.prompt_per_s, "{:.1f}"),
             _num(r.predicted_per_s, "{:.1f}")) for r in rows]
    return _table([head, *body])


def _size(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f}{unit}"


def format_connections(rows: Sequence[ConnectionRecord]) -> str:
    """The TCP connections table of ``edge-proxy history``."""
    head = ("TIME", "NODE", "ROUTE", "UP", "DOWN", "HELD", "DURATION", "WOKE")
    body = [(_when(c.t), c.node, c.route, _size(c.bytes_up), _size(c.bytes_down),
             _ms(c.held_ms) if c.held_ms else "-", _ms(c.duration_ms), "yes" if c.woke else "-")
            for c in rows]
    return _table([head, *body])


def format_wakes(rows: Sequence[WakeRecord]) -> str:
    """The wakes table of ``edge-proxy history``: each step in ms after the first packet."""
    if not rows:
        return "no wakes in this window"
    head = ("WAKE STARTED", "NODE", "OUTCOME", "PACKETS", "HOST UP", "PORT OPEN", "READY",
            "TOTAL", "REASON")
    body = [(_when(w.started), w.node, w.outcome, str(w.packets), _ms(w.host_up_ms),
             _ms(w.port_open_ms), _ms(w.ready_ms), _ms(w.total_ms), w.reason) for w in rows]
    return _table([head, *body])


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f}h"


def format_energy(rows: Sequence[EnergyRow], price: float | None, currency: str) -> str:
    """The per-period energy table of ``edge-proxy energy``."""
    if not rows:
        return "no power states recorded in this window"
    head = ["NODE", "PERIOD", "ASLEEP", "AWAKE IDLE", "BUSY", "USED kWh", "SAVED kWh"]
    if price is not None:
        head += [f"USED {currency}".strip(), f"SAVED {currency}".strip()]
    body: list[list[str]] = []
    for r in rows:
        line = [r.node, r.period, _hours(r.asleep_s), _hours(r.awake_s), _hours(r.busy_s),
                f"{r.used_kwh:.3f}", f"{r.saved_kwh:.3f}"]
        money: Any = r.money(price)
        if money is not None:
            line += [f"{money[0]:.2f}", f"{money[1]:.2f}"]
        body.append(line)
    return _table([head, *body])
