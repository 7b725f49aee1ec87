"""Run a real llama-server (or any llama.cpp program) as a trio child process in tests.

``llama_server(binary, model, args)`` starts llama-server on a free loopback port, collects
its output line by line, waits until ``/health`` answers 200 (failing fast, with the log
tail, if the process exits first), yields a ``RunningServer`` and always tears the process
down: SIGTERM, a grace period, SIGKILL, then ``wait()``.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx
import trio

from tests.support.ports import LOOPBACK, free_port

# A loaded 2-core machine may take a while to map even a tiny model; generous on purpose.
READY_TIMEOUT_S: Final = 60.0
HEALTH_POLL_INTERVAL_S: Final = 0.05
HEALTH_REQUEST_TIMEOUT_S: Final = 2.0
TERM_GRACE_S: Final = 5.0
# Another process may take the port between free_port() and llama-server's bind.
PORT_ATTEMPTS: Final = 3
LOG_TAIL_LINES: Final = 40
READ_CHUNK_BYTES: Final = 65536
_BIND_FAILURE_MARKERS: Final = ("couldn't bind", "address already in use")


class ServerFailed(Exception):
    """The child exited or never became healthy; the message carries its log tail."""


@dataclass
class LogLines:
    """Lines a child printed so far, with a way to wait for one to appear."""

    lines: list[str] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    def append(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()
        self._changed = trio.Event()

    def text(self) -> str:
        return "\n".join(self.lines)

    def tail(self, n: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.lines[-n:])

    def matching(self, needle: str) -> list[str]:
        return [line for line in self.lines if needle in line]

    async def wait_for(self, needle: str, *, count: int = 1) -> list[str]:
        """Wait until at least ``count`` lines contain ``needle``; wrap in a timeout."""
        while len(found := self.matching(needle)) < count:
            await self._changed.wait()
        return found


@dataclass
class RunningServer:
    url: str
    port: int
    process: trio.Process
    log: LogLines


async def _collect_lines(stream: trio.abc.ReceiveStream, log: LogLines) -> None:
    pending = b""
    while chunk := await stream.receive_some(READ_CHUNK_BYTES):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            log.append(raw.decode("utf-8", "replace").rstrip("\r"))
    if pending:
        log.append(pending.decode("utf-8", "replace"))


async def terminate(process: trio.Process, grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM, wait up to ``grace_s``, SIGKILL, and always reap. Shielded from cancellation."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace_s):
                await process.wait()
            if process.returncode is None:
                process.kill()
        await process.wait()


async def _wait_healthy(url: str, process: trio.Process, log: LogLines, timeout_s: float) -> None:
    async with httpx.AsyncClient(timeout=HEALTH_REQUEST_TIMEOUT_S) as client:
        with trio.move_on_after(timeout_s):
            while process.returncode is None:
                try:
                    response = await client.get(f"{url}/health")
                    if response.status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet, or busy loading
                await trio.sleep(HEALTH_POLL_INTERVAL_S)
            # The reader may still hold the last lines explaining the exit.
            await trio.sleep(HEALTH_POLL_INTERVAL_S)
            raise ServerFailed(f"exited with {process.returncode} before healthy:\n{log.tail()}")
    raise ServerFailed(f"not healthy after {timeout_s} s:\n{log.tail()}")


@asynccontextmanager
async def child_process(command: Sequence[str | Path]) -> AsyncIterator[tuple[trio.Process, LogLines]]:
    """Run ``command`` with stdout+stderr collected into a LogLines; terminate on exit."""
    process = await trio.lowlevel.open_process(
        [str(part) for part in command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    log = LogLines()
    assert process.stdout is not None
    # The reader ends at EOF, i.e. once the process is gone: terminate inside the nursery.
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect_lines, process.stdout, log)
            try:
                yield process, log
            finally:
                await terminate(process)
    except BaseExceptionGroup as group:
        # Only the body can fail (the reader does not): let tests see its own exception.
        if len(group.exceptions) == 1:
            only = group.exceptions[0]
            raise only from only.__cause__
        raise


@asynccontextmanager
async def llama_server(
    binary: Path,
    model: Path,
    args: Sequence[str] = (),
    *,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> AsyncIterator[RunningServer]:
    """A healthy llama-server on 127.0.0.1 serving ``model`` with extra ``args``."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        command = [binary, "-m", model, "--host", LOOPBACK, "--port", str(port), *args]
        async with child_process(command) as (process, log):
            try:
                await _wait_healthy(url, process, log, ready_timeout_s)
            except ServerFailed:
                bind_failed = any(m in log.text().lower() for m in _BIND_FAILURE_MARKERS)
                if bind_failed and attempt < PORT_ATTEMPTS:
                    continue
                raise
            yield RunningServer(url=url, port=port, process=process, log=log)
            return
    raise AssertionError("unreachable: the last attempt raises")



# The RPC server prints its banner before it accepts; a TCP connect is the real signal.
RPC_CONNECT_POLL_S: Final = 0.05


@asynccontextmanager
async def rpc_servers(
    binary: Path, count: int, *, ready_timeout_s: float = READY_TIMEOUT_S
) -> AsyncIterator[list[tuple[str, LogLines]]]:
    """``count`` ggml RPC servers on loopback (``binary -H 127.0.0.1 -p PORT``), each
    accepting connections; yields ``[("127.0.0.1:PORT", log), ...]`` for ``--rpc``."""
    async with AsyncExitStack() as stack:
        endpoints: list[tuple[str, LogLines]] = []
        for _ in range(count):
            port = free_port()
            command = [binary, "-H", LOOPBACK, "-p", str(port)]
            process, log = await stack.enter_async_context(child_process(command))
            await _wait_accepting(port, process, log, ready_timeout_s)
            endpoints.append((f"{LOOPBACK}:{port}", log))
        yield endpoints


async def _wait_accepting(port: int, process: trio.Process, log: LogLines, timeout_s: float) -> None:
    with trio.move_on_after(timeout_s):
        while process.returncode is None:
            try:
                stream = await trio.open_tcp_stream(LOOPBACK, port)
            except OSError:
                await trio.sleep(RPC_CONNECT_POLL_S)
                continue
            await stream.aclose()
            return
        raise ServerFailed(f"exited with {process.returncode} before accepting:\n{log.tail()}")
    raise ServerFailed(f"port {port} not accepting after {timeout_s} s:\n{log.tail()}")
