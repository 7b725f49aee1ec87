"""Bytes both ways between a client and a backend, and the client's bytes kept while held.

Contract of ``relay``: every byte read from one side is written to the other in order and
unchanged; an EOF from one side becomes an EOF (``shutdown(SHUT_WR)``, a TCP half-close)
towards the other while the opposite direction keeps flowing; when both directions have
ended, both sockets close. If either side breaks (reset, error), the relay stops at once and the other
side is closed with a reset, so a truncated stream never looks like a complete one.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import trio

from edge_proxy.errors import ClientGone
from edge_proxy.tcp_routes.relay_loop import RECEIVE_BYTES, RelayLoop

# Socket buffers big enough for a few chunks in flight each way on a fast link.
SOCKET_BUFFER_BYTES = 1 << 20
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

ByteCounter = Callable[[str, int], None]  # (direction "up" | "down", byte count)
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


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
    loop: RelayLoop,
    *,
    held: Held | None = None,
    count: ByteCounter | None = None,
) -> str:
    """Relay until both directions end or one side breaks; always closes both streams.

    ``held`` bytes (and a held EOF) go to the backend first, from here; then ``loop`` moves
    the bytes both ways (see ``relay_loop``). Returns a short outcome for the log:
    ``"done"``, ``"broken: ..."`` (both sides were reset) or ``"cancelled"``.
    """
    outcome = "cancelled"
    try:
        if held is not None and held.data:
            data, held.data = held.data, bytearray()  # not kept for the relay's lifetime
            await backend.send_all(data)
            if count is not None:
                count("up", len(data))
            del data
        if held is not None and held.eof:
            await backend.send_eof()
        outcome = await loop.relay(client, backend, up_open=not (held is not None and held.eof),
                                   count=count)
    except _BROKEN as exc:
        outcome = f"broken up: {exc!r}"
    finally:
        if outcome.startswith("broken"):
            reset(client)
            reset(backend)
        with trio.CancelScope(shield=True):
            await client.aclose()
            await backend.aclose()
    return outcome
