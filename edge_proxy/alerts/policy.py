"""Which observations are alerts, and which alerts may go out now: pure, times passed in.

Observations are the node's reports (GPU samples, instance changes, sleep cycles) and the
proxy's own count of failed wakes. A crash loop is counted on the agent's times (``t`` of the
reports), so a batch that arrives late after an outage still counts its crashes where they
happened; repeats are held back on the proxy's clock (``now``): one alert per key per
``alert_repeat_s``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from shared.config.edge import AlertsConfig
from shared.reports import CycleReport, GpuReport, InstanceReport, Report

AlertKind = Literal["gpu_temperature", "gpu_memory", "wake_failed", "suspend_failed",
                    "crash_loop"]
ALERT_KINDS: Final[tuple[AlertKind, ...]] = ("gpu_temperature", "gpu_memory", "wake_failed",
                                             "suspend_failed", "crash_loop")


@dataclass(frozen=True)
class Alert:
    """One alert. ``key`` says what it is about (kind, node, GPU or instance): repeats of a
    key are held back. ``t`` is wall time (Unix seconds) of what caused it."""

    kind: AlertKind
    node: str
    key: str
    message: str
    t: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "node": self.node, "key": self.key, "message": self.message,
                "t": self.t, "details": self.details}


class AlertPolicy:
    """Turns observations into alerts and holds back repeats."""

    def __init__(self, settings: AlertsConfig) -> None:
        self.settings = settings
        self._crashes: dict[tuple[str, str], deque[float]] = {}
        self._last_sent: dict[str, float] = {}
        self._wake_failures: dict[str, float] = {}

    def reconfigure(self, settings: AlertsConfig) -> None:
        """New thresholds from the next observation on; what was counted stays."""
        self.settings = settings

    # -- observations -> alerts ---------------------------------------------------------------

    def report(self, node: str, record: Report) -> list[Alert]:
        """The alerts one report record raises (before repeats are held back)."""
        if isinstance(record, GpuReport):
            return self._gpu(node, record)
        if isinstance(record, InstanceReport):
            return self._instance(node, record)
        if isinstance(record, CycleReport):
            return self._cycle(node, record)
        return []  # a busy GPU is no alert

    def wake_failures(self, node: str, total: float, t: float) -> list[Alert]:
        """The proxy's count of failed wakes of ``node`` is ``total``: an alert if it rose."""
        last = self._wake_failures.get(node, 0.0)
        self._wake_failures[node] = total
        if total <= last:
            return []
        n = int(total - last)
        return [Alert("wake_failed", node, f"wake_failed:{node}",
                      f"node {node}: {n} wake(s) failed (no ready backend within "
                      "wake_timeout_s); check Wake-on-LAN and the node's boot", t,
                      {"failures_total": total})]

    def _gpu(self, node: str, r: GpuReport) -> list[Alert]:
        s, alerts = self.settings, []
        if s.gpu_temp_c is not None and r.temperature_c is not None \
                and r.temperature_c >= s.gpu_temp_c:
            alerts.append(Alert("gpu_temperature", node, f"gpu_temperature:{node}:{r.gpu_uuid}",
                                f"node {node}: GPU {r.gpu_uuid} at {r.temperature_c:g} °C "
                                f"(alerts.gpu_temp_c = {s.gpu_temp_c:g})", r.t,
                                {"gpu_uuid": r.gpu_uuid, "temperature_c": r.temperature_c}))
        pct = r.memory_pct
        if s.gpu_memory_pct is not None and pct is not None and pct >= s.gpu_memory_pct:
            alerts.append(Alert("gpu_memory", node, f"gpu_memory:{node}:{r.gpu_uuid}",
                                f"node {node}: GPU {r.gpu_uuid} memory {pct:.1f}% used "
                                f"(alerts.gpu_memory_pct = {s.gpu_memory_pct:g})", r.t,
                                {"gpu_uuid": r.gpu_uuid, "memory_pct": round(pct, 1),
                                 "memory_used_mib": r.memory_used_mib}))
        return alerts

    def _instance(self, node: str, r: InstanceReport) -> list[Alert]:
        if r.change != "crashed":
            return []
        s = self.settings
        crashes = self._crashes.setdefault((node, r.instance), deque())
        crashes.append(r.t)
        while crashes and crashes[0] <= r.t - s.crash_loop_window_s:
            crashes.popleft()
        if len(crashes) < s.crash_loop_count:
            return []
        return [Alert("crash_loop", node, f"crash_loop:{node}:{r.instance}",
                      f"node {node}: instance {r.instance} crashed {len(crashes)} times within "
                      f"{s.crash_loop_window_s:g} s (alerts.crash_loop_count = "
                      f"{s.crash_loop_count}); last: {r.reason or r.state}", r.t,
                      {"instance": r.instance, "crashes": len(crashes), "state": r.state})]

    def _cycle(self, node: str, r: CycleReport) -> list[Alert]:
        if r.outcome != "failed":
            return []
        return [Alert("suspend_failed", node, f"suspend_failed:{node}",
                      f"node {node}: suspend failed: {r.detail}", r.t,
                      {"detail": r.detail, "steps": [list(s) for s in r.steps]})]

    # -- repeats ------------------------------------------------------------------------------

    def admit(self, alerts: list[Alert], now: float) -> list[Alert]:
        """The alerts that may go out at ``now``: a key goes out at most once per
        ``alert_repeat_s`` (the first one always)."""
        out = []
        for alert in alerts:
            last = self._last_sent.get(alert.key)
            if last is not None and now - last < self.settings.alert_repeat_s:
                continue
            self._last_sent[alert.key] = now
            out.append(alert)
        return out
