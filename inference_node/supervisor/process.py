"""Child processes in their own process group: spawn, watch, stop, reap; and health probes.

Each child starts a new session (``setsid``), so its process group holds it and anything it
spawns. Stopping sends SIGTERM to the group, waits up to a grace time, then SIGKILL to the
group, and always reaps. The leader is left a zombie until the group has been signalled, so
its pid (the group id) cannot be reused by an unrelated process while we signal it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

import trio

from shared.net import open_tcp

# After SIGKILL the kernel tears a process down promptly; this only bounds a child stuck in
# uninterruptible sleep (a hung driver call) so the agent itself never hangs on it.
KILL_REAP_TIMEOUT_S = 10.0
PROBE_MAX_RESPONSE_BYTES = 4096


class Child:
    """A spawned process and a pidfd to learn of its exit without reaping it."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._pidfd: int | None = os.pidfd_open(proc.pid)
        self.returncode: int | None = None

    def __repr__(self) -> str:
        return f"<Child pid={self.pid} returncode={self.returncode}>"

    @property
    def exited(self) -> bool:
        """True once the leader has exited (zombie or reaped)."""
        if self.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    async def wait_exited(self) -> None:
        """Return when the leader exits; it stays a zombie (unreaped) until ``reap``."""
        if self._pidfd is None:
            return
        await trio.lowlevel.wait_readable(self._pidfd)

    def signal_group(self, sig: signal.Signals) -> bool:
        """Send ``sig`` to the child's whole process group; False if the group is gone."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False
        return True

    async def reap(self) -> int:
        """Collect the leader's exit status (it must have exited) and close the pidfd."""
        with trio.move_on_after(KILL_REAP_TIMEOUT_S):
            self.returncode = await self.proc.wait()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return self.returncode if self.returncode is not None else -signal.SIGKILL

    async def stop(self, grace_s: float) -> int:
        """SIGTERM the group, SIGKILL it after ``grace_s``, reap; return the leader's returncode.

        Safe to call whether or not the leader already exited; call it shielded from
        cancellation so a child is never left running.
        """
        if not self.exited:
            self.signal_group(signal.SIGTERM)
            # A stopped process (SIGSTOP, a debugger let go) acts on SIGTERM only once
            # continued; systemd sends SIGCONT after its stop signal for the same reason.
            self.signal_group(signal.SIGCONT)
            with trio.move_on_after(grace_s):
                await self.wait_exited()
        # Leftover members (grandchildren, or a leader that ignored SIGTERM) are killed now,
        # while the leader is still an unreaped zombie holding the group id.
        self.signal_group(signal.SIGKILL)
        if not self.exited:
            with trio.move_on_after(KILL_REAP_TIMEOUT_S):
                await self.wait_exited()
        return await self.reap()


async def spawn(argv: Sequence[str], env: Mapping[str, str]) -> Child:
    """Start ``argv`` in a new session with stdout/stderr piped; OSError if it cannot run."""
    proc = await trio.lowlevel.open_process(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
        start_new_session=True,
    )
    return Child(proc)


async def probe_health(host: str, port: int, path: str) -> int | None:
    """GET ``path`` over HTTP/1.1 and return the status code, or None if there is no answer.

    It has no timeout of its own: a server that accepts and never answers blocks it, so the
    caller puts it in a cancel scope (``trio.move_on_after``) with its budget.
    """
    try:
        stream = await open_tcp(host, port)
    except OSError:
        return None
    async with stream:
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                   "Connection: close\r\nUser-Agent: llamanap-node-agent\r\n\r\n")
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(request.encode())
        head = b""
        try:
            while b"\r\n" not in head and len(head) < PROBE_MAX_RESPONSE_BYTES:
                chunk = await stream.receive_some(PROBE_MAX_RESPONSE_BYTES)
                if not chunk:
                    break
                head += chunk
        except (trio.BrokenResourceError, OSError):
            return None
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None
