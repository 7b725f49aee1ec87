"""The relay loop's thread: one level-triggered epoll that moves the bytes of every
established relay (see ``relay_loop`` for why, and for the side trio talks to).

Per relay (``Entry``): bytes go both ways in order and unchanged; an EOF read on one side
becomes ``shutdown(SHUT_WR)`` on the other while the other direction goes on; a write that
cannot finish stops reading from the source (backpressure); an error on either side ends the
relay as ``broken``; a relay idle for its ``IdleTimeouts`` ends as ``idle_outcome``, looked
for every ``check_every_s`` (the epoll timeout). The thread never closes a relay's sockets:
it reports the outcome through ``Entry.done`` and forgets their descriptors.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import math
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_proxy.tcp_routes.idle import IdleTimeouts, idle_outcome

RECEIVE_BYTES = 256 * 1024  # big reads for bulk streams
# A way whose read fills RECEIVE_BYTES is a bulk stream: from then on splice(2) moves it
# through a pipe of PIPE_BYTES, in the kernel (no copy into Python).
PIPE_BYTES = 1 << 20
_HAVE_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
COUNT_EVERY_BYTES = 1 << 20  # byte counters are passed on in batches (exact at the end)
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_READABLE = _IN | select.EPOLLERR | select.EPOLLHUP  # an error or hang-up shows on the next call
_WRITABLE = _OUT | select.EPOLLERR | select.EPOLLHUP

ByteCounter = Callable[[str, int], None]
REMOVED = "removed"  # the word that acknowledges a "remove"
# The first word of the outcome of an answer passed through whose client left (a failed write).
CLIENT_GONE = "client-gone"


class ReadBuffer:
    """Reads land in one preallocated buffer and are copied out at their own size.
    ``os.read(fd, RECEIVE_BYTES)`` allocates a buffer of that size for every read, which glibc
    maps (mmap), shrinks (mremap) and unmaps again: three more system calls and a page fault
    for each chunk of a stream, about 15 us here, several times the read itself. One buffer
    per thread: what ``read`` returns is a copy, so the buffer is free again at once."""

    def __init__(self, size: int = RECEIVE_BYTES) -> None:
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)

    def read(self, fd: int) -> bytes:
        """One read of up to the buffer's size; ``b""`` at EOF. Raises ``BlockingIOError``
        (nothing to read yet) and the other ``OSError``s of ``read(2)``."""
        n = os.readv(fd, [self._buffer])
        return bytes(self._view[:n])


@dataclass(eq=False)
class Way:
    """One direction of a relay."""

    name: str  # "up" or "down"
    src: int
    dst: int
    open: bool = True  # False once EOF was passed on
    pending: memoryview | None = None  # read but not yet written
    uncounted: int = 0
    pipe: tuple[int, int] | None = None  # (read end, write end) once the way is spliced
    in_pipe: int = 0  # bytes spliced in but not yet out
    ending: bool = False  # an answer's last bytes were read: the way closes once they are out

    @property
    def busy(self) -> bool:
        """Bytes wait for the destination: stop reading the source until they are out."""
        return self.pending is not None or self.in_pipe > 0


@dataclass(eq=False)
class Entry:
    """One relay as the thread sees it; ``done`` runs in the thread, ``settle`` in trio."""

    up: Way
    down: Way
    count: ByteCounter | None
    done: Callable[[str], None]  # called in the loop thread with the outcome (or "removed")
    settle: Callable[[str], None]  # the same, called in trio (once the thread is gone)
    idle: IdleTimeouts | None = None
    waiting: bool = False  # the client spoke last: it waits for the upstream
    last_at: float = 0.0  # when a byte last moved (the loop's clock)
    masks: dict[int, int] = field(default_factory=dict)
    # An HTTP answer passed through (``down`` only): told each chunk read from the backend,
    # it returns None while the answer goes on, or how many of the chunk's bytes end it.
    inspect: Callable[[bytes], int | None] | None = None


class BrokenAnswer(OSError):
    """An answer passed through ended before its end, or its framing is broken."""


class ClientWriteFailed(OSError):
    """An answer passed through could not be written to the client (it left)."""


class LoopThread:
    """The thread's state and its loop; ``run`` returns once a ``"stop"`` command is seen.
    Commands (``("add" | "remove" | "stop", entry)``) arrive on ``commands``; a byte on
    ``wake_r`` says there are some."""

    def __init__(self, epoll: select.epoll, wake_r: int,
                 commands: collections.deque[tuple[str, Entry | None]]) -> None:
        self._epoll = epoll
        self._wake_r = wake_r
        self._commands = commands
        self._by_fd: dict[int, Entry] = {}
        self._timed: set[Entry] = set()  # relays with idle timeouts
        self._next_sweep = math.inf
        self._now = time.monotonic()
        self._reads = ReadBuffer()

    def run(self) -> None:
        """Move bytes until a ``"stop"`` command; an exception here ends the loop (the
        caller, ``RelayLoop``, settles every relay then)."""
        while True:
            timeout = -1.0 if self._next_sweep == math.inf \
                else max(0.0, self._next_sweep - self._now)
            ready = self._epoll.poll(timeout)
            self._now = time.monotonic()
            for fd, events in ready:
                if fd == self._wake_r:
                    if not self._commands_run():
                        return
                    continue
                entry = self._by_fd.get(fd)
                if entry is None:
                    continue
                entry.last_at = self._now
                if events == _IN:
                    # the common case, kept short: one way's source has a chunk (a socket is
                    # registered for reading only while its way is open and idle; see _update)
                    way = entry.up if entry.up.src == fd else entry.down
                    if way.pipe is None and way.open and not way.busy:
                        self._pass_chunk(entry, way)
                        continue
                self._service(entry, fd, events)
            if self._now >= self._next_sweep:  # after the events: what just moved is not idle
                self._sweep()

    def _pass_chunk(self, entry: Entry, way: Way) -> None:
        try:
            chunk = self._reads.read(way.src)
            if not 0 < len(chunk) < RECEIVE_BYTES or entry.inspect is not None:
                # EOF, a bulk stream or an HTTP answer: the general path
                before = (entry.up.open, entry.up.busy, entry.down.open, entry.down.busy)
                self._after_read(way, entry, chunk)
                self._settle(entry, before)
                return
            try:
                sent = os.write(way.dst, chunk)
            except BlockingIOError:
                sent = 0
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(entry, _broken(way, exc))
            return
        entry.waiting = way is entry.up
        self._counted(way, entry, len(chunk))
        if sent < len(chunk):
            way.pending = memoryview(chunk)[sent:]
            self._update(entry)

    def _commands_run(self) -> bool:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        while self._commands:
            what, entry = self._commands.popleft()
            if what == "stop":  # the relays still here are settled by ``_close``
                return False
            assert entry is not None
            if what == "add":
                self._by_fd[entry.up.src] = entry
                self._by_fd[entry.down.src] = entry
                entry.last_at = self._now
                if entry.idle is not None:
                    self._timed.add(entry)
                    self._next_sweep = min(self._next_sweep,
                                           self._now + entry.idle.check_every_s)
                if not entry.up.open:
                    self.flush(entry.up, entry)
                self._update(entry)
                if not entry.up.open and not entry.down.open:
                    self._finish(entry, "done")
            elif what == "remove":
                if self._by_fd.get(entry.up.src) is entry:
                    self._detach(entry)
                entry.done(REMOVED)  # (if it had finished already, that word came first)
        return True

    def _sweep(self) -> None:
        """End the relays that were idle too long; plan the next sweep."""
        every = math.inf
        for entry in list(self._timed):
            idle = entry.idle
            assert idle is not None
            if self._now - entry.last_at >= idle.limit_s(entry.waiting):
                self._finish(entry, idle_outcome(entry.waiting))
            else:
                every = min(every, idle.check_every_s)
        self._next_sweep = self._now + every

    def _service(self, entry: Entry, fd: int, events: int) -> None:
        up, down = entry.up, entry.down
        before = (up.open, up.busy, down.open, down.busy)
        way = up
        try:
            for way in (up, down):
                if way.dst == fd and way.busy and events & _WRITABLE:
                    if way.in_pipe:
                        self._drain(way)
                    elif way.pending is not None:
                        if entry.inspect is not None:
                            self._answer_write(way, way.pending)
                        else:
                            self._write(way, way.pending)
                        if way.ending and way.pending is None:
                            way.open = False  # the answer's last bytes are out
                if way.src == fd and way.open and not way.busy and events & _READABLE:
                    self._read(way, entry)
        except OSError as exc:
            self._finish(entry, _broken(way, exc))
            return
        self._settle(entry, before)

    def _settle(self, entry: Entry, before: tuple[bool, bool, bool, bool]) -> None:
        up, down = entry.up, entry.down
        if not up.open and not down.open:
            self._finish(entry, "done")
        elif (up.open, up.busy, down.open, down.busy) != before:
            self._update(entry)  # most chunks go straight through and change nothing

    def _read(self, way: Way, entry: Entry) -> None:
        if way.pipe is not None:
            try:
                n = os.splice(way.src, way.pipe[1], PIPE_BYTES, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            if n:
                way.in_pipe = n
                entry.waiting = way is entry.up
                self._counted(way, entry, n)
                self._drain(way)
                return
            chunk = b""
        else:
            try:
                chunk = self._reads.read(way.src)
            except BlockingIOError:
                return
        self._after_read(way, entry, chunk)

    def _after_read(self, way: Way, entry: Entry, chunk: bytes) -> None:
        if entry.inspect is not None:
            self._answer_read(way, entry, chunk)
            return
        entry.waiting = way is entry.up  # an EOF too: a half-closed client waits
        if not chunk:
            _shutdown(way.dst)
            way.open = False
            self.flush(way, entry)
            return
        self._counted(way, entry, len(chunk))
        self._write(way, memoryview(chunk))
        if len(chunk) == RECEIVE_BYTES and _HAVE_SPLICE:
            way.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # a bigger pipe means fewer calls
                fcntl.fcntl(way.pipe[1], _F_SETPIPE_SZ, PIPE_BYTES)

    def _answer_read(self, way: Way, entry: Entry, chunk: bytes) -> None:
        """A chunk of an HTTP answer: passed on up to its end, never spliced (it is read);
        the client's side is not half-closed (its connection may carry the next request)."""
        assert entry.inspect is not None
        if not chunk:
            raise BrokenAnswer("the backend closed its connection before the end of the answer")
        try:
            end = entry.inspect(chunk)
        except ValueError as exc:
            raise BrokenAnswer(f"the backend's answer is broken: {exc}") from exc
        if end is not None:
            chunk = chunk[:end]
            way.ending = True
        self._counted(way, entry, len(chunk))
        self._answer_write(way, memoryview(chunk))
        if way.ending and way.pending is None:
            way.open = False

    def _answer_write(self, way: Way, data: memoryview) -> None:
        try:
            self._write(way, data)
        except OSError as exc:
            raise ClientWriteFailed(f"the client's connection broke: {exc!r}") from exc

    def _counted(self, way: Way, entry: Entry, n: int) -> None:
        way.uncounted += n
        if way.uncounted >= COUNT_EVERY_BYTES:
            self.flush(way, entry)

    @staticmethod
    def _drain(way: Way) -> None:
        assert way.pipe is not None
        while way.in_pipe:
            try:
                way.in_pipe -= os.splice(way.pipe[0], way.dst, way.in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return

    @staticmethod
    def _write(way: Way, data: memoryview) -> None:
        try:
            sent = os.write(way.dst, data)
        except BlockingIOError:
            sent = 0
        way.pending = data[sent:] if sent < len(data) else None

    @staticmethod
    def flush(way: Way, entry: Entry) -> None:
        """Pass the way's uncounted bytes on to the relay's counter."""
        if way.uncounted and entry.count is not None:
            entry.count(way.name, way.uncounted)
        way.uncounted = 0

    def _update(self, entry: Entry) -> None:
        """Register each socket for what it is waiting for now (nothing: not registered)."""
        for fd in (entry.up.src, entry.down.src):
            mask = 0
            for way in (entry.up, entry.down):
                if way.src == fd and way.open and not way.busy:
                    mask |= _IN
                if way.dst == fd and way.busy:
                    mask |= _OUT
            old = entry.masks.get(fd, 0)
            if mask == old:
                continue
            if not mask:
                self._epoll.unregister(fd)
            elif not old:
                self._epoll.register(fd, mask)
            else:
                self._epoll.modify(fd, mask)
            entry.masks[fd] = mask

    def _detach(self, entry: Entry) -> None:
        self._timed.discard(entry)
        for fd, mask in entry.masks.items():
            if mask:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
        entry.masks.clear()
        for way in (entry.up, entry.down):
            self.flush(way, entry)
            self._by_fd.pop(way.src, None)
            if way.pipe is not None:
                os.close(way.pipe[0])
                os.close(way.pipe[1])
                way.pipe = None

    def _finish(self, entry: Entry, outcome: str) -> None:
        self._detach(entry)
        entry.done(outcome)



def _broken(way: Way, exc: OSError) -> str:
    """The outcome of a relay that broke: ``CLIENT_GONE`` first when an answer could not be
    written to its client, so the route tells a client that left from a failed backend."""
    if isinstance(exc, ClientWriteFailed):
        return f"{CLIENT_GONE}: {exc}"
    return f"broken {way.name}: {exc!r}"


def _shutdown(fd: int) -> None:
    """Half-close ``fd`` (a socket trio owns) without taking it over."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    finally:
        sock.detach()
