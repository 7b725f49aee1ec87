"""The relay loop: one thread that moves the bytes of every established relay.

Why a thread: per forwarded chunk, trio's scheduler (a task switch and an epoll_ctl per
wait) costs about three times the read and write themselves. Small request/response
traffic is made of nothing but such chunks, so established relays are handed to one loop
on a level-triggered epoll, registered once, that does read → write and nothing else
(``relay_thread``). trio still accepts, holds, wakes, connects and owns every socket; it
waits for the loop to say a relay ended, and it is the one that closes the sockets.

``RelayLoop.relay`` keeps the contract of ``relay.relay`` and returns the outcome; if the
caller is cancelled, the relay is taken out of the loop before the call returns, so the
caller may close the sockets right away. Acknowledgements reach trio through its token,
not a thread per waiter.

It fails loudly: if the thread raises, ``run`` logs the cause, ends every relay it had as
``broken``, closes its descriptors (only once the thread is gone, and with ``_post`` locked
out, so no descriptor number is written after it was closed), and returns; from then on
``relay`` raises ``LoopStopped`` and callers use the trio engine (``relay.trio_relay``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable

import trio

from edge_proxy.errors import LoopStopped
from edge_proxy.tcp_routes.idle import IdleTimeouts
from edge_proxy.tcp_routes.relay_thread import REMOVED, ByteCounter, Entry, LoopThread, Way

log = logging.getLogger(__name__)


class RelayLoop:
    """Owns the loop thread. ``run`` starts it (and stops it when cancelled)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._commands: collections.deque[tuple[str, Entry | None]] = collections.deque()
        self._thread = LoopThread(self._epoll, self._wake_r, self._commands)
        self._handed: set[Entry] = set()  # trio's: relays given to the loop, not yet settled
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
                    LoopThread.flush(way, entry)
                if way.pipe is not None:
                    os.close(way.pipe[0])
                    os.close(way.pipe[1])
                    way.pipe = None
            entry.settle(reason)

    async def relay(self, client: trio.SocketStream, backend: trio.SocketStream, *,
                    up_open: bool = True, count: ByteCounter | None = None,
                    idle: IdleTimeouts | None = None, waiting: bool = False) -> str:
        """Relay until both ways end, one breaks or the relay is idle; return ``"done"``,
        ``"broken: ..."`` or ``idle.idle_outcome(...)``. Raises ``LoopStopped`` (having touched
        nothing) when the loop does not run.

        ``up_open`` False: the client's EOF was already passed on (it came while held).
        ``waiting``: the client spoke last (its held bytes went out). The sockets stay open;
        the caller closes them.
        """
        cfd, bfd = client.socket.fileno(), backend.socket.fileno()
        return await self._run_entry(lambda done, settle: Entry(
            Way("up", cfd, bfd, open=up_open), Way("down", bfd, cfd), count, done, settle,
            idle, waiting))

    async def pass_answer(self, client: trio.SocketStream, backend: trio.SocketStream,
                          inspect: Callable[[bytes], int | None],
                          idle: IdleTimeouts | None = None) -> str:
        """Pass an HTTP answer's body from ``backend`` to ``client`` as it is read, until
        ``inspect`` (told each chunk; see ``Entry.inspect``) says it ended; return
        ``"done"``, ``"broken: ..."`` (the backend closed early, bad framing), ``CLIENT_GONE:
        ...`` (a write to the client failed) or ``"idle upstream"``. The client is not read
        (trio watches it) and neither socket is half-closed. Raises ``LoopStopped`` when the loop does not run."""
        cfd, bfd = client.socket.fileno(), backend.socket.fileno()
        return await self._run_entry(lambda done, settle: Entry(
            Way("up", cfd, bfd, open=False), Way("down", bfd, cfd), None, done, settle,
            idle, waiting=True, inspect=inspect))

    async def _run_entry(self, make: Callable[[Callable[[str], None], Callable[[str], None]],
                                              Entry]) -> str:
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

        entry = make(done, settle)
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
        return "cancelled" if outcome[0] == REMOVED else outcome[0]

    def _post(self, what: str, entry: Entry | None) -> bool:
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
            self._thread.run()
        except BaseException:
            with self._lock:  # from now on relays go to the trio engine at once
                self._stopped = True
            raise
