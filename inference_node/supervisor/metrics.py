"""Prometheus metrics of the supervisor, read from ``snapshot()`` at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inference_node.supervisor.state import State
from inference_node.supervisor.supervisor import Supervisor


class SupervisorCollector(Collector):
    """``llamanap_instance_*`` series: state (one-hot), READY, uptime, restarts."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        rows = self.supervisor.snapshot()
        state = GaugeMetricFamily("llamanap_instance_state",
                                  "1 for the state the instance is in, 0 for the others",
                                  labels=["instance", "state"])
        ready = GaugeMetricFamily("llamanap_instance_ready", "1 while the instance is READY",
                                  labels=["instance"])
        uptime = GaugeMetricFamily("llamanap_instance_uptime_seconds",
                                   "Seconds since the current process was spawned",
                                   labels=["instance"])
        restarts = CounterMetricFamily("llamanap_instance_restarts",
                                       "Automatic restarts after a crash or failed liveness probes since the agent started",
                                       labels=["instance"])
        for row in rows:
            for s in State:
                state.add_metric([row.name, s.value], 1.0 if row.state is s else 0.0)
            ready.add_metric([row.name], 1.0 if row.state is State.READY else 0.0)
            uptime.add_metric([row.name], row.uptime_s or 0.0)
            restarts.add_metric([row.name], float(row.restarts))
        yield from (state, ready, uptime, restarts)
