"""The edge proxy's addresses, whose connections to instance ports are not use.

The proxy probes readiness, relays polls and keeps idle upstream connections pooled; counted
as clients they would keep the node awake forever (a frontend polling ``/v1/models`` every
30 s, a probe that lands in the suspend sequence). The proxy vetoes a suspend itself while
it relays anything, so ignoring its connections loses nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import urllib.parse
from typing import Final

import trio

from shared.config.node import NodeAgentConfig

log = logging.getLogger(__name__)

# A proxy given by name is looked up again after this long (it may move; DNS may be slow).
RESOLVE_TTL_S: Final = 300.0
RESOLVE_TIMEOUT_S: Final = 5.0


def proxy_hosts(config: NodeAgentConfig) -> list[str]:
    """``power.ignore_connections_from``, else the host of ``[proxy] url``, else none."""
    if config.power.ignore_connections_from is not None:
        return list(config.power.ignore_connections_from)
    if config.proxy is None:
        return []
    host = urllib.parse.urlsplit(config.proxy.url).hostname
    return [host] if host else []


def normal_ip(text: str) -> str:
    """One spelling per address: no zone, IPv4-mapped IPv6 as IPv4."""
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class ProxyAddresses:
    """The IP addresses of ``hosts`` (literals as given, names looked up, cached)."""

    def __init__(self, hosts: list[str]) -> None:
        self.hosts = hosts
        self._ips: set[str] = set()
        self._until = -math.inf

    def __repr__(self) -> str:
        return f"<ProxyAddresses {self.hosts} -> {sorted(self._ips)}>"

    async def resolve(self) -> set[str]:
        now = trio.current_time()
        if now < self._until:
            return self._ips
        ips: set[str] = set()
        for host in self.hosts:
            try:
                ips.add(str(ipaddress.ip_address(host.strip("[]"))))
                continue
            except ValueError:
                pass
            found: list[tuple[object, ...]] = []
            with trio.move_on_after(RESOLVE_TIMEOUT_S):
                try:
                    found = list(await trio.socket.getaddrinfo(host, None))
                except OSError as exc:
                    log.warning("power: cannot look up the proxy %r (%s); its connections count "
                                "as use until it resolves", host, exc)
            ips.update(normal_ip(str(info[4][0])) for info in found)  # type: ignore[index]
        self._ips, self._until = ips, now + RESOLVE_TTL_S
        return ips
