"""Child output: read pipes line by line, keep a bounded ring, hand lines to watchers.

A pipe that nobody reads fills (64 KiB on Linux) and then blocks the child's next write, so
each stream of each child is read by its own task for as long as the pipe is open.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 65536
# A line longer than this is cut: a runaway line must not grow the agent's memory without bound.
MAX_LINE_BYTES = 16384

LineSink = Callable[[str, str, float], None]
"""``sink(instance, line, t)`` with ``t = trio.current_time()``; called for every line, must not block."""


@dataclass(frozen=True)
class LogLine:
    """One line of child output as the API shows it."""

    seq: int  # numbers every line of the instance from 1, so a reader can ask for newer ones
    time: float  # wall clock (time.time()), for people
    stream: str  # "stdout", "stderr", or "hook[N]"
    text: str


class LogRing:
    """The last ``size`` lines of one instance (across restarts, so a crash's cause stays visible)."""

    def __init__(self, size: int) -> None:
        self._lines: deque[LogLine] = deque(maxlen=size)
        self._seq = 0

    def append(self, stream: str, text: str) -> None:
        self._seq += 1
        self._lines.append(LogLine(self._seq, time.time(), stream, text))

    def tail(self, n: int, after: int = 0) -> list[LogLine]:
        """The last ``n`` lines with ``seq > after``, oldest first."""
        if n <= 0:
            return []
        lines = [line for line in self._lines if line.seq > after] if after else list(self._lines)
        return lines[-n:]

    def resize(self, size: int) -> None:
        if size != self._lines.maxlen:
            self._lines = deque(self._lines, maxlen=size)


async def pump_lines(
    stream: trio.abc.ReceiveStream,
    emit: Callable[[str], None],
) -> None:
    """Read ``stream`` until EOF, calling ``emit(line)`` per line (no newline, UTF-8 with repairs)."""
    pending = bytearray()
    while True:
        try:
            chunk = await stream.receive_some(READ_CHUNK_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            chunk = b""
        if not chunk:
            if pending:
                emit(_decode(pending))
            return
        pending += chunk
        start = 0
        while True:
            end = pending.find(b"\n", start)
            if end < 0:
                break
            emit(_decode(pending[start:end]))
            start = end + 1
        del pending[:start]
        if len(pending) > MAX_LINE_BYTES:
            emit(_decode(pending[:MAX_LINE_BYTES]) + " [line cut]")
            pending.clear()


def dispatch(sinks: Iterable[LineSink], instance: str, line: str, now: float) -> None:
    """Hand one line to every sink; a failing sink is logged and never stops the others."""
    for sink in sinks:
        try:
            sink(instance, line, now)
        except Exception:
            log.exception("line watcher %r failed on a line of %s", sink, instance)


def _decode(raw: bytes | bytearray) -> str:
    return bytes(raw).rstrip(b"\r").decode("utf-8", errors="replace")
