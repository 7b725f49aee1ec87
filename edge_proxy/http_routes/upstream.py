"""One node's backend as seen by an HTTP listener: keep-alive connections that expire soon.

Requests are framed and answers parsed by h11; this module only keeps the connections. Nothing
is added or taken away on the way (no default ``Accept-Encoding``, no cookies, no redirects):
only ``Host`` and ``Content-Length`` are written for the next hop, and the body is handed on
raw (still compressed if the backend compressed it), chunk by chunk as it arrives. A request
leaves in one write, head and body together, so the backend wakes once for it.

Errors reach callers in two kinds: ``BackendUnavailable`` when no connection could be opened
(nothing was sent, so the request may be held and sent again once the node is awake), and
``UpstreamError`` for everything after that; ``UpstreamTimeout``, one of those, when a read
got no byte for the route's ``upstream_idle_timeout_s`` (a stopped or hung llama-server
accepts and then never answers).
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import h11
import trio

from edge_proxy.errors import (
    BackendUnavailable,
    UpstreamClosedEarly,
    UpstreamError,
    UpstreamTimeout,
)
from edge_proxy.http_routes.framing import is_chunked
from edge_proxy.http_routes.headers import RawHeaders
from edge_proxy.wake.machine import Event
from shared import sockio
from shared.net import open_tcp

log = logging.getLogger(__name__)

# The node agent counts open client connections to an instance's port as activity, so an
# idle kept connection would keep the GPU box from ever suspending. Idle connections are
# closed after this long: long enough to reuse one across the back-to-back requests of a
# chat turn, short enough not to matter next to any idle-suspend timeout.
UPSTREAM_KEEPALIVE_EXPIRY_S: Final = 2.0
# Idle connections kept per node; more concurrent requests open more, closed after use.
UPSTREAM_KEEPALIVE_CONNECTIONS: Final = 16
READ_BYTES: Final = 64 * 1024
# An answer head longer than this is not llama-server's (h11's own limit for a head).
MAX_HEAD_BYTES: Final = 64 * 1024
# Bodies up to this size go out in the same write as the request head; larger ones after it
# (joining them would copy the whole body once more).
JOIN_BODY_BYTES: Final = 64 * 1024
_UNREACHABLE: Final = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, errno.EHOSTDOWN}
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_BROKEN: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError)


@dataclass
class _Connection:
    stream: trio.SocketStream
    h11: h11.Connection
    idle_since: float = 0.0
    read_timeout_s: float = math.inf  # the current request's upstream_idle_timeout_s
    name: str = ""
    reusable: bool = True

    async def next_event(self) -> object:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_after(self.read_timeout_s):
                    self.h11.receive_data(await self.stream.receive_some(READ_BYTES))
                    continue
                raise upstream_timeout(self.name, self.read_timeout_s)
            return event

    async def read_head(self) -> tuple[object, bytes]:
        """The next response head as h11 parses it, and the raw bytes read after it (the
        start of the body, kept raw so an answer can be passed on as it was framed)."""
        buffered = bytearray()
        while True:
            end = buffered.find(b"\r\n\r\n")
            if end >= 0:
                self.h11.receive_data(bytes(buffered[:end + 4]))
                event = self.h11.next_event()
                rest = bytes(buffered[end + 4:])
                if isinstance(event, h11.InformationalResponse):  # 100 Continue and such
                    buffered = bytearray(rest)
                    continue
                return event, rest
            if len(buffered) > MAX_HEAD_BYTES:
                raise h11.RemoteProtocolError(f"an answer head over {MAX_HEAD_BYTES} bytes")
            with trio.move_on_after(self.read_timeout_s):
                data = await sockio.receive_some(self.stream, READ_BYTES)
                if not data:
                    if not buffered:
                        raise UpstreamClosedEarly(f"{self.name}: closed the connection "
                                                  "without answering")
                    self.h11.receive_data(bytes(buffered))
                    self.h11.receive_data(b"")
                    return self.h11.next_event(), b""
                buffered += data
                continue
            raise upstream_timeout(self.name, self.read_timeout_s)

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


class Response:
    """An answer whose head has arrived: ``status``, ``headers`` (as sent), and the body,
    readable once: decoded through ``aiter_stream()``, or raw (``chunked`` answers) from
    ``raw_start`` then ``stream``, for ``HttpRouteApp`` to pass on as it was framed."""

    def __init__(self, connection: _Connection, status: int, headers: RawHeaders,
                 raw_start: bytes) -> None:
        self._connection = connection
        self.status = status
        self.headers = headers
        self.raw_start = raw_start  # body bytes read with the head
        self.chunked = is_chunked([(n.lower(), v) for n, v in headers])

    @property
    def name(self) -> str:
        """NODE:PORT of the backend that answers."""
        return self._connection.name

    @property
    def stream(self) -> trio.SocketStream:
        """The connection's socket, for reading the raw body after ``raw_start`` (the
        connection is then not reused)."""
        self._connection.reusable = False
        return self._connection.stream

    async def aiter_stream(self) -> AsyncIterator[bytes]:
        """The body as it arrives. Chunks already read together go on as one piece: a proxy
        that falls behind a fast stream catches up with fewer writes, not more."""
        connection = self._connection
        if self.raw_start:
            connection.h11.receive_data(self.raw_start)
            self.raw_start = b""
        event = await connection.next_event()
        while True:
            if isinstance(event, h11.Data):
                parts = [bytes(event.data)]
                broken: h11.RemoteProtocolError | None = None
                try:
                    event = connection.h11.next_event()  # no I/O: only what is buffered
                    while isinstance(event, h11.Data):
                        parts.append(bytes(event.data))
                        event = connection.h11.next_event()
                except h11.RemoteProtocolError as exc:
                    broken = exc  # what came before the garbage still goes out
                yield parts[0] if len(parts) == 1 else b"".join(parts)
                if broken is not None:
                    raise broken
                if event is h11.NEED_DATA:
                    event = await connection.next_event()
            elif isinstance(event, h11.EndOfMessage):
                return
            else:  # ConnectionClosed before the end: the body is cut
                raise h11.RemoteProtocolError(f"answer cut short ({type(event).__name__})")


class Upstream:
    """Requests to ``port`` on one node. ``run()`` must run (it closes idle connections).
    ``keep_alive`` False: a connection closes after its answer (an instance on demand: an
    idle kept connection makes llama-server take ~0.1 s longer to exit when it is evicted)."""

    def __init__(self, node: str, port: int, *, keep_alive: bool = True) -> None:
        self.node = node
        self.port = port
        self.keep_alive = keep_alive
        self.in_flight = 0
        self._idle: list[_Connection] = []
        self._retired = False

    def __repr__(self) -> str:
        return (f"<Upstream {self.node}:{self.port} in_flight={self.in_flight} "
                f"idle={len(self._idle)}>")

    def retire(self) -> None:
        """The node left the listener (a reload): ``run()`` closes the idle connections and
        returns once the requests still running are done."""
        self._retired = True

    async def run(self) -> None:
        """Close connections idle for ``UPSTREAM_KEEPALIVE_EXPIRY_S``. Until cancelled or
        retired."""
        try:
            while not (self._retired and not self.in_flight):
                await trio.sleep(UPSTREAM_KEEPALIVE_EXPIRY_S / 2)
                deadline = trio.current_time() - UPSTREAM_KEEPALIVE_EXPIRY_S
                expired = [c for c in self._idle if c.idle_since <= deadline]
                self._idle = [c for c in self._idle if c.idle_since > deadline]
                for connection in expired:
                    await connection.close()
        finally:
            idle, self._idle = self._idle, []
            for connection in idle:
                await connection.close()

    @asynccontextmanager
    async def exchange(self, host: str, method: str, target: bytes, headers: RawHeaders,
                       body: bytes, connect_timeout_s: float,
                       idle_timeout_s: float = math.inf) -> AsyncIterator[Response]:
        """Send a request and yield the response once its head arrived. Raises
        ``BackendUnavailable`` (nothing sent) or ``UpstreamError`` (``UpstreamTimeout`` when
        a read, of the head or of the body, got nothing for ``idle_timeout_s``)."""
        authority = f"[{host}]" if ":" in host else host
        sent = [(b"host", f"{authority}:{self.port}".encode()), *headers]
        if body or method in _BODY_METHODS:
            sent.append((b"content-length", str(len(body)).encode()))
        self.in_flight += 1
        connection: _Connection | None = None
        try:
            connection = await self._take(host, connect_timeout_s)
            connection.read_timeout_s = idle_timeout_s
            try:
                pieces = connection.h11.send_with_data_passthrough(
                    h11.Request(method=method.encode(), target=target, headers=sent)) or []
                if body:
                    pieces += connection.h11.send_with_data_passthrough(h11.Data(data=body)) or []
                pieces += connection.h11.send_with_data_passthrough(h11.EndOfMessage()) or []
                if len(body) <= JOIN_BODY_BYTES:
                    await sockio.send_all(connection.stream, b"".join(pieces))
                else:
                    for piece in pieces:
                        await connection.stream.send_all(piece)
                try:
                    event, raw_start = await connection.read_head()
                except (trio.BrokenResourceError, OSError) as exc:
                    raise UpstreamClosedEarly(f"{self.node}:{self.port}: {exc!r} before any "
                                              "byte of the answer") from exc
                if not isinstance(event, h11.Response):
                    raise h11.RemoteProtocolError(f"no answer ({type(event).__name__})")
                response = Response(connection, event.status_code, list(event.headers),
                                    raw_start)
                if _is_event_stream(response.headers):
                    # llama-server closes the connection after a streamed answer without
                    # saying so; a request sent on it before the close arrives would fail.
                    connection.reusable = False
                yield response
            except _BROKEN as exc:
                raise UpstreamError(f"{self.node}:{self.port}: {exc!r}") from exc
        finally:
            self.in_flight -= 1
            if connection is not None:
                await self._release(connection)

    async def _take(self, host: str, connect_timeout_s: float) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.stream.socket.is_readable():  # readable while idle: closed
                return connection
            await connection.close()
        try:
            with trio.fail_after(connect_timeout_s):
                stream = await open_tcp(host, self.port)
        except trio.TooSlowError:
            raise BackendUnavailable(Event.PROBE_TIMEOUT, self._say(
                f"timed out after {connect_timeout_s:g} s")) from None
        except OSError as exc:
            event = Event.PROBE_TIMEOUT if exc.errno in _UNREACHABLE else Event.PROBE_REFUSED
            raise BackendUnavailable(event, self._say(exc.strerror or str(exc))) from exc
        return _Connection(stream, h11.Connection(h11.CLIENT), name=f"{self.node}:{self.port}")

    async def _release(self, connection: _Connection) -> None:
        state = connection.h11
        if connection.reusable and state.our_state is h11.DONE and state.their_state is h11.DONE \
                and self.keep_alive \
                and len(self._idle) < UPSTREAM_KEEPALIVE_CONNECTIONS and not self._retired:
            state.start_next_cycle()
            connection.idle_since = trio.current_time()
            self._idle.append(connection)
        else:
            await connection.close()

    def _say(self, what: str) -> str:
        return f"connect to {self.node}:{self.port}: {what}"


def upstream_timeout(name: str, timeout_s: float) -> UpstreamTimeout:
    """The error for a backend (``name``: NODE:PORT) that sent nothing for ``timeout_s``."""
    return UpstreamTimeout(f"{name}: sent nothing for {timeout_s:g} s "
                           "(routes.upstream_idle_timeout_s)")


def _is_event_stream(headers: RawHeaders) -> bool:
    return any(name.lower() == b"content-type" and value.lower().startswith(b"text/event-stream")
               for name, value in headers)


async def read_capped(response: Response, limit: int) -> bytes | None:
    """The whole body, or None once it passes ``limit`` bytes (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
