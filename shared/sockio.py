"""Socket reads and writes that return at once when the kernel can do them at once.

A trio ``SocketStream`` yields to the scheduler after every read and write, even one that
did not have to wait: a pass of trio's run loop (an ``epoll_wait``, a reschedule, the task's
turn again) each time, 20-60 us on a small box. A request through an HTTP route makes five
such calls before its answer's head reaches the client (read the request, write it to the
backend, read the answer's head, write it to the client...), and those passes were a good
part of what the proxy added to the time to first token. These helpers make the system call
first and wait (``trio.lowlevel.wait_readable`` / ``wait_writable``) only when it would
block.

What trio's own calls promise still holds: a cancelled task is stopped at each call
(``checkpoint_if_cancelled``), and a task whose calls never have to wait yields every
``YIELD_EVERY`` calls, so a client that pipelines requests without end cannot starve the
others. Errors are trio's: ``trio.ClosedResourceError`` for a socket closed here,
``trio.BrokenResourceError`` (from the ``OSError``) for one the peer broke.
"""

from __future__ import annotations

import os
from typing import Final

import trio

# Calls that did not wait, across all tasks, before one of them yields anyway.
YIELD_EVERY: Final = 16

_calls_since_yield = 0


async def _fair() -> None:
    global _calls_since_yield
    await trio.lowlevel.checkpoint_if_cancelled()
    _calls_since_yield += 1
    if _calls_since_yield >= YIELD_EVERY:
        _calls_since_yield = 0
        await trio.lowlevel.checkpoint()


def _fd(stream: trio.SocketStream) -> int:
    fd = stream.socket.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the socket was closed")
    return fd


async def receive_some(stream: trio.SocketStream, max_bytes: int) -> bytes:
    """What the socket has now, up to ``max_bytes``, waiting for it if it has nothing;
    ``b""`` at EOF."""
    await _fair()
    while True:
        try:
            return os.read(_fd(stream), max_bytes)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from exc
        await trio.lowlevel.wait_readable(stream.socket)


async def send_all(stream: trio.SocketStream, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data``, waiting for room in the socket's buffer when it is full."""
    await _fair()
    view = memoryview(data)
    while view:
        try:
            sent = os.write(_fd(stream), view)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from exc
        view = view[sent:]
        if view:
            await trio.lowlevel.wait_writable(stream.socket)
