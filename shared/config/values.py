"""Parsers for the small value formats config files use: hosts, ``host:port``, MAC addresses."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from shared.config.loader import Context

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-]?)(?:[0-9a-fA-F]{2}\1){4}[0-9a-fA-F]{2}$")
# A DNS label (underscores allowed: /etc/hosts and mDNS names carry them)
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_MAX_HOSTNAME_CHARS = 253
_METHOD_RE = re.compile(r"^(\*|[A-Z]+)$")
# What a name means to the resolver on every box llamanap runs on
_LOCALHOST = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


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

    def overlaps(self, other: HostPort) -> bool:
        """True when listening on both at once would fail: same port, and the same address
        or a wildcard of the same family (Linux refuses ``0.0.0.0:80`` beside
        ``127.0.0.1:80``). Port 0 (any free port) never collides."""
        if self.port != other.port or self.port == 0:
            return False
        mine, theirs = _addresses(self.host), _addresses(other.host)
        if mine is None or theirs is None:  # a host name only the resolver knows
            return self.host.lower() == other.host.lower()
        return any(a == b or (a.version == b.version and (a.is_unspecified or b.is_unspecified))
                   for a in mine for b in theirs)


def _addresses(host: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] | None:
    if host.lower() == "localhost":
        return _LOCALHOST
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        return None


def check_host(host: str, ctx: Context, key: str, *, shown: str | None = None) -> None:
    """Raise unless ``host`` is an IPv4/IPv6 address or a well-formed host name.

    A name whose last label is a number is read as an IPv4 address (as resolvers and URL
    parsers do), so ``999.999.999.999`` and ``256.1.1.1`` are errors, not names to look up.
    ``shown`` is the text to quote in the message (the whole ``host:port``).
    """
    found = repr(shown if shown is not None else host)
    if not host:
        raise ctx.error(key, f"found {found}; expected a host name or an IP address")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ctx.error(key, f"found {found}; {host!r} is not an IPv6 address") from None
        return
    labels = host.removesuffix(".").split(".")
    if labels[-1].isdigit() or all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ctx.error(key, f"found {found}; {host!r} is not an IPv4 address (four numbers "
                            "0-255 such as 192.168.1.50)") from None
        return
    if len(host) > _MAX_HOSTNAME_CHARS or not all(_LABEL_RE.match(label) for label in labels):
        raise ctx.error(key, f"found {found}; {host!r} is not a host name (letters, digits and "
                        "- between dots) or an IP address")


def check_http_url(url: str, ctx: Context, key: str) -> None:
    """Raise unless ``url`` is ``http(s)://HOST:PORT[/...]`` with a valid host and port."""
    expected = f"found {url!r}; expected http://HOST:PORT"
    if not url.startswith(("http://", "https://")):
        raise ctx.error(key, expected)
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.port == 0:  # .port raises for a port out of range or not a number
            raise ValueError("port 0")
    except ValueError:
        raise ctx.error(key, f"{expected} (PORT 1 to 65535)") from None
    if not parts.hostname:
        raise ctx.error(key, expected)
    check_host(parts.hostname, ctx, key, shown=url)


def parse_hostport(text: str, ctx: Context, key: str, *, allow_port_zero: bool = False) -> HostPort:
    """``"0.0.0.0:8080"``, ``"[::]:8080"``, ``"localhost:80"`` into a ``HostPort``."""
    expected = 'expected "HOST:PORT" such as "0.0.0.0:8080" or "[::]:8080"'
    host, sep, port_text = text.rpartition(":")
    # isascii: str.isdigit() also accepts digits such as "²" that int() refuses
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ctx.error(key, f"found {text!r}; {expected}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ctx.error(key, f"found {text!r}; {expected}")
        host = host[1:-1]
        if ":" not in host:
            raise ctx.error(key, f"found {text!r}; {host!r} is not an IPv6 address")
    elif ":" in host:
        raise ctx.error(key, f"found {text!r}; put IPv6 addresses in brackets: \"[{host}]:{port_text}\"")
    check_host(host, ctx, key, shown=text)
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


def split_rule(text: str) -> tuple[str, str]:
    """A no-wake rule ``"METHOD /path"`` into its method and path; ``ValueError`` says why not.

    The config check and the HTTP listener both parse rules with this, so a rule the check
    accepts never fails when the listener starts.
    """
    parts = text.split()
    if len(parts) != 2:
        raise ValueError(f'found {text!r}; expected "METHOD /path" such as "GET /v1/models" '
                         "(METHOD may be *)")
    method, path = parts
    if not _METHOD_RE.match(method):
        raise ValueError(f"found {text!r}; method {method!r}: expected an upper-case HTTP "
                         "method or *")
    if not path.startswith("/"):
        raise ValueError(f"found {text!r}; path {path!r}: a path starts with /")
    return method, path
