"""Header rules for forwarding one hop (RFC 9110 §7.6.1): pure functions on raw header lists.

Headers travel as ``(name, value)`` byte pairs with lower-case names (ASGI's form). The
connection-specific ones are dropped in both directions: the fixed hop-by-hop set and every
name the ``Connection`` header lists. ``Host`` and ``Content-Length`` are rebuilt for the next
hop by the HTTP library that sends it; everything else (``Content-Encoding`` included) passes
through unchanged, so the body bytes stay as the origin made them.
"""

from __future__ import annotations

from typing import Final

from shared.h1 import RawHeaders

__all__ = ["HOP_BY_HOP", "VIA", "RawHeaders", "header", "request_headers", "response_headers"]

HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
VIA: Final = b"1.1 llamanap"
# Rebuilt for the next hop from the URL and the body sent; and ``Expect: 100-continue`` was
# answered by the proxy already (the whole body is read before the request goes on).
_REBUILT_UPSTREAM: Final = frozenset({b"host", b"content-length", b"expect"})
# The backend's own: the answer comes from the proxy (and the cache recomputes the length
# of what it stores).
_REBUILT_DOWNSTREAM: Final = frozenset({b"date", b"server"})


def _connection_tokens(headers: RawHeaders) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def _strip(headers: RawHeaders, also: frozenset[bytes]) -> RawHeaders:
    drop = HOP_BY_HOP | also | _connection_tokens(headers)
    return [(name.lower(), value) for name, value in headers if name.lower() not in drop]


def request_headers(headers: RawHeaders, client_host: str | None, host: bytes | None,
                    scheme: str) -> RawHeaders:
    """Headers to send upstream for a client request, with ``X-Forwarded-*`` and ``Via``
    added (an earlier ``Via`` stays: the recipient reads them as one list)."""
    out = _strip(headers, _REBUILT_UPSTREAM)
    if client_host:
        prior = [v for n, v in out if n == b"x-forwarded-for"]
        chain = b", ".join([*prior, client_host.encode()])
        out = [(n, v) for n, v in out if n != b"x-forwarded-for"]
        out.append((b"x-forwarded-for", chain))
    if host and not any(n == b"x-forwarded-host" for n, _ in out):
        out.append((b"x-forwarded-host", host))
    if not any(n == b"x-forwarded-proto" for n, _ in out):
        out.append((b"x-forwarded-proto", scheme.encode()))
    out.append((b"via", VIA))  # a gateway names itself in requests it forwards (§7.6.3)
    return out


def response_headers(headers: RawHeaders) -> RawHeaders:
    """Headers to send downstream for an upstream response (``Content-Length`` kept)."""
    return _strip(headers, _REBUILT_DOWNSTREAM)


def header(headers: RawHeaders, name: bytes) -> bytes | None:
    """The first value of ``name`` (lower-case), or None."""
    return next((v for n, v in headers if n == name), None)
