"""The HTTP/1.1 server of both services: h11 on trio, one task per client connection. It
serves the edge proxy's HTTP routes and the control APIs of both services (``shared.http``).

Why not an ASGI server: a streamed answer is made of hundreds of small chunks, and an ASGI
server turns each into a message, an event of its own protocol state machine and a framed
write, which cost the proxy several times what reading and writing the chunk costs. Here the
route gets the connection itself (``Client``): it answers through h11 like any server, and
it may hand a chunked answer's raw bytes to the relay loop, which passes them on as the
backend framed them (``Client.pass_through``), so the proxy writes each read once.

Per connection: requests one after the other (pipelined ones wait their turn); an idle
connection closes after ``keep_alive_s``, a head must arrive whole within ``HEAD_TIMEOUT_S``;
a request h11 cannot parse gets h11's status (400, 414, 431...) and the connection closes.
On stop: no new connections, idle ones close at once, requests in flight get ``grace_s``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final
from urllib.parse import unquote

import h11
import trio

from shared import sockio

log = logging.getLogger(__name__)

READ_BYTES: Final = 64 * 1024
# A request head (request line and headers) must be complete this long after its first byte.
HEAD_TIMEOUT_S: Final = 30.0
# Bytes of a pipelined next request read while the current one is answered; beyond this the
# connection is not read until its turn (a client cannot make the proxy buffer more).
MAX_PIPELINED_BYTES: Final = 64 * 1024
_BROKEN: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

RawHeaders = list[tuple[bytes, bytes]]  # (name, value); names in lower case
Scope = dict[str, Any]
Handler = Callable[[Scope, "Client"], Awaitable[None]]


class ClientGone(Exception):
    """The client closed its connection (or it broke) while its request was read."""


class Client:
    """One request's view of its client connection: the body to read, the answer to write
    (through h11, or passed through raw), and when the client leaves."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._h11 = conn.h11
        self.stream = conn.stream

    @property
    def http_11(self) -> bool:
        """The client speaks HTTP/1.1: a chunked answer can be passed to it as framed."""
        return self._h11.their_http_version == b"1.1"

    async def receive_body(self) -> bytes | None:
        """The next piece of the request body; None at its end. Raises ``ClientGone``."""
        h = self._h11
        if h.they_are_waiting_for_100_continue:
            await self._send(h.send(h11.InformationalResponse(status_code=100, headers=[])))
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await sockio.receive_some(self.stream, READ_BYTES)
                except _BROKEN as exc:
                    raise ClientGone(repr(exc)) from exc
                try:
                    h.receive_data(data)
                except h11.RemoteProtocolError as exc:
                    raise ClientGone(str(exc)) from exc
                continue
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                return None
            raise ClientGone(f"the connection ended ({type(event).__name__})")

    async def wait_gone(self) -> None:
        """Return once the client closes its side (or the connection breaks); bytes of a
        pipelined request that arrive meanwhile are kept for its turn."""
        h = self._h11
        while True:
            if len(h.trailing_data[0]) > MAX_PIPELINED_BYTES:
                await trio.sleep_forever()  # its turn comes after this answer
            try:
                data = await self.stream.receive_some(READ_BYTES)
            except _BROKEN:
                data = b""
            if not data:
                self._conn.closing = True
                return
            h.receive_data(data)

    async def start(self, status: int, headers: RawHeaders, body: bytes = b"",
                    end: bool = False) -> None:
        """Send the status and headers (and ``body``, and the end of the answer, in the same
        write)."""
        h = self._h11
        data = h.send(h11.Response(status_code=status, headers=headers)) or b""
        if body:
            data += h.send(h11.Data(data=body)) or b""
        if end:
            data += h.send(h11.EndOfMessage()) or b""
        await self._send(data)

    async def start_raw(self, status: int, headers: RawHeaders, raw: bytes) -> None:
        """Send the status and headers (chunked framing: no ``content-length``) and, in the
        same write, ``raw``: the start of a body already framed as chunked."""
        await self._send((self._h11.send(h11.Response(status_code=status, headers=headers))
                          or b"") + raw)

    async def send_raw(self, raw: bytes) -> None:
        """Bytes of a body already framed as chunked (a pass-through's start)."""
        await self._send(raw)

    async def send(self, chunk: bytes, end: bool = False) -> None:
        """A piece of the body (framed as the answer's headers say), and its end if ``end``."""
        h = self._h11
        data = (h.send(h11.Data(data=chunk)) or b"") if chunk else b""
        if end:
            data += h.send(h11.EndOfMessage()) or b""
        if data:
            await self._send(data)

    def passed_through(self) -> None:
        """A chunked body and its end went out raw (``RelayLoop.pass_answer``): the answer
        is complete, and h11's own last chunk is not sent."""
        self._h11.send(h11.EndOfMessage())

    async def _send(self, data: bytes) -> None:
        try:
            await sockio.send_all(self.stream, data)
        except _BROKEN as exc:
            self._conn.closing = True
            raise ClientGone(repr(exc)) from exc


class _Connection:
    def __init__(self, stream: trio.SocketStream, server: H1Server) -> None:
        self.stream = stream
        self.server = server
        self.h11 = h11.Connection(h11.SERVER)
        self.closing = False  # close after the current answer
        try:
            peer = stream.socket.getpeername()
        except OSError:  # it left already
            peer = None
        self.peer: tuple[str, int] | None = (peer[0], peer[1]) if peer else None
        self.idle_scope: trio.CancelScope | None = None  # set while waiting for a request

    async def run(self) -> None:
        try:
            while not self.closing:
                request = await self._next_request()
                if request is None:
                    return
                await self._serve(request)
                if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                    return  # the answer was cut, or the request body was not read to its end
                self.h11.start_next_cycle()
        except _BROKEN:
            pass
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _next_request(self) -> h11.Request | None:
        """The next request's head; None when the connection should close."""
        h = self.h11
        scope = self.idle_scope = trio.CancelScope(deadline=trio.current_time()
                                                   + self.server.keep_alive_s)
        head_deadline: float | None = None
        try:
            with scope:
                if self.server.stopping:
                    return None
                while True:
                    try:
                        event = h.next_event()
                    except h11.RemoteProtocolError as exc:
                        await self._refuse(exc)
                        return None
                    if isinstance(event, h11.Request):
                        return event
                    if event is not h11.NEED_DATA:
                        return None  # ConnectionClosed
                    data = await sockio.receive_some(self.stream, READ_BYTES)
                    if data and head_deadline is None:  # a head began: the idle wait is over
                        head_deadline = trio.current_time() + HEAD_TIMEOUT_S
                        scope.deadline = head_deadline
                        self.idle_scope = None  # a stop no longer interrupts it
                    h.receive_data(data)
        finally:
            self.idle_scope = None
        return None

    async def _refuse(self, exc: h11.RemoteProtocolError) -> None:
        await self._answer_and_close(getattr(exc, "error_status_hint", 400),
                                     f"bad request: {exc}\n")

    async def _answer_and_close(self, status: int, text: str) -> None:
        """A plain-text answer of the server's own, when nothing was sent yet."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = text.encode()
        with trio.CancelScope(shield=True), _suppress_broken():
            await self.stream.send_all(self.h11.send(h11.Response(
                status_code=status, headers=[(b"content-type", b"text/plain"),
                                             (b"content-length", str(len(body)).encode()),
                                             (b"connection", b"close")])) + body)

    async def _serve(self, request: h11.Request) -> None:
        try:
            await self.server.handler(_scope(request, self.peer), Client(self))
        except Exception:
            await self._answer_and_close(500, "internal error in the proxy; see its log\n")
            raise
        if self.h11.our_state is h11.SEND_BODY or self.h11.our_state is h11.SEND_RESPONSE:
            self.closing = True  # the handler left its answer unfinished: close, do not end it


class H1Server:
    """Serves ``handler`` on some listeners until ``stop``."""

    def __init__(self, handler: Handler, *, keep_alive_s: float, grace_s: float) -> None:
        self.handler = handler
        self.keep_alive_s = keep_alive_s
        self.grace_s = grace_s
        self.stopping = False
        self._connections: set[_Connection] = set()
        self._closed = trio.Event()  # a connection ended (set anew by each wait)

    async def serve(self, listeners: list[trio.SocketListener],
                    shutdown: Callable[[], Awaitable[None]]) -> None:
        """Accept until ``shutdown`` returns; then close idle connections and give requests
        in flight ``grace_s`` before they are cancelled."""
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(self._accept, listener, connections)
                await shutdown()
                self.stopping = True
                accepting.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            with trio.move_on_after(self.grace_s):
                while self._connections:
                    for conn in list(self._connections):
                        if conn.idle_scope is not None:
                            conn.idle_scope.cancel()
                    # one that is answering closes at its next request (``stopping``)
                    self._closed = trio.Event()
                    await self._closed.wait()
            connections.cancel_scope.cancel()

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # out of descriptors and such: wait, as trio.serve_listeners
                log.error("http listener: accept failed: %s; trying again in 0.1 s", exc)
                await trio.sleep(ACCEPT_RETRY_S)
                continue
            nursery.start_soon(self._run, _Connection(stream, self))

    async def _run(self, conn: _Connection) -> None:
        self._connections.add(conn)
        try:
            await conn.run()
        except Exception as exc:  # a bug in a route: this connection ends, the server stays
            log.error("http listener: a request failed: %r", exc, exc_info=exc)
        finally:
            self._connections.discard(conn)
            self._closed.set()


# After a failed accept (EMFILE and such), as trio's serve_listeners waits.
ACCEPT_RETRY_S: Final = 0.1


@contextlib.contextmanager
def _suppress_broken() -> Iterator[None]:
    try:
        yield
    except (*_BROKEN, h11.LocalProtocolError):
        pass


def _scope(request: h11.Request, peer: tuple[str, int] | None) -> Scope:
    """The request as the route reads it (the keys of an ASGI HTTP scope it uses)."""
    target = bytes(request.target)
    raw_path, _, query = target.partition(b"?")
    return {
        "type": "http",
        "http_version": request.http_version.decode("ascii"),
        "method": request.method.decode("ascii"),
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "query_string": query,
        "headers": list(request.headers),  # names in lower case, as ASGI has them
        "client": peer,
        "scheme": "http",
    }


def listener_url(listener: trio.SocketListener) -> str:
    """``http://HOST:PORT`` of a bound listener (IPv6 hosts in brackets)."""
    host, port = listener.socket.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
