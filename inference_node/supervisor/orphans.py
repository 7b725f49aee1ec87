"""Children an earlier agent left running: mark every child at spawn, stop the marked ones at start.

An agent that dies without stopping its children (SIGKILL, the OOM killer, a crash of a run
outside systemd) leaves its llama-servers running, reparented to init: they hold their ports
and GPU memory, so the next agent's instances fail with "port already in use" and the box may
suspend with them still loaded. Every child therefore carries three environment variables:

- ``LLAMANAP_OWNER=<node>/<instance>``: what it is, for the log;
- ``LLAMANAP_OWNER_STATE=<agent.state_file>``: whose it is; two agents on one box (or two test
  runs) never share a state file, so one never touches the other's children;
- ``LLAMANAP_OWNER_PID=<agent pid>``: a process whose agent is still alive is not an orphan.

``find_orphans`` reads them back (psutil ``Process.environ()``) and ``stop_orphan`` stops one
like the supervisor stops its own children: SIGTERM and SIGCONT, a grace time, SIGKILL, wait.
It signals through a pidfd opened before the environment is checked, so a pid reused by
another program in between is never signalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

import psutil
import trio

log = logging.getLogger(__name__)

OWNER_VAR = "LLAMANAP_OWNER"
OWNER_STATE_VAR = "LLAMANAP_OWNER_STATE"
OWNER_PID_VAR = "LLAMANAP_OWNER_PID"
# An orphan gets as long as a child's default stop_timeout_s to exit on SIGTERM (the config
# that set its own may be gone); then SIGKILL, and this long again for the kernel to end it.
ORPHAN_STOP_GRACE_S = 15.0
ORPHAN_KILL_WAIT_S = 10.0


@dataclass(frozen=True)
class ChildMarker:
    """What every child of one agent carries in its environment, to be found after a crash."""

    node: str
    agent_id: str  # the agent's state_file path
    agent_pid: int

    def env(self, instance: str) -> dict[str, str]:
        """The variables a child of ``instance`` is spawned with."""
        return {OWNER_VAR: f"{self.node}/{instance}", OWNER_STATE_VAR: self.agent_id,
                OWNER_PID_VAR: str(self.agent_pid)}

    def orphan_of(self, environ: Mapping[str, str]) -> str | None:
        """The instance name when ``environ`` marks a child of an earlier run of this agent.

        None for a process without this agent's marker, and for one whose agent is this
        process or still alive (it is that agent's child, not an orphan).
        """
        if environ.get(OWNER_STATE_VAR) != self.agent_id:
            return None
        node, sep, instance = environ.get(OWNER_VAR, "").partition("/")
        if not sep or node != self.node or not instance:
            return None
        owner = environ.get(OWNER_PID_VAR, "")
        if owner.isdigit() and (int(owner) == self.agent_pid or _alive(int(owner))):
            return None
        return instance


@dataclass
class Orphan:
    """A marked process found at start; ``pidfd`` refers to it and only to it."""

    pid: int
    instance: str
    program: str
    pidfd: int

    def __repr__(self) -> str:
        return f"<Orphan {self.program} pid={self.pid} of instance {self.instance}>"


def find_orphans(marker: ChildMarker) -> list[Orphan]:
    """Every live process carrying ``marker`` whose agent is gone (blocking: reads /proc).

    Processes of other users are skipped (their environment cannot be read; the agent runs
    as root in production and sees all). The caller closes each ``pidfd`` (``stop_orphan``).
    """
    found: list[Orphan] = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:
            continue  # gone already, or not ours to signal
        keep = False
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            instance = marker.orphan_of(proc.environ())
            if instance is not None:
                found.append(Orphan(proc.pid, instance, proc.name(), fd))
                keep = True
        except psutil.Error:
            continue
        finally:
            if not keep:
                os.close(fd)
    return found


async def stop_orphan(orphan: Orphan, grace_s: float = ORPHAN_STOP_GRACE_S) -> bool:
    """SIGTERM (and SIGCONT), wait ``grace_s``, SIGKILL, wait; True once it has exited.

    Closes the pidfd. Not our child, so init reaps it; its exit is seen through the pidfd.
    """
    log.warning("found %s pid %d of instance %s from an earlier agent; stopping it",
                orphan.program, orphan.pid, orphan.instance)
    try:
        how = "SIGTERM"
        _send(orphan.pidfd, signal.SIGTERM)
        _send(orphan.pidfd, signal.SIGCONT)  # a stopped process acts on SIGTERM once continued
        if not await _wait_exit(orphan.pidfd, grace_s):
            how = f"SIGKILL after {grace_s:g} s"
            _send(orphan.pidfd, signal.SIGKILL)
            if not await _wait_exit(orphan.pidfd, ORPHAN_KILL_WAIT_S):
                log.error("%s pid %d of instance %s did not exit after SIGKILL (stuck in the "
                          "kernel?); its port may stay taken", orphan.program, orphan.pid,
                          orphan.instance)
                return False
        log.info("stopped %s pid %d of instance %s (%s)", orphan.program, orphan.pid,
                 orphan.instance, how)
        return True
    finally:
        os.close(orphan.pidfd)


def _send(pidfd: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
        signal.pidfd_send_signal(pidfd, sig)


async def _wait_exit(pidfd: int, timeout_s: float) -> bool:
    with trio.move_on_after(timeout_s):
        await trio.lowlevel.wait_readable(pidfd)  # a pidfd turns readable when its process exits
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
