"""The alert runner: feeds the policy, and sends each alert it lets out to a log line,
``edge_alerts_total{kind,node}`` and the optional ``alerts.alert_command``.

Reports reach it through ``observe`` (called by the report intake, on the event loop); the
proxy's failed-wake counts it reads itself every ``WAKE_FAILURE_POLL_S``. Commands run one at
a time in its own task, each with the alert as JSON on stdin and ``alert_command_timeout_s``
to finish; a command that cannot start, fails or overruns is logged, never retried (the next
alert of the key comes after ``alert_repeat_s``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Final

import trio
from prometheus_client import CollectorRegistry, Counter

from edge_proxy.alerts.policy import Alert, AlertPolicy
from shared.config.edge import AlertsConfig
from shared.reports import Report

log = logging.getLogger(__name__)

# A failed wake is counted by the wake driver; looking this often is soon enough for a person.
WAKE_FAILURE_POLL_S: Final = 1.0
# Alerts waiting for their command; beyond this (a command that hangs) the newest are dropped.
MAX_PENDING_COMMANDS: Final = 100
COMMAND_OUTPUT_CHARS: Final = 200  # of a failed command's stderr, in its log line

WakeFailureCounts = Callable[[], Mapping[str, float]]


class AlertRunner:
    """Owns the alert policy; raises what it lets out. Run ``run`` in the proxy's nursery."""

    def __init__(self, settings: AlertsConfig, registry: CollectorRegistry, *,
                 wake_failures: WakeFailureCounts, clock: Callable[[], float] = trio.current_time,
                 wall: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.policy = AlertPolicy(settings)
        self.wake_failure_counts = wake_failures
        self.clock = clock
        self.wall = wall
        self.counter = Counter("edge_alerts", "Alerts raised (after repeats were held back), by "
                               "kind and node", ["kind", "node"], registry=registry)
        self.raised: list[Alert] = []  # the last few, for status
        self.command_failures = 0
        self._send, self._receive = trio.open_memory_channel[Alert](MAX_PENDING_COMMANDS)

    def __repr__(self) -> str:
        return f"<AlertRunner raised={len(self.raised)} command={self.settings.alert_command}>"

    def reconfigure(self, settings: AlertsConfig) -> None:
        """Take reloaded ``[alerts]`` settings."""
        self.settings = settings
        self.policy.reconfigure(settings)

    def observe(self, node: str, record: Report) -> None:
        """A stored report record: raise the alerts it causes."""
        self._raise(self.policy.admit(self.policy.report(node, record), self.clock()))

    def check_wake_failures(self) -> None:
        """Compare the proxy's failed-wake counts with the last look."""
        now, wall = self.clock(), self.wall()
        for node, total in sorted(self.wake_failure_counts().items()):
            self._raise(self.policy.admit(self.policy.wake_failures(node, total, wall), now))

    def _raise(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            log.warning("alert %s: %s", alert.kind, alert.message)
            self.counter.labels(alert.kind, alert.node).inc()
            self.raised = [*self.raised[-19:], alert]
            if self.settings.alert_command is None:
                continue
            try:
                self._send.send_nowait(alert)
            except trio.WouldBlock:
                log.error("alert %s: not passed to alerts.alert_command: %d alerts already "
                          "wait for it (is it hanging?)", alert.key, MAX_PENDING_COMMANDS)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll the failed-wake counts and run alert commands until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._command_loop)
            self.check_wake_failures()  # (nothing has failed yet when the proxy starts)
            task_status.started()
            while True:
                await trio.sleep(WAKE_FAILURE_POLL_S)
                self.check_wake_failures()

    async def _command_loop(self) -> None:
        async for alert in self._receive:
            argv = self.settings.alert_command
            if argv is not None:
                await self.run_command(list(argv), alert)

    async def run_command(self, argv: list[str], alert: Alert) -> bool:
        """Run ``argv`` with ``alert`` as JSON on stdin; True when it exited 0 in time."""
        timeout = self.settings.alert_command_timeout_s
        problem = None
        with trio.move_on_after(timeout) as scope:
            try:
                result = await trio.run_process(
                    argv, stdin=json.dumps(alert.to_json()).encode() + b"\n",
                    capture_stdout=True, capture_stderr=True, check=False)
            except OSError as exc:
                problem = f"cannot run: {exc.strerror or exc}"
            else:
                if result.returncode != 0:
                    err = result.stderr.decode(errors="replace").strip().splitlines()
                    problem = (f"exited {result.returncode}: "
                               + (err[-1][:COMMAND_OUTPUT_CHARS] if err else "no message"))
        if scope.cancelled_caught:
            problem = (f"did not finish within {timeout:g} s (alerts.alert_command_timeout_s); "
                       "killed")
        if problem is None:
            return True
        self.command_failures += 1
        log.error("alert %s: alerts.alert_command %r %s", alert.key, argv[0], problem)
        return False
