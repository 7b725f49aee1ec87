"""TCP routes: accept clients, connect them to an AWAKE backend, or hold them while it wakes.

One ``Route`` per ``[[routes]]`` entry. Its accept loop runs in the route's own cancel scope
(so a reload can close it), while the connections it accepts live in the proxy-wide
connection nursery: closing a route never cuts a relay that is running.

A connection's life: if the node is AWAKE, connect (with ``probe_timeout_s``) and relay. If
not, or if that connect fails, the connection is *held*: admitted against the per-node and
overall limits (past them it is reset at once), its bytes kept in a bounded buffer, until the
node's shared wake ends: ready → connect and relay (held bytes first), timeout → reset, and
counted. Admitting, holding and connecting are ``edge_proxy.admission``'s one step, shared with
HTTP routes; this module adds what is TCP's own: reading the held client's bytes meanwhile.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Mapping
from functools import partial

import trio

from edge_proxy.admission import (
    Admission,
    Connected,
    ConnectionCounts,
    Hold,
    LeftWhileHeld,
    NotLoaded,
    NotWoken,
    Refused,
)
from edge_proxy.errors import ClientGone, ListenError
from edge_proxy.history.hooks import ConnectionLog
from edge_proxy.history.store import Recorder
from edge_proxy.loading import ModelGate
from edge_proxy.metrics import ProxyMetrics, RouteMetrics
from edge_proxy.probe import connect
from edge_proxy.tcp_routes.idle import IdleTimeouts, idle_side
from edge_proxy.tcp_routes.relay import Held, relay, reset, tune
from edge_proxy.tcp_routes.relay_loop import RelayLoop
from edge_proxy.wake.driver import NodeDriver
from shared.config.edge import RouteConfig

log = logging.getLogger(__name__)

# Out of file descriptors or memory: pause accepting briefly instead of spinning (as trio does).
ACCEPT_BACKOFF_S = 0.1
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class Route:
    """One listening address relayed to one node's backend port."""

    def __init__(self, cfg: RouteConfig, driver: NodeDriver, counts: ConnectionCounts,
                 metrics: ProxyMetrics, relay_loop: RelayLoop,
                 recorder: Recorder | None = None,
                 gates: Mapping[str, ModelGate] | None = None) -> None:
        self.cfg = cfg
        self.recorder = recorder  # None: no history rows
        self.gates = gates or {}  # nodes with an agent: their models on demand (the proxy's)
        self.driver = driver
        self.counts = counts
        self.proxy_metrics = metrics
        self.relay_loop = relay_loop  # where established relays move their bytes
        self.addresses: list[tuple[str, int]] = []
        self.metrics = metrics.route(cfg.node, cfg.listen)
        self._scope = trio.CancelScope()

    def __repr__(self) -> str:
        return f"<Route {self.cfg.listen} -> {self.cfg.node}:{self.cfg.backend_port}>"

    def update(self, cfg: RouteConfig, driver: NodeDriver) -> None:
        """Point an open listener at a changed backend; open connections keep theirs."""
        self.cfg = cfg
        self.driver = driver
        self.metrics = self.proxy_metrics.route(cfg.node, cfg.listen)

    def stop(self) -> None:
        """Stop accepting (the listening sockets close); connections carry on."""
        self._scope.cancel()

    async def serve(self, connections: trio.Nursery, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report the bound addresses via ``task_status``, accept until ``stop()``."""
        addr = self.cfg.listen_addr
        try:
            listeners = await trio.open_tcp_listeners(addr.port, host=addr.host)
        except OSError as exc:
            hint = "stop the other program or pick another port" if exc.errno == errno.EADDRINUSE \
                else "use an address of this machine"
            raise ListenError(f"route {self.cfg.listen}: cannot listen: "
                              f"{exc.strerror or exc}; {hint}") from exc
        self.addresses = [ln.socket.getsockname()[:2] for ln in listeners]
        log.info("route %s -> %s:%d listening on %s", self.cfg.listen, self.cfg.node,
                 self.cfg.backend_port, ", ".join(f"{h}:{p}" for h, p in self.addresses))
        with self._scope:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept, listener, connections)
                task_status.started()
        for listener in listeners:
            await listener.aclose()
        log.info("route %s closed", self.cfg.listen)

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_RESOURCE_ERRORS:
                        raise
                    log.error("route %s: accept failed: %s; pausing %.1f s", self.cfg.listen,
                              exc.strerror, ACCEPT_BACKOFF_S)
                    await trio.sleep(ACCEPT_BACKOFF_S)
                    continue
                self.counts.opened()
                connections.start_soon(self._handle, stream)

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            await self._serve_client(client)
        finally:
            self.counts.closed()
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def _serve_client(self, client: trio.SocketStream) -> None:
        # a reload does not move a connection
        cfg, driver, metrics = self.cfg, self.driver, self.metrics
        route = cfg.listen
        metrics.connections.inc()
        tune(client)
        held: Held | None = None

        async def read_while_held(hold: Hold) -> str | None:
            nonlocal held  # made at the first hold, kept across holds; cancelled at release
            held = held or Held.empty(self.counts.limits.hold_buffer_bytes)
            try:
                await held.collect(client)
            except ClientGone as exc:
                return str(exc)
            return None

        row = None if self.recorder is None else ConnectionLog(
            self.recorder, route, cfg.node, clock=trio.current_time, wall=time.time)
        gate = self.gates.get(cfg.node)
        # the instance behind this port, when the agent said which one it is
        need = gate.need_for_port(cfg.backend_port) if gate is not None else None
        admission = Admission(driver, cfg.backend_port, self.counts, route, need)
        outcome = await admission.connect(
            lambda: connect(driver.cfg.host, cfg.backend_port, driver.cfg.probe_timeout_s),
            holding=metrics.held.track_inprogress if row is None
            else partial(row.holding, metrics.held.track_inprogress),
            while_held=read_while_held)
        if isinstance(outcome, Connected):
            try:
                await self._relay(client, outcome.value, held, cfg, driver, metrics, row)
            finally:
                if row is not None:
                    row.finish()
            return
        if isinstance(outcome, Refused):
            metrics.refused.inc()
            log.warning("route %s: connection refused: %s", route, outcome.reason)
        elif isinstance(outcome, NotWoken):
            metrics.timed_out.inc()
            log.warning("route %s: closing held connection: %s", route, outcome.reason)
        elif isinstance(outcome, NotLoaded):
            metrics.timed_out.inc()
            log.warning("route %s: closing held connection: model %s did not load: %s",
                        route, outcome.model, outcome.reason)
        elif isinstance(outcome, LeftWhileHeld):
            log.info("route %s: held client left: %s", route, outcome.reason)
            return
        else:
            log.warning("route %s: giving up after %d connect attempts", route,
                        outcome.attempts)
        reset(client)

    async def _relay(self, client: trio.SocketStream, backend: trio.SocketStream,
                     held: Held | None, cfg: RouteConfig, driver: NodeDriver,
                     metrics: RouteMetrics, row: ConnectionLog | None = None) -> None:
        """Relay (the held bytes first) with the settings the connection started with."""
        tune(backend)
        up, down = metrics.up, metrics.down

        def count(way: str, n: int) -> None:
            (up if way == "up" else down).inc(n)
            if row is not None:
                row.count(way, n)

        driver.active += 1
        metrics.active.inc()
        idle = IdleTimeouts(cfg.upstream_idle_timeout_s, cfg.client_idle_timeout_s)
        try:
            outcome = await relay(client, backend, self.relay_loop, held=held,
                                  count=count,
                                  idle=idle)
        finally:
            driver.active -= 1
            metrics.active.dec()
        if (side := idle_side(outcome)) is not None:
            metrics.idle[side].inc()
            log.info("route %s: node %s: relay closed: the %s sent nothing for %g s (routes "
                     "%s_idle_timeout_s)", cfg.listen, cfg.node, side,
                     idle.limit_s(side == "upstream"), side)
            return
        log.debug("route %s: relay %s", cfg.listen, outcome)
