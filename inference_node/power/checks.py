"""Activity checks: each says in words why the node must stay awake, or None when it may sleep.

A check is a small object with ``name`` and ``async check() -> str | None``. The sources of
truth (instance activity, the GPU inventory, the inhibit registry) are passed in as
callables, so every check can be built and tested on its own. Whatever blocks (the process
table, a command) runs off the event loop.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Protocol

import psutil
import trio

from inference_node.power.proxy_addresses import ProxyAddresses, normal_ip
from inference_node.power.tcp_table import Conn, established_to
from inference_node.process_tree import with_descendants

log = logging.getLogger(__name__)

COMMAND_CHECK_TIMEOUT_S = 10.0  # a user command that hangs must not freeze the idle loop
INHIBITOR_QUERY_TIMEOUT_S = 5.0


class Check(Protocol):
    name: str

    async def check(self) -> str | None:
        """A readable reason to stay awake, or None when this check sees no activity."""
        ...


@dataclass
class InstanceBusyCheck:
    """Any instance with a task in progress (from its log lines, reconciled with /slots)."""

    busy: Callable[[], Mapping[str, int]]  # instance -> tasks in progress
    name: str = "instances"

    async def check(self) -> str | None:
        working = {k: v for k, v in self.busy().items() if v > 0}
        if not working:
            return None
        parts = [f"{n} ({t} task{'s' if t != 1 else ''})" for n, t in sorted(working.items())]
        return "busy instance: " + ", ".join(parts)


@dataclass
class InstanceStartingCheck:
    """Any instance still starting (loading its model): a suspend now would kill the load, and
    whoever started it (a reload, a resume, a request) wants it served."""

    starting: Callable[[], Iterable[str]]  # names of instances in STARTING
    name: str = "starting"

    async def check(self) -> str | None:
        names = sorted(self.starting())
        if not names:
            return None
        if len(names) == 1:
            return f"instance {names[0]} is starting (loading its model)"
        return f"instances {', '.join(names)} are starting (loading their models)"


@dataclass
class ConnectionsCheck:
    """Client TCP connections open to an instance's port (an idle keep-alive counts too).

    Connections the agent itself opened (health checks, /slots polls) do not count, nor those
    from the edge proxy (``proxy``: its probes, pooled and polling connections; the proxy
    vetoes a suspend itself while it relays anything).
    """

    ports: Callable[[], Iterable[int]]
    proxy: ProxyAddresses | None = None
    name: str = "connections"

    async def check(self) -> str | None:
        ports = set(self.ports())
        if not ports:
            return None
        ignored = await self.proxy.resolve() if self.proxy is not None else set()
        conns = await trio.to_thread.run_sync(established_to, ports)
        return connection_reason(conns, ports, os.getpid(), ignored)


def connection_reason(conns: Sequence[Conn], ports: set[int], own_pid: int,
                      ignored: Set[str] = frozenset()) -> str | None:
    """Pure part of ``ConnectionsCheck``: count server-side connections not opened by us
    nor from an ``ignored`` address."""
    ours = {(c.laddr.ip, c.laddr.port) for c in conns if c.pid == own_pid and c.laddr}
    peers: dict[int, list[str]] = {}
    for c in conns:
        if not c.laddr or not c.raddr or c.laddr.port not in ports:
            continue
        if (c.raddr.ip, c.raddr.port) in ours and _is_loopback(c.raddr.ip):
            continue
        if c.pid == own_pid:  # our own client side of a loopback connection
            continue
        if ignored and normal_ip(c.raddr.ip) in ignored:
            continue
        peers.setdefault(c.laddr.port, []).append(c.raddr.ip)
    if not peers:
        return None
    parts = [f"port {p}: {len(ips)} from {', '.join(sorted(set(ips)))}" for p, ips in sorted(peers.items())]
    return "client connections open: " + "; ".join(parts)


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass
class ForeignGpuProcessCheck:
    """GPU compute processes the agent did not start (a training job, a notebook)."""

    processes: Callable[[], Iterable[tuple[int, str]]]  # (pid, GPU name or UUID)
    instance_pids: Callable[[], Iterable[int]]  # our instances' processes; their children count too
    name: str = "gpu-processes"

    async def check(self) -> str | None:
        processes, roots = list(self.processes()), list(self.instance_pids())
        if not processes or {pid for pid, _ in processes} <= set(roots):
            return None
        # Walking the process tree reads /proc for every process: not on the event loop.
        return await trio.to_thread.run_sync(foreign_process_reason, processes, roots)


def foreign_process_reason(processes: Sequence[tuple[int, str]], roots: Iterable[int]) -> str | None:
    """Blocking part of ``ForeignGpuProcessCheck``: GPU processes outside our process trees."""
    ours = with_descendants(roots)
    foreign = [(pid, gpu) for pid, gpu in processes if pid not in ours]
    if not foreign:
        return None
    parts = [f"pid {pid} ({_process_name(pid)}) on {gpu}" for pid, gpu in sorted(foreign)]
    return "GPU in use by another program: " + ", ".join(parts)


def _process_name(pid: int) -> str:
    try:
        return str(psutil.Process(pid).name())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"


@dataclass
class LoggedInUsersCheck:
    """Someone logged in on a terminal or over SSH."""

    name: str = "users"

    async def check(self) -> str | None:
        users = psutil.users()
        if not users:
            return None
        who = sorted({f"{u.name}@{u.terminal or '?'}" for u in users})
        return "logged in: " + ", ".join(who)


@dataclass
class InhibitorLockCheck:
    """logind inhibitor locks that block sleep (``systemd-inhibit --what=sleep ...``)."""

    name: str = "inhibitors"
    argv: Sequence[str] = ("systemd-inhibit", "--list", "--no-pager", "--no-legend", "--mode=block")

    async def check(self) -> str | None:
        with trio.move_on_after(INHIBITOR_QUERY_TIMEOUT_S):
            try:
                result = await trio.run_process(list(self.argv), capture_stdout=True,
                                                capture_stderr=True, check=False)
            except OSError as exc:
                log.warning("cannot list inhibitor locks (%s); ignoring them", exc)
                return None
            return inhibitor_reason(result.stdout.decode(errors="replace"))
        return None


def inhibitor_reason(listing: str) -> str | None:
    """Pure part of ``InhibitorLockCheck``: lines of ``WHO UID USER PID COMM WHAT WHY MODE``."""
    holders = []
    for line in listing.splitlines():
        cols = line.split()
        if len(cols) >= 8 and "sleep" in cols[5].split(":") and cols[-1] == "block":
            holders.append(f"{cols[0]} ({' '.join(cols[6:-1])})")
    return ("inhibitor lock: " + ", ".join(holders)) if holders else None


@dataclass
class Inhibit:
    id: int
    reason: str
    until: float  # trio time


@dataclass
class InhibitRegistry:
    """Inhibits held through the API/CLI (``node-agent inhibit --for 2h "reason"``)."""

    _items: dict[int, Inhibit] = field(default_factory=dict)
    _next_id: int = 1

    def add(self, reason: str, duration_s: float, now: float) -> Inhibit:
        item = Inhibit(self._next_id, reason, now + duration_s)
        self._items[item.id] = item
        self._next_id += 1
        return item

    def remove(self, inhibit_id: int) -> bool:
        return self._items.pop(inhibit_id, None) is not None

    def active(self, now: float) -> list[Inhibit]:
        for key in [k for k, v in self._items.items() if v.until <= now]:
            del self._items[key]
        return sorted(self._items.values(), key=lambda i: i.until)


@dataclass
class ApiInhibitCheck:
    registry: InhibitRegistry
    now: Callable[[], float] = trio.current_time
    name: str = "inhibit"

    async def check(self) -> str | None:
        now = self.now()
        items = self.registry.active(now)
        if not items:
            return None
        return "inhibited: " + ", ".join(f"{i.reason!r} for {i.until - now:.0f} s more" for i in items)


@dataclass
class CommandCheck:
    """A user command: exit status 0 means busy, and its first line of output is the reason."""

    argv: Sequence[str]
    name: str = "command"

    async def check(self) -> str | None:
        with trio.move_on_after(COMMAND_CHECK_TIMEOUT_S) as scope:
            try:
                result = await trio.run_process(list(self.argv), capture_stdout=True,
                                                capture_stderr=True, check=False)
            except OSError as exc:
                return f"busy_command {self.argv[0]!r} cannot run ({exc.strerror}); staying awake"
        if scope.cancelled_caught:
            return f"busy_command timed out after {COMMAND_CHECK_TIMEOUT_S:.0f} s; staying awake"
        if result.returncode != 0:
            return None
        first = result.stdout.decode(errors="replace").strip().splitlines()
        return first[0] if first else f"busy_command {self.argv[0]!r} says busy"


async def gather_reasons(checks: Sequence[Check]) -> list[str]:
    """Run every check; one that crashes counts as active, so a bug never suspends the box."""
    reasons: list[str] = []
    for c in checks:
        try:
            reason = await c.check()
        except Exception as exc:
            log.exception("check %s failed", c.name)
            reason = f"check {c.name} failed: {exc}"
        if reason:
            reasons.append(reason)
    return reasons
