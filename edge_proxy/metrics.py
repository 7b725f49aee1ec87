"""The proxy's Prometheus metrics, in one registry per proxy (so tests can run several)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from edge_proxy.wake.machine import State

# The kernel's TCP counters; ListenOverflows counts connections dropped at a full accept queue.
NETSTAT_PATH = Path("/proc/net/netstat")
# How often the kernel's drop count is compared: also the most often it is logged.
OVERFLOW_CHECK_INTERVAL_S = 10.0

log = logging.getLogger(__name__)

# Wakes take seconds (resume from suspend) to minutes (cold boot and model load).
WAKE_BUCKETS_S = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class RouteMetrics:
    """One route's labelled counters and gauges."""

    connections: Any
    active: Any
    held: Any
    timed_out: Any
    refused: Any
    up: Any
    down: Any
    idle: dict[str, Any]  # by side: "client", "upstream"


class ProxyMetrics:
    """Every counter and gauge the proxy exports, labelled by node (and route = listen address)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.wakes = Counter("edge_wakes", "Wakes that ended, by outcome (ready, timeout)",
                             ["node", "outcome"], registry=r)
        self.wake_failures = Counter("edge_wake_failures",
                                     "Wakes that failed (no ready backend within wake_timeout_s)",
                                     ["node"], registry=r)
        self.wake_seconds = Histogram("edge_wake_duration_seconds",
                                      "Time from the first magic packet to a ready backend",
                                      ["node"], buckets=WAKE_BUCKETS_S, registry=r)
        self.packets = Counter("edge_magic_packets_sent", "Magic packets sent", ["node"], registry=r)
        self.packet_errors = Counter("edge_magic_packet_errors", "Magic packets that failed to send",
                                     ["node"], registry=r)
        self.state = Gauge("edge_node_state", "1 for the node's current wake state",
                           ["node", "state"], registry=r)
        labels = ["node", "route"]
        self.connections = Counter("edge_connections", "Client connections accepted", labels,
                                   registry=r)
        self.active = Gauge("edge_connections_active", "Connections being relayed", labels,
                            registry=r)
        self.held = Gauge("edge_connections_held", "Connections held while the node wakes", labels,
                          registry=r)
        self.timed_out = Counter("edge_connections_timed_out",
                                 "Held connections closed because the wake timed out", labels,
                                 registry=r)
        self.refused = Counter("edge_connections_refused",
                               "Connections refused at once because a held-connection limit was hit",
                               labels, registry=r)
        self.idle_closed = Counter("edge_connections_idle_closed",
                                   "Relays ended because a side was idle too long (side = who "
                                   "was silent: client or upstream)", [*labels, "side"],
                                   registry=r)
        self.bytes = Counter("edge_bytes_relayed", "Bytes relayed", [*labels, "direction"],
                             registry=r)

        r.register(ListenOverflows())

    def route(self, node: str, route: str) -> RouteMetrics:
        """The per-route children, looked up once (a label lookup per connection adds up)."""
        return RouteMetrics(
            connections=self.connections.labels(node, route),
            active=self.active.labels(node, route),
            held=self.held.labels(node, route),
            timed_out=self.timed_out.labels(node, route),
            refused=self.refused.labels(node, route),
            up=self.bytes.labels(node, route, "up"),
            down=self.bytes.labels(node, route, "down"),
            idle={side: self.idle_closed.labels(node, route, side)
                  for side in ("client", "upstream")},
        )

    def set_state(self, node: str, state: State) -> None:
        for s in State:
            self.state.labels(node, s.name).set(1 if s is state else 0)


def listen_overflows(text: str) -> int | None:
    """``TcpExt: ListenOverflows`` from the text of ``/proc/net/netstat`` (None: not there)."""
    rows = [line.split() for line in text.splitlines() if line.startswith("TcpExt:")]
    if len(rows) != 2 or "ListenOverflows" not in rows[0]:
        return None
    return int(rows[1][rows[0].index("ListenOverflows")])


def read_listen_overflows(path: Path = NETSTAT_PATH) -> int | None:
    """The kernel's ``ListenOverflows`` now, or None where there is no such counter."""
    try:
        return listen_overflows(path.read_text())
    except OSError:
        return None


async def watch_listen_overflows(interval_s: float = OVERFLOW_CHECK_INTERVAL_S,
                                 path: Path = NETSTAT_PATH) -> None:
    """Until cancelled: one warning per interval in which the kernel dropped connections at
    a full accept queue (clients the proxy never saw, so nothing else can log them)."""
    last = read_listen_overflows(path)
    while True:
        await trio.sleep(interval_s)
        now = read_listen_overflows(path)
        if last is not None and now is not None and now > last:
            log.warning("the kernel dropped %d connection(s) at a full accept queue in the "
                        "last %g s (whole host, TcpExt ListenOverflows); if the proxy's "
                        "listeners are busy, raise net.core.somaxconn", now - last, interval_s)
        last = now


class ListenOverflows(Collector):
    """Connections the kernel dropped because an accept queue was full. The kernel counts them
    for the whole host only, so the count covers every listener on it, the proxy's among them;
    a rising count with the proxy's listeners busy means clients were turned away unseen."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        value = read_listen_overflows()
        if value is not None:
            yield CounterMetricFamily(
                "edge_host_listen_overflows", "Connections dropped by the kernel at a full "
                "accept queue, on the whole host (TcpExt ListenOverflows)", value=value)
