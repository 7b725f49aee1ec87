"""The relay loop: one thread that moves the bytes of every established relay.

Why a thread: per forwarded chunk, trio's scheduler (a task switch and an epoll_ctl per
wait) costs about three times the read and write themselves. Small request/response
traffic is made of nothing but such chunks, so established relays are handed to one loop
on a level-triggered epoll, registered once, that does read → write and nothing else. trio
still accepts, holds, wakes, connects and owns every socket; it waits for the loop to say a
relay ended, and it is the one that closes the sockets.

Contract (per relay, as ``relay.relay``): bytes go both ways in order and unchanged; an EOF
read on one side becomes ``shutdown(SHUT_WR)`` on the other while the other direction goes
on; a write that cannot finish stops reading from the source (backpressure); an error on
either side ends the relay as ``broken``. ``RelayLoop.relay`` returns the outcome; if the
caller is cancelled, the relay is taken out of the loop before the call returns, so the
caller may close the sockets right away.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

RECEIVE_BYTES = 256 * 1024  # as relay.RECEIVE_BYTES: big reads for bulk streams
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


@dataclass(eq=False)
class _Way:
    """One direction of a relay."""

    name: str  # "up" or "down"
    src: int
    dst: int
    open: bool = True  # False once EOF was passed on
    pending: memoryview | None = None  # read but not yet written
    uncounted: int = 0
    pipe: tuple[int, int] | None = None  # (read end, write end) once the way is spliced
    in_pipe: int = 0  # bytes spliced in but not yet out

    @property
    def busy(self) -> bool:
        """Bytes wait for the destination: stop reading the source until they are out."""
        return self.pending is not None or self.in_pipe > 0


@dataclass(eq=False)
class _Relay:
    up: _Way
    down: _Way
    count: ByteCounter | None
    done: Callable[[str], None]  # called in the loop thread with the outcome
    masks: dict[int, int] = field(default_factory=dict)


class RelayLoop:
    """Owns the loop thread. ``run`` starts it (and stops it when cancelled)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, _IN)
        self._commands: collections.deque[tuple[str, _Relay | None, threading.Event | None]] = \
            collections.deque()
        self._by_fd: dict[int, _Relay] = {}
        self._running = False
        self._lock = threading.Lock()  # orders commands against the loop's stop
        self._stopped = False

    def __repr__(self) -> str:
        return f"<RelayLoop relays={len(self._by_fd) // 2} running={self._running}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the loop thread until cancelled; then stop it and wait for it to end."""
        async with trio.open_nursery() as nursery:
            async def stop_on_cancel() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    self._post("stop", None, None)

            nursery.start_soon(stop_on_cancel)
            self._running = True
            task_status.started()
            try:
                await trio.to_thread.run_sync(self._loop)  # returns once "stop" is seen
            finally:
                self._running = False
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._epoll.close()
            nursery.cancel_scope.cancel()

    async def relay(self, client: trio.SocketStream, backend: trio.SocketStream, *,
                    up_open: bool = True, count: ByteCounter | None = None) -> str:
        """Relay until both ways end or one breaks; return ``"done"`` or ``"broken: ..."``.

        ``up_open`` False: the client's EOF was already passed on (it came while held).
        The sockets stay open; the caller closes them.
        """
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        outcome: list[str] = []

        def done(result: str) -> None:  # in the loop thread
            def deliver() -> None:
                outcome.append(result)
                finished.set()

            token.run_sync_soon(deliver)

        cfd, bfd = client.socket.fileno(), backend.socket.fileno()
        entry = _Relay(_Way("up", cfd, bfd, open=up_open), _Way("down", bfd, cfd), count, done)
        self._post("add", entry, None)
        try:
            await finished.wait()
        finally:
            if not finished.is_set():
                removed = threading.Event()
                self._post("remove", entry, removed)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(removed.wait)
        return outcome[0] if outcome else "cancelled"

    # ---- the loop thread ---------------------------------------------------------------

    def _post(self, what: str, entry: _Relay | None, ack: threading.Event | None) -> None:
        with self._lock:
            if self._stopped:  # nothing is relayed any more: a removal is already done
                if ack is not None:
                    ack.set()
                return
            self._commands.append((what, entry, ack))
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"x")

    def _loop(self) -> None:
        while True:
            for fd, events in self._epoll.poll():
                if fd == self._wake_r:
                    if not self._commands_run():
                        return
                    continue
                entry = self._by_fd.get(fd)
                if entry is None:
                    continue
                if events == _IN:
                    # the common case, kept short: one way's source has a chunk (a socket is
                    # registered for reading only while its way is open and idle; see _update)
                    way = entry.up if entry.up.src == fd else entry.down
                    if way.pipe is None and way.open and not way.busy:
                        self._pass_chunk(entry, way)
                        continue
                self._service(entry, fd, events)

    def _pass_chunk(self, entry: _Relay, way: _Way) -> None:
        try:
            chunk = os.read(way.src, RECEIVE_BYTES)
            if not 0 < len(chunk) < RECEIVE_BYTES:  # EOF or a bulk stream: the general path
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
            self._finish(entry, f"broken {way.name}: {exc!r}")
            return
        self._counted(way, entry, len(chunk))
        if sent < len(chunk):
            way.pending = memoryview(chunk)[sent:]
            self._update(entry)

    def _commands_run(self) -> bool:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        while self._commands:
            what, entry, ack = self._commands.popleft()
            if what == "stop":
                with self._lock:
                    self._stopped = True
                    for _, _, left in self._commands:
                        if left is not None:
                            left.set()
                    self._commands.clear()
                for relay in {id(r): r for r in self._by_fd.values()}.values():
                    self._finish(relay, "broken: the proxy is stopping")
                return False
            assert entry is not None
            if what == "add":
                self._by_fd[entry.up.src] = entry
                self._by_fd[entry.down.src] = entry
                if not entry.up.open:
                    self._flush(entry.up, entry)
                self._update(entry)
                if not entry.up.open and not entry.down.open:
                    self._finish(entry, "done")
            elif what == "remove":
                if self._by_fd.get(entry.up.src) is entry:
                    self._detach(entry)
                if ack is not None:
                    ack.set()
        return True

    def _service(self, entry: _Relay, fd: int, events: int) -> None:
        up, down = entry.up, entry.down
        before = (up.open, up.busy, down.open, down.busy)
        way = up
        try:
            for way in (up, down):
                if way.dst == fd and way.busy and events & _WRITABLE:
                    if way.in_pipe:
                        self._drain(way)
                    elif way.pending is not None:
                        self._write(way, way.pending)
                if way.src == fd and way.open and not way.busy and events & _READABLE:
                    self._read(way, entry)
        except OSError as exc:
            self._finish(entry, f"broken {way.name}: {exc!r}")
            return
        self._settle(entry, before)

    def _settle(self, entry: _Relay, before: tuple[bool, bool, bool, bool]) -> None:
        up, down = entry.up, entry.down
        if not up.open and not down.open:
            self._finish(entry, "done")
        elif (up.open, up.busy, down.open, down.busy) != before:
            self._update(entry)  # most chunks go straight through and change nothing

    def _read(self, way: _Way, entry: _Relay) -> None:
        if way.pipe is not None:
            try:
                n = os.splice(way.src, way.pipe[1], PIPE_BYTES, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            if n:
                way.in_pipe = n
                self._counted(way, entry, n)
                self._drain(way)
                return
            chunk = b""
        else:
            try:
                chunk = os.read(way.src, RECEIVE_BYTES)
            except BlockingIOError:
                return
        self._after_read(way, entry, chunk)

    def _after_read(self, way: _Way, entry: _Relay, chunk: bytes) -> None:
        if not chunk:
            _shutdown(way.dst)
            way.open = False
            self._flush(way, entry)
            return
        self._counted(way, entry, len(chunk))
        self._write(way, memoryview(chunk))
        if len(chunk) == RECEIVE_BYTES and _HAVE_SPLICE:
            way.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # a bigger pipe means fewer calls
                fcntl.fcntl(way.pipe[1], _F_SETPIPE_SZ, PIPE_BYTES)

    def _counted(self, way: _Way, entry: _Relay, n: int) -> None:
        way.uncounted += n
        if way.uncounted >= COUNT_EVERY_BYTES:
            self._flush(way, entry)

    @staticmethod
    def _drain(way: _Way) -> None:
        assert way.pipe is not None
        while way.in_pipe:
            try:
                way.in_pipe -= os.splice(way.pipe[0], way.dst, way.in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return

    @staticmethod
    def _write(way: _Way, data: memoryview) -> None:
        try:
            sent = os.write(way.dst, data)
        except BlockingIOError:
            sent = 0
        way.pending = data[sent:] if sent < len(data) else None

    @staticmethod
    def _flush(way: _Way, entry: _Relay) -> None:
        if way.uncounted and entry.count is not None:
            entry.count(way.name, way.uncounted)
        way.uncounted = 0

    def _update(self, entry: _Relay) -> None:
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

    def _detach(self, entry: _Relay) -> None:
        for fd, mask in entry.masks.items():
            if mask:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
        entry.masks.clear()
        for way in (entry.up, entry.down):
            self._flush(way, entry)
            self._by_fd.pop(way.src, None)
            if way.pipe is not None:
                os.close(way.pipe[0])
                os.close(way.pipe[1])
                way.pipe = None

    def _finish(self, entry: _Relay, outcome: str) -> None:
        self._detach(entry)
        entry.done(outcome)


def _shutdown(fd: int) -> None:
    """Half-close ``fd`` (a socket trio owns) without taking it over."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    finally:
        sock.detach()
