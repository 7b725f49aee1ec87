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
caller may close the sockets right away. Idle timeouts (``IdleTimeouts``) are checked by the
loop itself, every ``IdleTimeouts.check_every_s``: a relay ends as ``idle client`` /
``idle upstream`` (see ``relay.relay``).

It fails loudly: if the thread raises, ``run`` logs the cause, ends every relay it had as
``broken``, closes its descriptors (only once the thread is gone, and with ``_post`` locked
out, so no descriptor number is written after it was closed), and returns; from then on
``relay`` raises ``LoopStopped`` and callers use the trio engine (``relay.trio_relay``).
Acknowledgements reach trio through its token, not a thread per waiter.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

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

# Idle relays are looked for this many times per (shortest) idle timeout: a relay ends at
# most a tenth late, and 10,000 relays with the default 600 s cost a sweep a minute.
IDLE_CHECKS_PER_TIMEOUT = 10
IDLE_CHECK_MIN_S = 0.01
IDLE_CHECK_MAX_S = 1.0

ByteCounter = Callable[[str, int], None]


class LoopStopped(Exception):
    """The relay loop is not running (stopped, or failed): relay with the trio engine."""


@dataclass(frozen=True)
class IdleTimeouts:
    """How long a relay may sit idle, by who spoke last (see ``relay`` for the rules)."""

    upstream_s: float  # the client spoke last and waits: nothing came from the upstream
    client_s: float  # the upstream spoke last (or nobody did): nothing came from the client

    @property
    def check_every_s(self) -> float:
        shortest = min(self.upstream_s, self.client_s) / IDLE_CHECKS_PER_TIMEOUT
        return max(IDLE_CHECK_MIN_S, min(IDLE_CHECK_MAX_S, shortest))


def idle_outcome(side: str) -> str:
    """The outcome of a relay ended because ``side`` ("client" or "upstream") was idle."""
    return f"idle {side}"


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
    done: Callable[[str], None]  # called in the loop thread with the outcome (or "removed")
    settle: Callable[[str], None]  # the same, called in trio (once the thread is gone)
    idle: IdleTimeouts | None = None
    waiting: bool = False  # the client spoke last: it waits for the upstream
    last_at: float = 0.0  # when a byte last moved (the loop's clock)
    masks: dict[int, int] = field(default_factory=dict)


class RelayLoop:
    """Owns the loop thread. ``run`` starts it (and stops it when cancelled)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, _IN)
        self._commands: collections.deque[tuple[str, _Relay | None]] = collections.deque()
        self._by_fd: dict[int, _Relay] = {}  # the loop thread's
        self._timed: set[_Relay] = set()  # the loop thread's: relays with idle timeouts
        self._next_sweep = math.inf
        self._now = time.monotonic()
        self._handed: set[_Relay] = set()  # trio's: relays given to the loop, not yet settled
        self._running = False
        self._lock = threading.Lock()  # orders commands against the loop's stop
        self._stopped = False
        self.failure: BaseException | None = None

    def __repr__(self) -> str:
        state = "failed" if self.failure else "running" if self._running else "stopped"
        return f"<RelayLoop {state} relays={len(self._handed)}>"

    @property
    def running(self) -> bool:
        """True while the loop takes relays (False before ``run``, after a stop or failure)."""
        return self._running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the loop thread until cancelled; then stop it and wait for it to end."""
        async with trio.open_nursery() as nursery:
            async def stop_on_cancel() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    self._post("stop", None)

            nursery.start_soon(stop_on_cancel)
            self._running = True
            task_status.started()
            try:
                await trio.to_thread.run_sync(self._guarded)  # returns once "stop" is seen
            except Exception as exc:  # the thread died: its relays are told below
                self.failure = exc
                log.error("relay loop failed; its relays end as broken, new ones use the trio "
                          "engine: %r", exc, exc_info=exc)
            finally:
                self._close()
            nursery.cancel_scope.cancel()

    def _close(self) -> None:
        """The thread is gone: lock ``_post`` out, close the descriptors, settle every relay
        the loop still had (their sockets are the callers' again)."""
        with self._lock:
            self._stopped = True
            self._running = False
            self._commands.clear()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._epoll.close()
        reason = f"broken: the relay loop failed: {self.failure!r}" if self.failure \
            else "broken: the proxy is stopping"
        for entry in list(self._handed):
            for way in (entry.up, entry.down):
                if self.failure is None:  # (a failing counter may be why the loop died)
                    self._flush(way, entry)
                if way.pipe is not None:
                    os.close(way.pipe[0])
                    os.close(way.pipe[1])
                    way.pipe = None
            entry.settle(reason)

    async def relay(self, client: trio.SocketStream, backend: trio.SocketStream, *,
                    up_open: bool = True, count: ByteCounter | None = None,
                    idle: IdleTimeouts | None = None, waiting: bool = False) -> str:
        """Relay until both ways end, one breaks or the relay is idle; return ``"done"``,
        ``"broken: ..."`` or ``idle_outcome(side)``. Raises ``LoopStopped`` (having touched
        nothing) when the loop does not run.

        ``up_open`` False: the client's EOF was already passed on (it came while held).
        ``waiting``: the client spoke last (its held bytes went out). The sockets stay open;
        the caller closes them.
        """
        if not self._running:
            raise LoopStopped(repr(self))
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        outcome: list[str] = []

        def settle(result: str) -> None:  # in trio; the first word counts
            if not finished.is_set():
                outcome.append(result)
                finished.set()

        def done(result: str) -> None:  # in the loop thread
            token.run_sync_soon(settle, result)

        cfd, bfd = client.socket.fileno(), backend.socket.fileno()
        entry = _Relay(_Way("up", cfd, bfd, open=up_open), _Way("down", bfd, cfd), count, done,
                       settle, idle, waiting)
        if not self._post("add", entry):
            raise LoopStopped(repr(self))
        self._handed.add(entry)
        try:
            await finished.wait()
        finally:
            if not finished.is_set():
                self._post("remove", entry)  # acknowledged through ``done``, or by ``_close``
                with trio.CancelScope(shield=True):
                    await finished.wait()
            self._handed.discard(entry)
        return "cancelled" if outcome[0] == _REMOVED else outcome[0]

    # ---- the loop thread ---------------------------------------------------------------

    def _post(self, what: str, entry: _Relay | None) -> bool:
        """Queue a command for the thread; False once it stopped (``_close`` settles the
        relays it had, so a removal needs nothing more)."""
        with self._lock:
            if self._stopped:
                return False
            self._commands.append((what, entry))
            with contextlib.suppress(BlockingIOError):  # full: a wake-up is already pending
                os.write(self._wake_w, b"x")
        return True

    def _guarded(self) -> None:
        try:
            self._loop()
        except BaseException:
            with self._lock:  # from now on relays go to the trio engine at once
                self._stopped = True
            raise

    def _loop(self) -> None:
        while True:
            timeout = -1.0 if self._next_sweep == math.inf \
                else max(0.0, self._next_sweep - self._now)
            ready = self._epoll.poll(timeout)
            self._now = time.monotonic()
            if self._now >= self._next_sweep:
                self._sweep()
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
                    self._flush(entry.up, entry)
                self._update(entry)
                if not entry.up.open and not entry.down.open:
                    self._finish(entry, "done")
            elif what == "remove":
                if self._by_fd.get(entry.up.src) is entry:
                    self._detach(entry)
                entry.done(_REMOVED)  # (if it had finished already, that word came first)
        return True

    def _sweep(self) -> None:
        """End the relays that were idle too long; plan the next sweep."""
        every = math.inf
        for entry in list(self._timed):
            idle = entry.idle
            assert idle is not None
            limit = idle.upstream_s if entry.waiting else idle.client_s
            if self._now - entry.last_at >= limit:
                self._finish(entry, idle_outcome("upstream" if entry.waiting else "client"))
            else:
                every = min(every, idle.check_every_s)
        self._next_sweep = self._now + every

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
                entry.waiting = way is entry.up
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
        entry.waiting = way is entry.up  # an EOF too: a half-closed client waits
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
        self._timed.discard(entry)
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


_REMOVED = "removed"  # the word that acknowledges a "remove"


def _shutdown(fd: int) -> None:
    """Half-close ``fd`` (a socket trio owns) without taking it over."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    finally:
        sock.detach()
