"""Prometheus series of the GPUs and of instance activity, read from status at scrape time.

GPUs are labelled by UUID and PCI bus id (never by an index, which differs between NVML, CUDA
and NVAPI). Series of a reading NVML cannot give on a GPU are left out rather than faked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

MIB_BYTES: Final = 1024 * 1024
PCT: Final = 100.0
HEALTH_STATES: Final = ("unknown", "ok", "not-working", "unsupported", "no-backend")

StatusSource = Callable[[], dict[str, Any]]


class GpuActivityCollector(Collector):
    """``llamanap_gpu_*`` and ``llamanap_instance_{busy,tasks,...}`` series."""

    def __init__(self, gpu_status: StatusSource, activity_status: StatusSource) -> None:
        self.gpu_status = gpu_status
        self.activity_status = activity_status

    def collect(self) -> Iterator[Metric]:
        yield from self._gpus(self.gpu_status())
        yield from self._instances(self.activity_status()["instances"])

    def _gpus(self, status: dict[str, Any]) -> Iterator[Metric]:
        labels = ["uuid", "pci_bus_id", "name"]

        def gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels + (extra or []))

        available = GaugeMetricFamily(
            "llamanap_pstate_backend_available",
            "1 when P-states can be switched at all (NVML and libnvidia-api usable)")
        available.add_metric([], 0.0 if status["backend_problem"] or status["inventory_problem"]
                             else 1.0)
        yield available
        wanted = gauge("llamanap_gpu_pstate_wanted", "P-state the policy wants (16: driver decides)")
        read = gauge("llamanap_gpu_pstate", "P-state NVML reads now")
        health = gauge("llamanap_gpu_pstate_control", "1 for the state of P-state control",
                       ["state"])
        switches = CounterMetricFamily("llamanap_gpu_pstate_switches", "P-state switches made",
                                       labels=labels)
        failures = CounterMetricFamily("llamanap_gpu_pstate_switch_failures",
                                       "P-state switches that failed", labels=labels)
        seconds = CounterMetricFamily("llamanap_gpu_pstate_seconds",
                                      "Seconds spent in the low or the high P-state",
                                      labels=[*labels, "state"])
        total = gauge("llamanap_gpu_memory_total_bytes", "GPU memory")
        used = gauge("llamanap_gpu_memory_used_bytes", "GPU memory in use")
        free = gauge("llamanap_gpu_memory_free_bytes", "GPU memory free")
        util = gauge("llamanap_gpu_utilization_ratio", "GPU utilization, 0..1")
        temp = gauge("llamanap_gpu_temperature_celsius", "GPU temperature")
        power = gauge("llamanap_gpu_power_watts", "GPU power draw")
        estimated = gauge("llamanap_gpu_memory_estimated_bytes",
                          "Sum of the placement estimates of the instances loaded on the GPU")
        reported = gauge("llamanap_gpu_memory_reported_bytes",
                         "Sum of the buffers llama-server reported on the GPU (-lv 4 lines)")
        empty = gauge("llamanap_gpu_empty", "1 when nothing is loaded on the GPU (no instance, "
                      "no other program)")
        for gpu in status["gpus"]:
            key = [gpu["uuid"], gpu["pci_bus_id"], gpu["name"]]
            _maybe(wanted, key, gpu["pstate_wanted"])
            _maybe(read, key, gpu["pstate"] if gpu["pstate_read_back"] is None
                   else gpu["pstate_read_back"])
            for state in HEALTH_STATES:
                health.add_metric([*key, state], 1.0 if gpu["pstate_control"] == state else 0.0)
            switches.add_metric(key, float(gpu["switches"]))
            failures.add_metric(key, float(gpu["switch_failures"]))
            seconds.add_metric([*key, "low"], gpu["seconds_low"])
            seconds.add_metric([*key, "high"], gpu["seconds_high"])
            _maybe(total, key, gpu["memory_total_mib"], MIB_BYTES)
            _maybe(used, key, gpu["memory_used_mib"], MIB_BYTES)
            _maybe(free, key, gpu["memory_free_mib"], MIB_BYTES)
            _maybe(util, key, gpu["utilization_pct"], 1 / PCT)
            _maybe(temp, key, gpu["temperature_c"])
            _maybe(power, key, gpu["power_w"])
            _maybe(estimated, key, gpu.get("estimated_mib"), MIB_BYTES)
            _maybe(reported, key, gpu.get("reported_mib"), MIB_BYTES)
            if "empty" in gpu:
                empty.add_metric(key, 1.0 if gpu["empty"] else 0.0)
        yield from (wanted, read, health, switches, failures, seconds, total, used, free, util,
                    temp, power, estimated, reported, empty)

    def _instances(self, instances: dict[str, Any]) -> Iterator[Metric]:
        busy = GaugeMetricFamily("llamanap_instance_busy", "1 while a slot processes a task",
                                 labels=["instance"])
        slots = GaugeMetricFamily("llamanap_instance_busy_slots", "Slots processing a task",
                                  labels=["instance"])
        tasks = CounterMetricFamily("llamanap_instance_tasks", "Tasks started (from the log)",
                                    labels=["instance"])
        busy_s = CounterMetricFamily("llamanap_instance_busy_seconds", "Seconds with a task running",
                                     labels=["instance"])
        fixes = CounterMetricFamily("llamanap_instance_activity_corrections",
                                    "Times /slots corrected what the log said", labels=["instance"])
        speed = GaugeMetricFamily("llamanap_instance_tokens_per_second",
                                  "Generation speed from llama-server's /metrics (--metrics)",
                                  labels=["instance"])
        for name, entry in instances.items():
            busy.add_metric([name], 1.0 if entry["busy"] else 0.0)
            slots.add_metric([name], float(len(entry["active_slots"])))
            tasks.add_metric([name], float(entry["tasks_started"]))
            busy_s.add_metric([name], entry["busy_seconds"])
            fixes.add_metric([name], float(entry["corrections"]))
            _maybe(speed, [name], entry["tokens_per_second"])
        yield from (busy, slots, tasks, busy_s, fixes, speed)


def _maybe(family: GaugeMetricFamily, labels: list[str], value: float | None,
           scale: float = 1.0) -> None:
    if value is not None:
        family.add_metric(labels, float(value) * scale)
