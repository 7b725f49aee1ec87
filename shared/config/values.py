"""Parsers for the small value formats config files use: ``host:port``, MAC addresses."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from shared.config.loader import Context

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-]?)(?:[0-9a-fA-F]{2}\1){4}[0-9a-fA-F]{2}$")


@dataclass(frozen=True)
class HostPort:
    """A listen or connect address. ``host`` is bare (no brackets for IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_hostport(text: str, ctx: Context, key: str, *, allow_port_zero: bool = False) -> HostPort:
    """``"0.0.0.0:8080"``, ``"[::]:8080"``, ``"localhost:80"`` into a ``HostPort``."""
    expected = 'expected "HOST:PORT" such as "0.0.0.0:8080" or "[::]:8080"'
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ctx.error(key, f"found {text!r}; {expected}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ctx.error(key, f"found {text!r}; {expected}")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ctx.error(key, f"found {text!r}; {host!r} is not an IPv6 address") from exc
    elif ":" in host:
        raise ctx.error(key, f"found {text!r}; put IPv6 addresses in brackets: \"[{host}]:{port_text}\"")
    port = int(port_text)
    lowest = 0 if allow_port_zero else 1
    if not lowest <= port <= 65535:
        raise ctx.error(key, f"found port {port}; allowed: {lowest} to 65535")
    return HostPort(host, port)


def parse_mac(text: str, ctx: Context, key: str) -> bytes:
    """``"aa:bb:cc:dd:ee:ff"`` (``:``, ``-`` or no separator) into 6 bytes."""
    if not _MAC_RE.match(text):
        raise ctx.error(key, f"found {text!r}; expected a MAC address such as \"aa:bb:cc:dd:ee:ff\"")
    return bytes.fromhex(re.sub(r"[:-]", "", text))
