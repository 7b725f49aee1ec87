"""What to load, what to evict, what to unload: pure policy, time and memory passed in.

Observations: every instance as an ``InstanceView`` (load mode, phase, estimated MiB per
device, busy, end of its last task, TTL) and the memory as ``Memory`` (free MiB per device
as measured, total per device, the optional ``memory_budget_mib`` cap per device).

``decide_load(name, views, memory, now, waiting_since, evict_wait_s)`` returns one of:

- ``Ready``: already loaded; ``JoinLoad``: a load of it is in flight (wait for READY);
- ``Load(evict=...)``: start it now, after stopping these idle on-demand instances, least
  recently used first, and only as many as the short devices need;
- ``Wait``: it would fit once a busy on-demand instance finishes its task, or once an
  instance that is stopping has exited; after ``evict_wait_s`` of waiting this is a
  ``Refuse`` instead;
- ``Refuse``: it cannot fit: bigger than a device (or the budget) on its own, or held out
  by ``always`` instances and other loads.

Rules: ``always`` instances and instances with a task in progress are never evicted; the
memory of a loading instance counts as used (its buffers may not be allocated yet, so
measured free memory overstates what is left), which keeps two loads from racing for the
same memory. ``ttl_expired(views, now)`` lists on-demand instances idle for ``ttl_s``
since their last task ended (``ttl_s = 0`` keeps them loaded; never while a task runs).
Every decision carries the reason a person reads in the log.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

Mib = Mapping[str, float]  # device key (GPU UUID, or "host") -> MiB


class LoadMode(enum.Enum):
    ALWAYS = "always"
    ON_DEMAND = "on-demand"


class Phase(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    STOPPING = "stopping"


@dataclass(frozen=True)
class InstanceView:
    """One instance as the policy sees it. ``last_use`` is when its last task ended (or it
    became ready, if it never had one); None when never used."""

    name: str
    mode: LoadMode
    phase: Phase
    need_mib: Mib
    busy: bool = False
    last_use: float | None = None
    ttl_s: float = 0.0


@dataclass(frozen=True)
class Memory:
    """Memory per device. ``free_mib`` is measured (NVML) and already excludes what running
    instances allocated; a device without a measurement is limited by the budget alone.
    ``total_mib`` bounds what one instance can ever have; ``budget_mib`` caps, per device,
    what the instances together may take by their estimates (None: no cap)."""

    free_mib: Mib = field(default_factory=dict)
    total_mib: Mib = field(default_factory=dict)
    budget_mib: float | None = None


@dataclass(frozen=True)
class Ready:
    reason: str = "already loaded"


@dataclass(frozen=True)
class JoinLoad:
    reason: str = "a load is in progress"


@dataclass(frozen=True)
class Load:
    evict: tuple[str, ...]
    reason: str
    evict_reason: str = ""


@dataclass(frozen=True)
class Wait:
    reason: str
    waiting_for: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refuse:
    reason: str


Decision = Ready | JoinLoad | Load | Wait | Refuse


@dataclass(frozen=True)
class Unload:
    name: str
    reason: str


def fmt_mib(x: float) -> str:
    return f"{x:,.0f} MiB"


def available(views: Sequence[InstanceView], memory: Memory, devices: Sequence[str],
              exclude: frozenset[str] = frozenset()) -> dict[str, float]:
    """MiB a new load may take per device: measured free less what loading instances will
    still allocate, capped by the budget less the estimates of every loaded instance."""
    out: dict[str, float] = {}
    for dev in devices:
        limits: list[float] = []
        if dev in memory.free_mib:
            loading = sum(v.need_mib.get(dev, 0.0) for v in views
                          if v.phase is Phase.LOADING and v.name not in exclude)
            limits.append(memory.free_mib[dev] - loading)
        if memory.budget_mib is not None:
            held = sum(v.need_mib.get(dev, 0.0) for v in views
                       if v.phase is not Phase.UNLOADED and v.name not in exclude)
            limits.append(memory.budget_mib - held)
        out[dev] = min(limits) if limits else float("inf")
    return out


def decide_load(name: str, views: Sequence[InstanceView], memory: Memory, now: float,
                waiting_since: float | None = None, evict_wait_s: float = 0.0) -> Decision:
    """The decision for a request of instance ``name`` (see module doc)."""
    by_name = {v.name: v for v in views}
    me = by_name[name]
    if me.phase is Phase.READY:
        return Ready()
    if me.phase is Phase.LOADING:
        return JoinLoad()
    too_big = _too_big(me, memory)
    if too_big is not None:
        return Refuse(too_big)
    devices = sorted(me.need_mib)
    if me.phase is Phase.STOPPING:
        return _wait_or_refuse(name, f"{name} is stopping; it loads again once it has exited",
                               (name,), now, waiting_since, evict_wait_s)
    free = available(views, memory, devices)
    if _fits(me.need_mib, free):
        return Load((), f"needs {_need(me)}, {_free(free)} free")
    # Evict idle on-demand instances, least recently used first, each only if it holds
    # memory on a device that is still short.
    idle = sorted((v for v in views if _evictable(v) and v.name != name),
                  key=lambda v: (v.last_use is not None, v.last_use or 0.0, v.name))
    chosen: list[str] = []
    for v in idle:
        short = [d for d in devices if me.need_mib[d] > free[d]]
        if not short:
            break
        if any(v.need_mib.get(d, 0.0) > 0 for d in short):
            chosen.append(v.name)
            free = _freed(free, v, memory)
    if _fits(me.need_mib, free):
        before = available(views, memory, devices)
        why = f"evicted for {name}: needs {_need(me)}, {_free(before)} free"
        return Load(tuple(chosen), f"needs {_need(me)}, {_free(before)} free; evicting "
                    f"{', '.join(chosen)}", why)
    # Would it fit once busy on-demand instances finish, or stopping ones exit?
    later = [v for v in views if v.name != name and v.mode is LoadMode.ON_DEMAND
             and (v.phase is Phase.STOPPING or (v.phase is Phase.READY and v.busy))
             and any(v.need_mib.get(d, 0.0) > 0 for d in devices)]
    for v in later:
        free = _freed(free, v, memory)
    if later and _fits(me.need_mib, free):
        names = tuple(v.name for v in later)
        busy = [v.name for v in later if v.phase is Phase.READY]
        what = (f"waiting for {', '.join(busy)} to finish its task" if busy
                else f"waiting for {', '.join(names)} to stop")
        return _wait_or_refuse(name, f"{what} ({_need(me)} needed)", names, now,
                               waiting_since, evict_wait_s)
    now_free = available(views, memory, devices)
    holders = [v.name for v in views if v.name != name and v.phase is not Phase.UNLOADED
               and not _evictable(v) and v.mode is LoadMode.ALWAYS]
    held = f"; always-loaded: {', '.join(holders)}" if holders else ""
    return Refuse(f"model {name} does not fit: needs {_need(me)}, {_free(now_free)} free "
                  f"and nothing idle to evict{held}")


def ttl_expired(views: Sequence[InstanceView], now: float) -> list[Unload]:
    """On-demand instances whose TTL ran out since their last task ended (never busy ones,
    never with ``ttl_s = 0``), oldest first."""
    out = [(v.last_use or 0.0, Unload(v.name, f"idle for ttl {v.ttl_s:g} s"))
           for v in views if v.mode is LoadMode.ON_DEMAND and v.phase is Phase.READY
           and not v.busy and v.ttl_s > 0 and v.last_use is not None
           and now - v.last_use >= v.ttl_s]
    return [u for _, u in sorted(out, key=lambda t: (t[0], t[1].name))]


def ttl_left(v: InstanceView, now: float) -> float | None:
    """Seconds until ``v`` is unloaded for its TTL; None when it is not counting down."""
    if (v.mode is not LoadMode.ON_DEMAND or v.phase is not Phase.READY or v.busy
            or v.ttl_s <= 0 or v.last_use is None):
        return None
    return max(v.last_use + v.ttl_s - now, 0.0)


def next_ttl_deadline(views: Sequence[InstanceView], now: float) -> float | None:
    """Seconds until the next TTL unload is due (None: none counting down)."""
    left = [t for v in views if (t := ttl_left(v, now)) is not None]
    return min(left) if left else None


def _evictable(v: InstanceView) -> bool:
    return v.mode is LoadMode.ON_DEMAND and v.phase is Phase.READY and not v.busy


def _too_big(me: InstanceView, memory: Memory) -> str | None:
    for dev, need in sorted(me.need_mib.items()):
        caps = []
        if dev in memory.total_mib:
            caps.append((memory.total_mib[dev], f"{dev} has {fmt_mib(memory.total_mib[dev])}"))
        if memory.budget_mib is not None:
            caps.append((memory.budget_mib,
                         f"agent.memory_budget_mib is {fmt_mib(memory.budget_mib)}"))
        for cap, what in caps:
            if need > cap:
                return (f"model {me.name} needs {fmt_mib(need)} on {dev}, more than the "
                        f"whole budget: {what}")
    return None


def _wait_or_refuse(name: str, reason: str, names: tuple[str, ...], now: float,
                    waiting_since: float | None, evict_wait_s: float) -> Wait | Refuse:
    since = now if waiting_since is None else waiting_since
    if now - since >= evict_wait_s:
        return Refuse(f"model {name}: gave up after {evict_wait_s:g} s (evict_wait_s): {reason}")
    return Wait(reason, names)


def _freed(free: Mapping[str, float], v: InstanceView, memory: Memory) -> dict[str, float]:
    out = dict(free)
    for dev, mib in v.need_mib.items():
        if dev in out:
            out[dev] += mib
    return out


def _fits(need: Mib, free: Mapping[str, float]) -> bool:
    return all(need[d] <= free[d] for d in need)


def _need(v: InstanceView) -> str:
    return fmt_mib(sum(v.need_mib.values()))


def _free(free: Mapping[str, float]) -> str:
    total = sum(free.values())
    return "unlimited" if total == float("inf") else fmt_mib(max(total, 0.0))
