"""TCP routes: accept clients, connect them to an AWAKE backend, or hold them while it wakes.

One ``Route`` per ``[[routes]]`` entry. Its accept loop runs in the route's own cancel scope
(so a reload can close it), while the connections it accepts live in the proxy-wide
connection nursery: closing a route never cuts a relay that is running.

A connection's life: if the node is AWAKE, connect (with ``probe_timeout_s``) and relay. If
not, or if that connect fails, the connection is *held*: admitted against the per-node and
overall limits (past them it is reset at once), its bytes kept in a bounded buffer, until the
node's shared wake ends: ready → connect and relay (held bytes first), timeout → reset, and
counted.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any

import trio

from edge_proxy.errors import BackendUnavailable, ClientGone, ListenError, WakeFailed
from edge_proxy.metrics import ProxyMetrics
from edge_proxy.probe import connect
from edge_proxy.tcp_routes.idle import IdleTimeouts, idle_side
from edge_proxy.tcp_routes.relay import Held, relay, reset, tune
from edge_proxy.tcp_routes.relay_loop import RelayLoop
from edge_proxy.wake.driver import NodeDriver
from edge_proxy.wake.machine import State
from shared.config.edge import LimitsConfig, RouteConfig

log = logging.getLogger(__name__)

# A backend that flips between ready and refusing is given up on after this many tries.
MAX_CONNECT_ATTEMPTS = 5
# Out of file descriptors or memory: pause accepting briefly instead of spinning (as trio does).
ACCEPT_BACKOFF_S = 0.1
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@dataclass
class Shared:
    """State every route shares: limits, the held total, open connections for shutdown."""

    limits: LimitsConfig
    metrics: ProxyMetrics
    relay_loop: RelayLoop  # where established relays move their bytes
    held_total: int = 0
    open: int = 0
    _idle: trio.Event | None = None

    def opened(self) -> None:
        self.open += 1

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return when no connection is open."""
        while self.open:
            self._idle = trio.Event()
            await self._idle.wait()


class Route:
    """One listening address relayed to one node's backend port."""

    def __init__(self, cfg: RouteConfig, driver: NodeDriver, shared: Shared) -> None:
        self.cfg = cfg
        self.driver = driver
        self.shared = shared
        self.addresses: list[tuple[str, int]] = []
        self.metrics = shared.metrics.route(cfg.node, cfg.listen)
        self._scope = trio.CancelScope()

    def __repr__(self) -> str:
        return f"<Route {self.cfg.listen} -> {self.cfg.node}:{self.cfg.backend_port}>"

    def update(self, cfg: RouteConfig, driver: NodeDriver) -> None:
        """Point an open listener at a changed backend; open connections keep theirs."""
        self.cfg = cfg
        self.driver = driver
        self.metrics = self.shared.metrics.route(cfg.node, cfg.listen)

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
                self.shared.opened()
                connections.start_soon(self._handle, stream)

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            await self._serve_client(client)
        finally:
            self.shared.closed()
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def _serve_client(self, client: trio.SocketStream) -> None:
        # a reload does not move a connection
        cfg, driver, metrics = self.cfg, self.driver, self.metrics
        node, route = cfg.node, cfg.listen
        metrics.connections.inc()
        tune(client)
        held: Held | None = None
        for _ in range(MAX_CONNECT_ATTEMPTS):
            if driver.state is State.AWAKE:
                generation = driver.machine.generation
                try:
                    backend = await connect(driver.cfg.host, cfg.backend_port,
                                            driver.cfg.probe_timeout_s)
                except BackendUnavailable as exc:
                    log.info("route %s: %s", route, exc.reason)
                    driver.connect_failed(exc, generation)
                    continue
                break
            if not self._admit():
                metrics.refused.inc()
                log.warning("route %s: connection refused: held limit reached (%d for node %s, "
                            "%d overall)", route, driver.held, node, self.shared.held_total)
                reset(client)
                return
            held = held or Held.empty(self.shared.limits.hold_buffer_bytes)
            try:
                await self._hold(client, driver, held, metrics.held)
            except WakeFailed as exc:
                metrics.timed_out.inc()
                log.warning("route %s: closing held connection: %s", route, exc)
                reset(client)
                return
            except ClientGone as exc:
                log.info("route %s: held client left: %s", route, exc)
                return
        else:
            log.warning("route %s: giving up after %d connect attempts", route,
                        MAX_CONNECT_ATTEMPTS)
            reset(client)
            return
        tune(backend)
        up, down = metrics.up, metrics.down
        driver.active += 1
        metrics.active.inc()
        idle = IdleTimeouts(cfg.upstream_idle_timeout_s, cfg.client_idle_timeout_s)
        try:
            outcome = await relay(client, backend, self.shared.relay_loop, held=held,
                                  count=lambda way, n: (up if way == "up" else down).inc(n),
                                  idle=idle)
        finally:
            driver.active -= 1
            metrics.active.dec()
        if (side := idle_side(outcome)) is not None:
            metrics.idle[side].inc()
            log.info("route %s: node %s: relay closed: the %s sent nothing for %g s (routes "
                     "%s_idle_timeout_s)", route, node, side,
                     idle.limit_s(side == "upstream"), side)
            return
        log.debug("route %s: relay %s", route, outcome)

    def _admit(self) -> bool:
        node_cfg = self.driver.cfg
        return (self.driver.held < node_cfg.max_held
                and self.shared.held_total < self.shared.limits.max_held_total)

    async def _hold(self, client: trio.SocketStream, driver: NodeDriver, held: Held,
                    metrics: Any) -> None:
        """Keep ``client``'s bytes until the node is AWAKE; raise WakeFailed or ClientGone."""
        port = self.cfg.backend_port
        driver.hold(port)
        self.shared.held_total += 1
        metrics.inc()
        outcome: list[Exception] = []
        try:
            async with trio.open_nursery() as nursery:
                async def read() -> None:
                    try:
                        await held.collect(client)
                    except ClientGone as exc:
                        outcome.append(exc)
                        nursery.cancel_scope.cancel()

                async def wait() -> None:
                    try:
                        await driver.wait_awake()
                    except WakeFailed as exc:
                        outcome.append(exc)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(read)
                nursery.start_soon(wait)
        finally:
            metrics.dec()
            self.shared.held_total -= 1
            driver.unhold(port)
        if outcome:
            raise outcome[0]
