"""Counters of HTTP-aware routes, registered in the proxy's own registry.

``route`` is the listen address (as for TCP routes). ``model`` is a model a node is known to
serve, ``none`` (the request named none) or ``other``; never a raw client string, so a client
cannot grow the label set. ``outcome`` of ``edge_http_requests``: ``relayed``, ``refused``
(held-request limit), ``wake_timeout``, ``gave_up`` (the backend kept refusing); polls answered
while the node sleeps are counted in ``edge_http_answered_without_wake`` instead.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


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
