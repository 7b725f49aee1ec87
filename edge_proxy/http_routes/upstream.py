"""One node's backend as seen by an HTTP listener: a small keep-alive pool that empties itself.

Requests go out through httpcore (the connection layer of httpx) directly, so nothing is
added or taken away on the way: no default ``Accept-Encoding``, no cookie jar, no redirects, no
TLS set-up for plain-HTTP backends, and the response body is read raw (still compressed if
the backend compressed it) and chunk by chunk as it arrives. Only ``Host`` and
``Content-Length`` are written here, for the next hop.

Errors reach callers in two kinds: ``BackendUnavailable`` when no connection could be opened
(nothing was sent, so the request may be held and sent again once the node is awake), and
``UpstreamError`` for everything after that.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import httpcore
import trio

from edge_proxy.http_routes.connect import DirectBackend
from edge_proxy.http_routes.headers import RawHeaders
from edge_proxy.node import Event
from edge_proxy.probe import BackendUnavailable

log = logging.getLogger(__name__)

# The node agent counts open client connections to an instance's port as activity, so an
# idle pooled connection would keep the GPU box from ever suspending. Idle connections are
# closed after this long: long enough to reuse one across the back-to-back requests of a
# chat turn, short enough not to matter next to any idle-suspend timeout.
UPSTREAM_KEEPALIVE_EXPIRY_S: Final = 2.0
# Idle connections kept per node; more concurrent requests open more, closed after use.
UPSTREAM_KEEPALIVE_CONNECTIONS: Final = 16
_UNREACHABLE: Final = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, errno.EHOSTDOWN}
_FAILURES: Final = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException)
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


class UpstreamError(Exception):
    """The backend failed after a connection was open (reset, malformed answer, ...)."""


class Upstream:
    """Requests to ``port`` on one node. ``run()`` must run (it closes idle connections)."""

    def __init__(self, node: str, port: int) -> None:
        self.node = node
        self.port = port
        self.in_flight = 0
        self._pool_: httpcore.AsyncConnectionPool | None = None
        self._last_done = 0.0
        self._retired = False

    def retire(self) -> None:
        """The node left the listener (a reload): ``run()`` closes the pool and returns once
        the requests still using it are done."""
        self._retired = True

    def __repr__(self) -> str:
        pooled = "pool open" if self._pool_ is not None else "no pool"
        return f"<Upstream {self.node}:{self.port} in_flight={self.in_flight} {pooled}>"

    def _pool(self) -> httpcore.AsyncConnectionPool:
        if self._pool_ is None:
            self._pool_ = httpcore.AsyncConnectionPool(
                max_connections=None, max_keepalive_connections=UPSTREAM_KEEPALIVE_CONNECTIONS,
                keepalive_expiry=UPSTREAM_KEEPALIVE_EXPIRY_S, network_backend=DirectBackend())
        return self._pool_

    async def run(self) -> None:
        """Close the pool whenever it has been idle for ``UPSTREAM_KEEPALIVE_EXPIRY_S``
        (httpcore only drops expired connections when the next request comes). Until cancelled
        or retired."""
        try:
            while not (self._retired and not self.in_flight):
                await trio.sleep(UPSTREAM_KEEPALIVE_EXPIRY_S / 2)
                idle_s = trio.current_time() - self._last_done
                if self._pool_ is not None and not self.in_flight \
                        and idle_s >= UPSTREAM_KEEPALIVE_EXPIRY_S:
                    pool, self._pool_ = self._pool_, None
                    await pool.aclose()
        finally:
            if self._pool_ is not None:
                with trio.CancelScope(shield=True):
                    await self._pool_.aclose()

    @asynccontextmanager
    async def exchange(self, host: str, method: str, target: bytes, headers: RawHeaders,
                       body: bytes, connect_timeout_s: float) -> AsyncIterator[httpcore.Response]:
        """Send a request and yield the response once its headers arrived (``status``,
        ``headers`` as sent, ``aiter_stream()`` for the body). Raises ``BackendUnavailable``
        (nothing sent) or ``UpstreamError``."""
        authority = f"[{host}]" if ":" in host else host
        sent = [(b"host", f"{authority}:{self.port}".encode()), *headers]
        if body or method in _BODY_METHODS:
            sent.append((b"content-length", str(len(body)).encode()))
        url = httpcore.URL(scheme=b"http", host=host.encode(), port=self.port, target=target)
        timeout = {"connect": connect_timeout_s, "read": None, "write": None, "pool": None}
        request = httpcore.Request(method.encode(), url, headers=sent, content=body,
                                   extensions={"timeout": timeout})
        self.in_flight += 1
        try:
            try:
                response = await self._pool().handle_async_request(request)
            except httpcore.ConnectTimeout as exc:
                raise BackendUnavailable(Event.PROBE_TIMEOUT, self._say(
                    f"timed out after {connect_timeout_s:g} s")) from exc
            except httpcore.ConnectError as exc:
                event = Event.PROBE_TIMEOUT if _errno(exc) in _UNREACHABLE else Event.PROBE_REFUSED
                raise BackendUnavailable(event, self._say(str(exc) or type(exc).__name__)) from exc
            except _FAILURES as exc:
                raise UpstreamError(f"{self.node}:{self.port}: {exc!r}") from exc
            try:
                yield response
            except _FAILURES as exc:
                raise UpstreamError(f"{self.node}:{self.port}: {exc!r}") from exc
            finally:
                with trio.CancelScope(shield=True):
                    await response.aclose()
        finally:
            self.in_flight -= 1
            self._last_done = trio.current_time()

    def _say(self, what: str) -> str:
        return f"connect to {self.node}:{self.port}: {what}"


def _errno(exc: BaseException) -> int | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


async def read_capped(response: httpcore.Response, limit: int) -> bytes | None:
    """The whole body, or None once it passes ``limit`` bytes (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
