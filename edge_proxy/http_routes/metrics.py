"""Counters of HTTP-aware routes, registered in the proxy's own registry, and the log of
requests the proxy refused.

``route`` is the listen address (as for TCP routes). ``model`` is a model a node is known to
serve, ``none`` (the request named none) or ``other``; never a raw client string, so a client
cannot grow the label set. ``outcome`` of ``edge_http_requests``: ``relayed``, ``refused``
(held-request limit), ``wake_timeout``, ``gave_up`` (the backend kept refusing); polls answered
while the node sleeps are counted in ``edge_http_answered_without_wake`` instead.
``edge_http_refused`` counts every request the proxy itself turned away, by ``reason``
(``REFUSAL_REASONS``); each reason is also logged, at most once per ``REFUSAL_LOG_INTERVAL_S``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final, Literal

import trio
from prometheus_client import CollectorRegistry, Counter

from edge_proxy.http_routes.model_metrics import ModelMetrics

log = logging.getLogger(__name__)

RefusalReason = Literal["held_limit", "body_timeout", "too_large", "http_version", "framing",
                        "bad_request"]
REFUSAL_REASONS: Final[tuple[RefusalReason, ...]] = (
    "held_limit", "body_timeout", "too_large", "http_version", "framing", "bad_request")
# A flood refuses thousands a second: one line per route and reason this often, with the
# number of refusals the line stands for, keeps the log readable and the disk alive.
REFUSAL_LOG_INTERVAL_S: Final = 10.0


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter("edge_http_requests", "HTTP requests received, by how they ended",
                                ["route", "node", "outcome"], registry=r)
        self.no_wake = Counter(
            "edge_http_answered_without_wake",
            "Requests to a node that was not awake, answered without waking it "
            "(source: cache, config or unavailable)", ["route", "node", "source"], registry=r)
        self.wakes = Counter("edge_http_wakes",
                             "Requests that found their node asleep and started a wake",
                             ["route", "node", "model"], registry=r)
        self.held = Counter("edge_http_held_requests", "Requests held while their node woke",
                            ["route", "node", "model"], registry=r)
        self.unknown_model = Counter("edge_http_unknown_model",
                                     "Requests for a model no node behind the route serves",
                                     ["route"], registry=r)
        self.refused = Counter(
            "edge_http_refused", "Requests the proxy answered with an error of its own "
            "(held_limit 503, body_timeout 408, too_large 413, http_version 505, framing 400, "
            "bad_request 400)", ["route", "reason"], registry=r)
        self.models = ModelMetrics(r)  # per node and model: TTFT, tokens/s, outcomes


@dataclass
class LogThrottle:
    """At most one line per key per ``interval_s`` (pure: the time is passed in)."""

    interval_s: float
    _last: dict[str, float] = field(default_factory=dict)
    _suppressed: dict[str, int] = field(default_factory=dict)

    def admit(self, key: str, now: float) -> int | None:
        """None: stay quiet (this one is counted). Else a line may go out now; the number is
        how many were kept quiet since the last line for ``key``."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


class Refusals:
    """Counts and logs the requests one listener refuses."""

    def __init__(self, route: str, metrics: HttpMetrics,
                 interval_s: float = REFUSAL_LOG_INTERVAL_S) -> None:
        self.route = route
        self._counters = {reason: metrics.refused.labels(route, reason)
                          for reason in REFUSAL_REASONS}
        self._throttle = LogThrottle(interval_s)

    def __repr__(self) -> str:
        return f"<Refusals {self.route}>"

    def refused(self, reason: RefusalReason, detail: str) -> None:
        """One refused request: counted always, logged unless a line for ``reason`` went out
        less than the interval ago."""
        self._counters[reason].inc()
        quiet = self._throttle.admit(reason, trio.current_time())
        if quiet is None:
            return
        more = f" ({quiet} more since the last such line)" if quiet else ""
        log.warning("route %s: refused (%s): %s%s", self.route, reason, detail, more)
