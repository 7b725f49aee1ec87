"""On a resume, start first what the proxy holds requests for.

A node woken by a request should answer that request first: the proxy says what it holds
for the node (``ProxyClient.held``: the models held requests named, the backend ports
held connections wait for), the agent lifts the supervisor's hold and asks the on-demand
scheduler for each of those instances (on-demand and ``always`` alike, so the memory
check holds), and waits until they are READY, at most ``HELD_FIRST_WAIT_S``. Only then
does the power manager start the ``always`` instances. A proxy that cannot be reached, or
that holds nothing this node has, changes nothing: the instances start as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import trio

from inference_node.errors import LoadFailed, LoadRefused, ProxyUnreachable
from shared.events import HeldWork

log = logging.getLogger(__name__)

# What held requests wait for gets this long to become READY before the other instances
# start anyway (a big model from a slow disk may take minutes; the rest then waits no more).
HELD_FIRST_WAIT_S: Final = 300.0


class HeldSource(Protocol):
    async def held(self) -> HeldWork:
        """What the proxy holds for this node; raises ``ProxyUnreachable``."""
        ...


class Scheduler(Protocol):
    """What this needs of the on-demand scheduler."""

    def instances_for(self, models: Sequence[str], ports: Sequence[int]) -> list[str]:
        """The instances serving these models or listening on these ports."""
        ...

    async def load_instance(self, name: str, *, until_ready: bool = True) -> object:
        """Load ``name`` through the scheduler's decision; raises LoadRefused/LoadFailed."""
        ...


class HeldFirst:
    """``await start(reason)``: start what the proxy holds requests for, return the names."""

    def __init__(self, proxy: HeldSource, scheduler: Scheduler,
                 lift_hold: Callable[[], None]) -> None:
        self.proxy = proxy
        self.scheduler = scheduler
        self.lift_hold = lift_hold

    def __repr__(self) -> str:
        return f"<HeldFirst wait={HELD_FIRST_WAIT_S:g} s>"

    async def start(self, reason: str) -> list[str]:
        """The instances started first (READY, failed, or out of time), or [] when the
        proxy holds nothing for them or cannot be asked."""
        try:
            held = await self.proxy.held()
        except ProxyUnreachable as exc:
            log.warning("power: could not ask the proxy what it holds: %s; starting the "
                        "instances in config order", exc)
            return []
        names = self.scheduler.instances_for(held.models, held.ports)
        if not names:
            return []
        what = ", ".join(held.models) if held.models else \
            "ports " + ", ".join(map(str, held.ports))
        log.info("power: starting %s first (%s): the proxy holds requests for %s",
                 ", ".join(names), reason, what)
        self.lift_hold()
        with trio.move_on_after(HELD_FIRST_WAIT_S) as scope:
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(self._load, name)
        if scope.cancelled_caught:
            log.warning("power: %s not READY after %.0f s; starting the other instances",
                        ", ".join(names), HELD_FIRST_WAIT_S)
        return names

    async def _load(self, name: str) -> None:
        try:
            await self.scheduler.load_instance(name)
        except (LoadRefused, LoadFailed) as exc:
            log.warning("power: %s, started first for held requests: %s", name, exc)
