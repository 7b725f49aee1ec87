"""One node's backend as seen by an HTTP listener: keep-alive connections that expire soon.

Requests are written and answer heads read by ``answer_head`` (RFC 9112's framing, by hand:
h11 cost more than the rest of the proxy's work on a request); bodies are taken as the head
frames them (``Content-Length``, chunked, or until the close). Nothing is added or taken away on the way (no default ``Accept-Encoding``, no cookies, no redirects):
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
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import trio

from edge_proxy.errors import (
    BackendUnavailable,
    UpstreamClosedEarly,
    UpstreamError,
    UpstreamTimeout,
)
from edge_proxy.http_routes.answer_head import (
    AnswerHead,
    AnswerHeadError,
    Framing,
    parse_answer_head,
    request_head,
)
from edge_proxy.http_routes.framing import ChunkedScanner, FramingError
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
# An answer head longer than this is not llama-server's (h11's limit for a head, too).
MAX_HEAD_BYTES: Final = 64 * 1024
# Bodies up to this size go out in the same write as the request head; larger ones after it
# (joining them would copy the whole body once more).
JOIN_BODY_BYTES: Final = 64 * 1024
_HEAD_END: Final = re.compile(rb"\n\r?\n")  # the blank line after the headers (CRLF or LF)
_UNREACHABLE: Final = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, errno.EHOSTDOWN}
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_BROKEN: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, AnswerHeadError)


@dataclass
class _Connection:
    stream: trio.SocketStream
    buffered: bytes = b""  # read from the backend, not yet taken
    idle_since: float = 0.0
    read_timeout_s: float = math.inf  # the current request's upstream_idle_timeout_s
    name: str = ""
    reusable: bool = True  # False once anything makes another request on it unsafe
    done: bool = False  # the current answer was read to its end

    async def receive(self) -> bytes:
        """What was buffered, else the next read (``b""``: the backend closed)."""
        if self.buffered:
            data, self.buffered = self.buffered, b""
            return data
        with trio.move_on_after(self.read_timeout_s):
            return await sockio.receive_some(self.stream, READ_BYTES)
        raise upstream_timeout(self.name, self.read_timeout_s)

    async def read_head(self, method: str) -> tuple[AnswerHead, bytes]:
        """The next answer's head (interim 1xx answers skipped), and the bytes read after
        it (the start of the body, kept raw so an answer can be passed on as it was
        framed)."""
        buffered = b""
        while True:
            end = _HEAD_END.search(buffered)
            if end is not None:
                head = parse_answer_head(buffered[:end.end()], method)
                buffered = buffered[end.end():]
                if head.informational:  # 100 Continue and such
                    continue
                if not head.keep_alive:
                    self.reusable = False
                return head, buffered
            if len(buffered) > MAX_HEAD_BYTES:
                raise AnswerHeadError(f"an answer head over {MAX_HEAD_BYTES} bytes")
            data = await self.receive()
            if not data:
                if not buffered:
                    raise UpstreamClosedEarly(f"{self.name}: closed the connection "
                                              "without answering")
                raise AnswerHeadError("the connection closed in the middle of the answer head")
            buffered += data

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


class Response:
    """An answer whose head has arrived: ``status``, ``headers`` (as sent), and the body,
    readable once: unframed through ``aiter_stream()``, or raw (``chunked`` answers) from
    ``raw_start`` then ``stream``, for ``HttpRouteApp`` to pass on as it was framed."""

    def __init__(self, connection: _Connection, head: AnswerHead, raw_start: bytes) -> None:
        self._connection = connection
        self._head = head
        self.status = head.status
        self.headers = head.headers
        self.raw_start = raw_start  # body bytes read with the head
        self.chunked = head.framing is Framing.CHUNKED
        if head.framing is Framing.NONE:
            self._body_read(raw_start)

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
        """The body as it arrives, one piece per read: a proxy that falls behind a fast
        stream catches up with fewer writes, not more. Raises ``AnswerHeadError`` for a
        chunked body whose framing is broken, ``UpstreamError`` for a body cut short."""
        head, connection = self._head, self._connection
        data, self.raw_start = self.raw_start, b""
        if head.framing is Framing.NONE:
            return
        if head.framing is Framing.LENGTH:
            left = head.length
            while left:
                if not data:
                    data = await connection.receive()
                    if not data:
                        raise _cut(connection, f"{head.length - left} of {head.length} bytes")
                piece, data = data[:left], data[left:]
                left -= len(piece)
                yield piece
            self._body_read(data)
        elif head.framing is Framing.CHUNKED:
            pieces: list[bytes] = []
            scanner = ChunkedScanner(pieces.append)
            while True:
                if not data:
                    data = await connection.receive()
                    if not data:
                        raise _cut(connection, "before its last chunk")
                try:
                    end = scanner.feed(data)
                except FramingError as exc:
                    raise AnswerHeadError(f"the chunked framing is broken: {exc}") from exc
                if pieces:
                    yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    pieces.clear()
                if end is not None:
                    self._body_read(data[end:])
                    return
                data = b""
        else:  # until the backend closes
            while True:
                if not data:
                    data = await connection.receive()
                    if not data:
                        connection.done = True
                        return
                yield data
                data = b""

    def _body_read(self, rest: bytes) -> None:
        """The body ended; ``rest``, what came after it, makes the connection unsafe to use
        again (a server does not send before it is asked)."""
        self._connection.done = True
        if rest:
            self._connection.reusable = False


def _cut(connection: _Connection, where: str) -> UpstreamError:
    connection.reusable = False
    return UpstreamError(f"{connection.name}: the answer was cut short ({where})")


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
                request = request_head(method, target, sent)
                if len(body) <= JOIN_BODY_BYTES:
                    await sockio.send_all(connection.stream, request + body)
                else:
                    await sockio.send_all(connection.stream, request)
                    await sockio.send_all(connection.stream, body)
                connection.done = False
                try:
                    head, raw_start = await connection.read_head(method)
                except (trio.BrokenResourceError, OSError) as exc:
                    raise UpstreamClosedEarly(f"{self.node}:{self.port}: {exc!r} before any "
                                              "byte of the answer") from exc
                response = Response(connection, head, raw_start)
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
        return _Connection(stream, name=f"{self.node}:{self.port}")

    async def _release(self, connection: _Connection) -> None:
        if connection.reusable and connection.done and self.keep_alive \
                and len(self._idle) < UPSTREAM_KEEPALIVE_CONNECTIONS and not self._retired:
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
