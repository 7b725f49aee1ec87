"""The one step between accepting a client and talking to its node: admit, hold, connect.

Both route kinds (TCP routes and HTTP-aware routes) go through ``Admission.connect``:

1. The node is ready (AWAKE): connect. A refused or timed-out connect is reported to the
   driver (so its machine sees the backend go away) and the step starts over.
2. Not ready: admit the connection against the per-node ``max_held`` and the proxy-wide
   ``limits.max_held_total`` (past them: ``Refused``, at once), count it as held, and wait
   for the node's one shared wake. A route's ``while_held`` hook runs meanwhile (the TCP
   route keeps the client's bytes, the HTTP route sends SSE comments). The wake ends: ready
   → back to 1; failed → ``NotWoken``.
3. A backend that keeps refusing is given up on after ``MAX_CONNECT_ATTEMPTS`` connects
   (``GaveUp``); the holds between them do not count.

What a held connection waits for is listed in one place, ``Admission.ready`` and
``Admission.wait_ready``: the node awake, then (``model``, for a node with an agent) its
model loaded, so every route kind holds for a load the same way as for a wake. A failed or
timed-out load is ``NotLoaded``.

``ConnectionCounts`` is the state all routes share: how many connections are open (a
graceful stop waits for them) and held (against ``limits.max_held_total``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Final, Generic, TypeAlias, TypeVar

import trio

from edge_proxy.errors import BackendUnavailable, LoadFailed, WakeFailed
from edge_proxy.loading import ModelNeed
from edge_proxy.wake.driver import NodeDriver
from edge_proxy.wake.machine import Event, State
from shared.config.edge import LimitsConfig

log = logging.getLogger(__name__)

# A backend that flips between ready and refusing is given up on after this many connects.
MAX_CONNECT_ATTEMPTS: Final = 5

T = TypeVar("T")


class Hold:
    """One held connection's side of the wait, as its route's ``while_held`` hook sees it.

    The hook runs beside the wait and is cancelled when the wait ends, except inside
    ``uninterrupted()``: a send in there is finished first (an SSE comment cut halfway would
    garble the stream). A cancel from outside (the client left, shutdown) still cuts it.
    """

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.released = False
        self.left: str | None = None  # why the client left, as the hook saw it
        self._busy = 0

    @contextmanager
    def uninterrupted(self) -> Iterator[None]:
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            if self.released and not self._busy:
                self.scope.cancel()

    def release(self) -> None:
        """The wait ended: stop the hook now, or once its uninterrupted part is done."""
        self.released = True
        if not self._busy:
            self.scope.cancel()


# Runs beside the wait while a connection is held (see ``Hold``); returns a reason early when
# the client left, which ends the hold.
WhileHeld: TypeAlias = Callable[[Hold], Awaitable[str | None]]


@dataclass
class ConnectionCounts:
    """Connections of every route: open (for a graceful stop) and held (against limits)."""

    limits: LimitsConfig
    open: int = 0
    held_total: int = 0
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

    def hold(self) -> None:
        self.held_total += 1

    def unhold(self) -> None:
        self.held_total -= 1

    def has_room(self, driver: NodeDriver) -> bool:
        """Whether one more connection may be held for ``driver``'s node."""
        return (driver.held < driver.cfg.max_held
                and self.held_total < self.limits.max_held_total)


# ---- outcomes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Connected(Generic[T]):
    """The backend answered: ``value`` is what the route's ``connect`` returned."""

    value: T


@dataclass(frozen=True)
class Refused:
    """A held-connection limit was reached; the connection was never held."""

    reason: str


@dataclass(frozen=True)
class NotWoken:
    """The node's wake failed (timed out, or the node left the config)."""

    reason: str


@dataclass(frozen=True)
class NotLoaded:
    """The node woke but the model on demand did not load (the agent's reason, or a timeout)."""

    model: str
    reason: str


@dataclass(frozen=True)
class LeftWhileHeld:
    """The client went away while held (as the route's ``while_held`` hook saw it)."""

    reason: str


@dataclass(frozen=True)
class GaveUp:
    """The backend kept refusing after the node was ready, ``attempts`` times."""

    attempts: int


Outcome: TypeAlias = Connected[T] | Refused | NotWoken | NotLoaded | LeftWhileHeld | GaveUp


# ---- the step ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Admission:
    """One connection's way to ``port`` on ``driver``'s node (built per connection, so a
    reload does not move it). ``route`` names the route in log lines."""

    driver: NodeDriver
    port: int
    counts: ConnectionCounts
    route: str
    model: ModelNeed | None = None  # a model on demand to load once the node is awake

    def ready(self) -> bool:
        """Whether a connection may go to the backend now (see ``wait_ready``)."""
        return self.driver.state is State.AWAKE and (self.model is None or self.model.ready())

    async def wait_ready(self) -> None:
        """Return once ``ready()`` holds; raise ``WakeFailed`` or ``LoadFailed`` when it
        cannot come to be. Everything a held connection waits for is awaited here, in order."""
        await self.driver.wait_awake()
        if self.model is not None:
            await self.model.wait_loaded()

    async def connect(self, connect: Callable[[], Awaitable[T]], *,
                      holding: Callable[[], AbstractContextManager[object]] = nullcontext,
                      while_held: WhileHeld | None = None) -> Outcome[T]:
        """Admit, hold until ready, then ``connect()``; retry it when it raises
        ``BackendUnavailable``. ``holding()`` is entered around each hold (the route's own
        counters), ``while_held`` runs beside each wait. Other exceptions of ``connect``
        propagate."""
        driver = self.driver
        attempts = 0
        # Only connects count: each hold ends in a failed wake (returned) or in readiness.
        while attempts < MAX_CONNECT_ATTEMPTS:
            if self.ready():
                attempts += 1
                generation = driver.machine.generation
                try:
                    return Connected(await connect())
                except BackendUnavailable as exc:
                    log.info("route %s: %s", self.route, exc.reason)
                    if self.model is not None and exc.event is Event.PROBE_REFUSED:
                        # the host is up, the instance on demand went (TTL, eviction): the
                        # agent, not this port, says whether the node is up; load it again
                        self.model.gone()
                    else:
                        driver.connect_failed(exc, generation)
                    continue
            if not self.counts.has_room(driver):
                return Refused(f"held limit reached ({driver.held} for node {driver.name}, "
                               f"{self.counts.held_total} overall)")
            with holding():
                ended = await self._hold(while_held)
            if ended is not None:
                return ended
        return GaveUp(attempts)

    async def _hold(self, while_held: WhileHeld | None
                    ) -> NotWoken | NotLoaded | LeftWhileHeld | None:
        """Count the connection as held while ``wait_ready`` runs; None once ready."""
        driver, counts = self.driver, self.counts
        model = None if self.model is None else self.model.model
        driver.hold(self.port, model)
        counts.hold()
        hold = Hold()
        failure: NotWoken | NotLoaded | None = None
        try:
            async with trio.open_nursery() as nursery:
                if while_held is not None:
                    nursery.start_soon(_beside, while_held, hold, nursery.cancel_scope)
                try:
                    await self.wait_ready()
                except WakeFailed as exc:
                    failure = NotWoken(str(exc))  # returned, not raised out of the nursery
                except LoadFailed as exc:
                    failure = NotLoaded(exc.model, exc.reason)
                finally:
                    hold.release()
        finally:
            counts.unhold()
            driver.unhold(self.port, model)
        if hold.left is not None:
            return LeftWhileHeld(hold.left)
        return failure


async def _beside(hook: WhileHeld, hold: Hold, wait: trio.CancelScope) -> None:
    with hold.scope:
        hold.left = await hook(hold)
        if hold.left is not None:
            wait.cancel()  # the client left: the hold ends
