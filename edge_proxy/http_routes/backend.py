"""One backend of an HTTP listener: a route's node and port, its wake driver and its pool."""

from __future__ import annotations

from dataclasses import dataclass

from edge_proxy.http_routes.upstream import Upstream
from edge_proxy.wake.driver import NodeDriver
from edge_proxy.wake.machine import State
from shared.config.edge import RouteConfig


@dataclass
class NodeBackend:
    """One route behind the listener: its node's wake driver, its connection pool, and its
    key there (``models.backend_keys``: the node's name, or NODE:PORT)."""

    route: RouteConfig
    driver: NodeDriver
    upstream: Upstream
    key: str

    @property
    def name(self) -> str:
        return self.route.node

    def is_awake(self) -> bool:
        return self.driver.state is State.AWAKE

    def agent_port(self) -> int | None:
        """The port whose models this backend takes from its node's agent: its own when
        its node has other routes on the listener, else None (all of them)."""
        return self.route.backend_port if self.key != self.name else None
