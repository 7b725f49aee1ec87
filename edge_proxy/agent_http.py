"""HTTP/1.1 to one node's agent API: h11 on trio, connections kept between requests.

The load call is on the path of every request that waits for a model on demand, twice (the
request out, the answer back), and httpx spent about 0.8 ms of CPU per request more than h11
alone on this path. Only what the agent API needs: whole answers (``Content-Length`` or
chunked), ``http://`` and ``https://`` base URLs, no redirects, no cookies, no proxies from
the environment. Timeouts are cancel scopes at the call sites (a load may take minutes).

A kept connection the agent closed meanwhile (it closes idle ones after a few seconds) can
fail before any byte of the answer: the request is then sent once more on a new connection.
"""

from __future__ import annotations

import os
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from typing import Final

import h11
import trio

from shared.h1 import RawHeaders
from shared.net import open_tcp

# Kept connections idle longer than this are closed instead of reused (the agent's API
# closes its idle ones after 5 s: reusing one that old would race its close).
IDLE_REUSE_S: Final = 3.0
MAX_IDLE: Final = 4
READ_BYTES: Final = 64 * 1024
MAX_ANSWER_BYTES: Final = 4 << 20  # the agent's answers are small JSON documents
_FAILED: Final = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError,
                  ssl.SSLError)


class AgentHttpError(Exception):
    """No whole answer: the connection could not be opened, broke, or the answer was not
    HTTP. The message says which."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


class _Stale(Exception):
    """A reused connection failed before any byte of the answer."""


@dataclass
class _Connection:
    stream: trio.abc.Stream
    socket: trio.socket.SocketType
    h11: h11.Connection
    idle_since: float = 0.0


class AgentHttp:
    """Requests to one base URL (``http://HOST:PORT`` or ``https://...``)."""

    def __init__(self, url: str, headers: RawHeaders) -> None:
        parts = urllib.parse.urlsplit(url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        authority = f"[{self._host}]" if ":" in self._host else self._host
        self._headers = [(b"host", f"{authority}:{self._port}".encode()), *headers]
        self._idle: list[_Connection] = []
        self._ssl: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        scheme = "https" if self._tls else "http"
        return f"<AgentHttp {scheme}://{self._host}:{self._port} idle={len(self._idle)}>"

    async def request(self, method: str, path: str, body: bytes | None = None) -> Answer:
        """Send ``method path`` (``body``: JSON) and return the whole answer; raises
        ``AgentHttpError``."""
        headers = list(self._headers)
        if body is not None:
            headers += [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]
        request = h11.Request(method=method, target=self._prefix + path, headers=headers)
        kept = self._take_idle()
        if kept is not None:
            try:
                return await self._exchange(kept, request, body, reused=True)
            except _Stale:
                pass
        try:
            connection = await self._connect()
        except _FAILED as exc:
            # (the URL is the caller's to say: trio's own text repeats the address)
            what = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else repr(exc)
            raise AgentHttpError(f"cannot connect: {what}") from exc
        return await self._exchange(connection, request, body, reused=False)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await _close(connection)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            # readable while idle: the agent closed it (or sent what nobody asked for)
            if now - connection.idle_since < IDLE_REUSE_S and not connection.socket.is_readable():
                return connection
            connection.socket.close()
        return None

    async def _connect(self) -> _Connection:
        stream = await open_tcp(self._host, self._port)
        if not self._tls:
            return _Connection(stream, stream.socket, h11.Connection(h11.CLIENT))
        if self._ssl is None:  # made once: a context costs tens of milliseconds of CPU
            self._ssl = ssl.create_default_context()
        tls = trio.SSLStream(stream, self._ssl, server_hostname=self._host,
                             https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return _Connection(tls, stream.socket, h11.Connection(h11.CLIENT))

    async def _exchange(self, connection: _Connection, request: h11.Request,
                        body: bytes | None, *, reused: bool) -> Answer:
        conn = connection.h11
        answered = False  # a byte of the answer arrived: never sent again
        kept = False
        try:
            data = conn.send(request) or b""
            if body:
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await connection.stream.send_all(data)
            status, chunks, size = 0, [], 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    received = await connection.stream.receive_some(READ_BYTES)
                    answered = answered or bool(received)
                    conn.receive_data(bytes(received))
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_ANSWER_BYTES:
                        raise AgentHttpError(f"an answer over {MAX_ANSWER_BYTES} bytes")
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise h11.RemoteProtocolError("the connection closed before the answer's end")
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE \
                    and len(self._idle) < MAX_IDLE:
                conn.start_next_cycle()
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
                kept = True
            return Answer(status, b"".join(chunks))
        except _FAILED as exc:
            if reused and not answered:
                raise _Stale() from exc
            raise AgentHttpError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if not kept:
                await _close(connection)


async def _close(connection: _Connection) -> None:
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(connection.stream)
