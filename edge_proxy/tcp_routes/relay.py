"""Bytes both ways between a client and a backend, and the client's bytes kept while held.

Contract of ``relay``: every byte read from one side is written to the other in order and
unchanged; an EOF from one side becomes an EOF (``shutdown(SHUT_WR)``, a TCP half-close)
towards the other while the opposite direction keeps flowing; when both directions have
ended, both sockets close. If either side breaks (reset, error), the relay stops at once and the other
side is closed with a reset, so a truncated stream never looks like a complete one.

Two engines keep that contract: the relay loop (``relay_loop``, one epoll thread for every
relay, the fast path) and the trio engine here (two tasks per relay), which takes every
relay when no loop runs: the loop failed, or the proxy was started without it.

Idle timeouts (``idle.IdleTimeouts``) end a relay on which nothing moved for a while.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from edge_proxy.errors import ClientGone, LoopStopped
from edge_proxy.tcp_routes.idle import IdleTimeouts, idle_outcome, idle_side
from edge_proxy.tcp_routes.relay_loop import RelayLoop
from edge_proxy.tcp_routes.relay_thread import (
    COUNT_EVERY_BYTES,
    PIPE_BYTES,
    RECEIVE_BYTES,
    ReadBuffer,
)

# Socket buffers big enough for a few chunks in flight each way on a fast link.
SOCKET_BUFFER_BYTES = 1 << 20
_HAVE_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

ByteCounter = Callable[[str, int], None]  # (direction "up" | "down", byte count)
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# One read buffer per thread that runs trio relays (each read is copied out before an await).
_THREAD = threading.local()


@dataclass
class Held:
    """What a held client sent before the backend was there (bounded by ``limit``)."""

    limit: int
    data: bytearray
    eof: bool = False

    @classmethod
    def empty(cls, limit: int) -> Held:
        return cls(limit, bytearray())

    async def collect(self, client: trio.SocketStream) -> None:
        """Read from ``client`` until cancelled, up to ``limit`` bytes, then stop reading
        (TCP backpressure holds the rest in the client's kernel). Raises ``ClientGone`` when
        the client leaves: a reset, or an EOF before it sent anything (a half-closed request
        with bytes in it is kept and delivered, EOF included)."""
        while not self.eof and len(self.data) < self.limit:
            try:
                chunk = await client.receive_some(min(RECEIVE_BYTES, self.limit - len(self.data)))
            except _BROKEN as exc:
                raise ClientGone(f"client broke while held: {exc!r}") from exc
            if not chunk:
                if not self.data:
                    raise ClientGone("client closed before sending anything")
                self.eof = True
                return
            self.data += chunk
        await trio.sleep_forever()


def tune(stream: trio.SocketStream) -> None:
    """Socket options for relaying: no Nagle delay, big buffers."""
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        stream.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)


def reset(stream: trio.SocketStream) -> None:
    """Arrange for the next close to send RST instead of FIN (the stream ended badly)."""
    # already closed or reset by the peer: nothing left to tell it
    with contextlib.suppress(OSError):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


async def relay(
    client: trio.SocketStream,
    backend: trio.SocketStream,
    loop: RelayLoop | None,
    *,
    held: Held | None = None,
    count: ByteCounter | None = None,
    idle: IdleTimeouts | None = None,
) -> str:
    """Relay until both directions end, one side breaks or the relay is idle; always closes
    both streams.

    ``held`` bytes (and a held EOF) go to the backend first, from here; then ``loop`` moves
    the bytes both ways (see ``relay_loop``), or the trio engine when ``loop`` is None or
    not running. Returns a short outcome for the log: ``"done"``, ``"broken: ..."`` (both
    sides were reset), ``"idle client"`` / ``"idle upstream"`` (see ``idle_side``; an idle
    upstream resets both sides, an idle client is closed normally) or ``"cancelled"``.
    """
    outcome = "cancelled"
    try:
        sent = False
        if held is not None and held.data:
            data, held.data = held.data, bytearray()  # not kept for the relay's lifetime
            await backend.send_all(data)
            if count is not None:
                count("up", len(data))
            del data
            sent = True
        up_open = not (held is not None and held.eof)
        if not up_open:
            await backend.send_eof()
        outcome = await _engine_relay(loop, client, backend, up_open, count, idle,
                                      waiting=sent or not up_open)
    except _BROKEN as exc:
        outcome = f"broken up: {exc!r}"
    finally:
        if outcome.startswith("broken") or idle_side(outcome) == "upstream":
            reset(client)
            reset(backend)
        with trio.CancelScope(shield=True):
            await client.aclose()
            await backend.aclose()
    return outcome


async def _engine_relay(loop: RelayLoop | None, client: trio.SocketStream,
                        backend: trio.SocketStream, up_open: bool, count: ByteCounter | None,
                        idle: IdleTimeouts | None, *, waiting: bool) -> str:
    """The relay loop while it runs, else the trio engine."""
    if loop is not None and loop.running:
        try:
            return await loop.relay(client, backend, up_open=up_open, count=count, idle=idle,
                                    waiting=waiting)
        except LoopStopped:  # it stopped between the check and the call; nothing was touched
            pass
    return await trio_relay(client, backend, up_open=up_open, count=count, idle=idle,
                            waiting=waiting)


# ---- the trio engine ---------------------------------------------------------------------

class _Activity:
    """When a byte last moved, and who spoke last; moves the idle deadline of ``scope``."""

    def __init__(self, idle: IdleTimeouts | None, waiting: bool) -> None:
        self.idle = idle
        self.waiting = waiting  # the client spoke last: it waits for the upstream
        self.scope = trio.CancelScope()
        self.moved(None)

    def moved(self, way: str | None) -> None:
        if way is not None:
            self.waiting = way == "up"
        if self.idle is not None:
            self.scope.deadline = trio.current_time() + self.idle.limit_s(self.waiting)


class _Tally:
    """Byte counts for one direction, passed on in batches (see COUNT_EVERY_BYTES)."""

    def __init__(self, way: str, count: ByteCounter | None) -> None:
        self.way = way
        self.count = count
        self.pending = 0

    def add(self, n: int) -> None:
        self.pending += n
        if self.pending >= COUNT_EVERY_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.pending and self.count is not None:
            self.count(self.way, self.pending)
        self.pending = 0


async def trio_relay(client: trio.SocketStream, backend: trio.SocketStream, *,
                     up_open: bool = True, count: ByteCounter | None = None,
                     idle: IdleTimeouts | None = None, waiting: bool = False) -> str:
    """The relay loop's contract (``RelayLoop.relay``) on trio tasks: returns ``"done"``,
    ``"broken ..."`` or an idle outcome; the sockets stay open, the caller closes them.
    ``waiting``: the client spoke last (its held request went out)."""
    outcome = "done"
    activity = _Activity(idle, waiting)
    with activity.scope:
        async with trio.open_nursery() as nursery:
            async def guard(direction: Callable[[], Awaitable[None]], way: str) -> None:
                nonlocal outcome
                try:
                    await direction()
                except _BROKEN as exc:
                    outcome = f"broken {way}: {exc!r}"
                    nursery.cancel_scope.cancel()

            nursery.start_soon(guard, lambda: _pump(backend, client, "down", count, activity),
                               "down")
            if up_open:
                nursery.start_soon(guard, lambda: _pump(client, backend, "up", count, activity),
                                   "up")
    if activity.scope.cancelled_caught:
        return idle_outcome(activity.waiting)
    return outcome


async def _pump(src_stream: trio.SocketStream, dst_stream: trio.SocketStream, way: str,
                count: ByteCounter | None, activity: _Activity) -> None:
    """Copy until EOF, then half-close ``dst``. It reads and writes the non-blocking
    descriptors directly with trio's readiness waits (a fraction of the stream layer's cost
    per chunk); a direction that turns out to be a bulk stream (a read fills the buffer)
    moves on to splice(2), which keeps the bytes in the kernel. Errors surface as OSError."""
    src, dst = src_stream.socket, dst_stream.socket
    src_fd, dst_fd = src.fileno(), dst.fileno()
    drained = False  # the last read came back short: the next read would find nothing yet
    tally = _Tally(way, count)
    try:
        while True:
            waited = False
            if drained:  # request/response traffic: skip the read that would fail with EAGAIN
                waited = True
                await trio.lowlevel.wait_readable(src)
            while True:
                try:
                    chunk = _reads().read(src_fd)
                    break
                except BlockingIOError:
                    waited = True
                    await trio.lowlevel.wait_readable(src)
            activity.moved(way)
            if not chunk:
                dst.shutdown(socket.SHUT_WR)
                return
            drained = len(chunk) < RECEIVE_BYTES
            view = memoryview(chunk)
            while view:
                try:
                    sent = os.write(dst_fd, view)
                except BlockingIOError:
                    waited = True
                    await trio.lowlevel.wait_writable(dst)
                    continue
                view = view[sent:]
                activity.moved(None)  # a slow reader is not an idle one
            tally.add(len(chunk))
            if not drained and _HAVE_SPLICE:
                await _splice(src, dst, tally, activity, way)
                return
            if not waited:  # a stream that never blocks must still let other tasks run
                await trio.lowlevel.checkpoint()
    finally:
        tally.flush()


async def _splice(src: trio.socket.SocketType, dst: trio.socket.SocketType, tally: _Tally,
                  activity: _Activity, way: str) -> None:
    """Move bytes socket → pipe → socket in the kernel until EOF, then half-close ``dst``.
    The pipe lives only as long as the bulk stream, so idle relays keep two descriptors."""
    src_fd, dst_fd = src.fileno(), dst.fileno()
    pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # a bigger pipe means fewer calls; the default works too
        fcntl.fcntl(pipe_w, _F_SETPIPE_SZ, PIPE_BYTES)
    try:
        while True:
            waited = False
            try:
                n = os.splice(src_fd, pipe_w, PIPE_BYTES, flags=_SPLICE_FLAGS)
            except BlockingIOError:  # the pipe is empty here, so the socket has nothing yet
                await trio.lowlevel.wait_readable(src)
                continue
            activity.moved(way)
            if n == 0:
                dst.shutdown(socket.SHUT_WR)
                return
            tally.add(n)
            while n:
                try:
                    n -= os.splice(pipe_r, dst_fd, n, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    waited = True
                    await trio.lowlevel.wait_writable(dst)
                    activity.moved(None)
            if not waited:
                await trio.lowlevel.checkpoint()
    finally:
        os.close(pipe_r)
        os.close(pipe_w)


def _reads() -> ReadBuffer:
    reads: ReadBuffer | None = getattr(_THREAD, "reads", None)
    if reads is None:
        reads = _THREAD.reads = ReadBuffer()
    return reads
