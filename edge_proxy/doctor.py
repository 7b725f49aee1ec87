"""``edge-proxy doctor``: can this box wake each node, and is each node reachable now?

Per node: the Wake-on-LAN path. The broadcast address must parse, ``wol.source`` (if set)
must be an address of this machine, and the kernel must have a route to the broadcast
address; the outgoing interface is found by ``connect()`` on a UDP socket, which sends
nothing. The doctor never sends a magic packet. Then whether the address is the directed
broadcast of the interface it leaves from: routers drop directed broadcasts to other LANs.

Per route: a TCP connect to the node's backend port, with the outcomes the wake state
machine knows: connected (awake), refused (host up, service down), timed out (asleep or gone).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil
import trio

from edge_proxy.errors import BackendUnavailable
from edge_proxy.probe import check_ready, connect
from edge_proxy.wake.machine import Event
from shared.config.edge import EdgeConfig, NodeConfig, load_edge_config
from shared.doctor import CheckResult, add_output_arguments, fail, ok, report, warn

# Long enough for a busy LAN, short enough that a sleeping node (which never answers) does
# not stall the report: all routes are tried at once, so this bounds the whole wait.
CONNECT_TIMEOUT_S: Final = 2.0
LIMITED_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class LocalAddress:
    """An IPv4 address of this machine, its interface and its LAN (from psutil)."""

    interface: str
    address: ipaddress.IPv4Address
    network: ipaddress.IPv4Network

    @property
    def broadcast(self) -> ipaddress.IPv4Address:
        return self.network.broadcast_address


def local_addresses() -> list[LocalAddress]:
    """Every IPv4 address of this machine, with the interface that holds it."""
    found = []
    for iface, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and a.netmask:
                network = ipaddress.IPv4Network(f"{a.address}/{a.netmask}", strict=False)
                found.append(LocalAddress(iface, ipaddress.IPv4Address(a.address), network))
    return found


def check_wol_path(name: str, node: NodeConfig, local: list[LocalAddress]) -> CheckResult:
    """Whether magic packets for ``node`` have a way out of this box, and where they go."""
    check, key, wol = f"wol {name}", f"nodes.{name}.wol", node.wol
    try:
        target = ipaddress.ip_address(wol.broadcast)
    except ValueError:
        return fail(check, f"{key}.broadcast = {wol.broadcast!r} is not an IP address",
                    f"set {key}.broadcast to the broadcast address of {name}'s LAN, e.g. the "
                    "LAN prefix with .255 for a /24")
    family = socket.AF_INET6 if target.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if wol.source:
            try:
                sock.bind((wol.source, 0))
            except (OSError, OverflowError) as exc:
                mine = ", ".join(f"{a.address} ({a.interface})" for a in local) or "none"
                return fail(check, f"{key}.source = {wol.source!r} is not an address of this "
                            f"machine ({_reason(exc)})", f"use one of: {mine}; or remove it")
        try:
            sock.connect((str(target), wol.port))  # picks the route; sends nothing
        except OSError as exc:
            return fail(check, f"no route to {target}:{wol.port} ({_reason(exc)})",
                        f"connect this box to {name}'s LAN, or fix {key}.broadcast / .source")
        source = ipaddress.ip_address(sock.getsockname()[0])
    return _classify(check, key, target, source, local)


def _classify(check: str, key: str, target: Address, source: Address,
              local: list[LocalAddress]) -> CheckResult:
    out = next((a for a in local if a.address == source), None)
    via = f"from {source}" + (f" ({out.interface})" if out else "")
    if target.is_loopback or target.version == 6:
        return ok(check, f"to {target} {via}")
    if target == LIMITED_BROADCAST:
        return ok(check, f"limited broadcast leaves {via}; if the node is on another NIC's LAN, "
                  f"set {key}.source to this box's address there")
    if out is not None and target == out.broadcast:
        return ok(check, f"directed broadcast of {out.interface}'s LAN {out.network}, sent {via}")
    other = next((a for a in local if a.broadcast == target), None)
    if other is not None:
        return warn(check, f"{target} is the broadcast of {other.interface}'s LAN, but the route "
                    f"leaves {via}", f"set {key}.source = \"{other.address}\"")
    if out is not None and target in out.network:
        return warn(check, f"{target} is a host on {out.interface}'s LAN, not its broadcast: a "
                    "sleeping node answers no ARP, so packets to its address rarely arrive",
                    f"set {key}.broadcast = \"{out.broadcast}\"")
    return warn(check, f"{target} is not the broadcast of a LAN this box is on (sent {via}); "
                "routers drop directed broadcasts to other LANs by default",
                "run the proxy on a box in the node's LAN, or let the router forward the "
                "directed broadcast")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return str(exc)


async def check_reach(name: str, node: NodeConfig, port: int, http_path: str | None,
                      timeout_s: float = CONNECT_TIMEOUT_S) -> CheckResult:
    """One TCP connect to the backend: connected, refused or timed out (and readiness)."""
    check, where = f"reach {name}:{port}", f"{node.host}:{port}"
    try:
        await trio.socket.getaddrinfo(node.host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return fail(check, f"cannot resolve {node.host!r} ({exc})",
                    f"fix nodes.{name}.host (an IP address never needs DNS)")
    try:
        stream = await connect(node.host, port, timeout_s)
    except BackendUnavailable as exc:
        if exc.event is Event.PROBE_TIMEOUT:
            return warn(check, f"{where}: no answer ({exc.reason}): asleep, or gone",
                        f"if {name} should be awake: check the host, the port and its firewall")
        return warn(check, f"{where}: refused: the host is up, the service is not ({exc.reason})",
                    f"start the model server on {name}, or fix the route's backend_port")
    await stream.aclose()
    if http_path is None:
        return ok(check, f"{where}: connected")
    reason = None
    with trio.move_on_after(timeout_s):  # the probe's own HTTP wait is longer than a doctor's
        try:
            reason = await check_ready(node.host, port, http_path, timeout_s)
        except BackendUnavailable as exc:
            return ok(check, f"{where}: connected, not ready yet ({exc.reason})")
    if reason is None:
        return ok(check, f"{where}: connected, no answer to GET {http_path} within {timeout_s:g} s")
    return ok(check, f"{where}: connected, ready ({reason})")


async def run_checks(cfg: EdgeConfig, *, timeout_s: float = CONNECT_TIMEOUT_S) -> list[CheckResult]:
    """The WoL path of every node, then every distinct backend, tried concurrently."""
    local = local_addresses()
    results = [check_wol_path(name, node, local) for name, node in sorted(cfg.nodes.items())]
    paths: dict[tuple[str, int], str | None] = {}
    for r in cfg.routes:  # one connect per backend; an HTTP readiness path if any route has one
        key = (r.node, r.backend_port)
        paths[key] = paths.get(key) or r.ready_http_path
    targets = [(node, port, path) for (node, port), path in sorted(paths.items())]
    reached: list[CheckResult | None] = [None] * len(targets)

    async def one(i: int, node: str, port: int, path: str | None) -> None:
        reached[i] = await check_reach(node, cfg.nodes[node], port, path, timeout_s)

    async with trio.open_nursery() as nursery:
        for i, (node, port, path) in enumerate(targets):
            nursery.start_soon(one, i, node, port, path)
    return results + [r for r in reached if r is not None]


def _doctor(args: argparse.Namespace) -> int:
    cfg = load_edge_config(args.config)
    results = trio.run(run_checks, cfg)
    return report(results, as_json=args.json, out=sys.stdout)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], default_config: Path) -> None:
    p = sub.add_parser(
        "doctor", help="check that this box can wake each node and reach it",
        description="For each node: can magic packets leave this box towards its broadcast "
        "address (no packet is sent)? For each route: does the backend accept a TCP connection "
        "now (connected, refused, timed out)? Exit code 0 when nothing failed, 1 otherwise.")
    p.add_argument("-c", "--config", type=Path, default=default_config,
                   help=f"config file (default {default_config})")
    add_output_arguments(p)
    p.set_defaults(func=_doctor)
