"""Text for people: the GPU table and the activity columns of ``node-agent status``.

Works on the JSON of ``GET /v1/gpus`` and ``GET /v1/activity``, so the CLI needs no NVML.
GPUs are listed in CUDA's PCI_BUS_ID order, numbered as ``gpus = [...]`` in the config means.
"""

from __future__ import annotations

from typing import Any

from inference_node.gpu.backend import PSTATE_DRIVER_DECIDES
from inference_node.gpu.inventory import pci_sort_key


def activity_cells(entry: dict[str, Any] | None) -> tuple[str, str, str]:
    """(BUSY, TASKS, TOK/S) of one instance; dashes when the agent reports no activity."""
    if entry is None:
        return "-", "-", "-"
    slots = len(entry["active_slots"])
    busy = f"yes ({slots})" if entry["busy"] else "no"
    speed = entry.get("tokens_per_second")
    return busy, str(entry["tasks_started"]), "-" if speed is None else f"{speed:.1f}"


def format_gpu_table(status: dict[str, Any]) -> str:
    """The GPUs and their P-state control as aligned columns, with one line per problem."""
    if status.get("inventory_problem"):
        return f"GPUs: none managed (CPU-only: {status['inventory_problem']})"
    gpus = sorted(status["gpus"], key=lambda g: pci_sort_key(g["pci_bus_id"]))
    header = ("GPU", "PCI", "NAME", "MEMORY MiB", "EST/REP MiB", "UTIL", "TEMP", "POWER",
              "P-STATE", "CONTROL", "LOW", "SWITCHES", "INSTANCES")
    rows = [header]
    for cuda_index, g in enumerate(gpus):
        total = g["seconds_low"] + g["seconds_high"]
        rows.append((
            str(cuda_index), g["pci_bus_id"], g["name"],
            _pair(g["memory_used_mib"], g["memory_total_mib"]),
            f"{_mib(g.get('estimated_mib'))}/{_mib(g.get('reported_mib'))}",
            _unit(g["utilization_pct"], "%"), _unit(g["temperature_c"], "C"),
            "-" if g["power_w"] is None else f"{g['power_w']:.0f}W",
            f"{_pstate(g['pstate_wanted'])} -> {_pstate(_now(g))}",
            g["pstate_control"], "-" if total <= 0 else f"{g['seconds_low'] / total:.0%}",
            str(g["switches"]), _users(g),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if status.get("backend_problem"):
        lines.append(f"P-states are not switched: {status['backend_problem']}")
    for g in gpus:
        if g["pstate_control"] in ("not-working", "unsupported", "no-backend") \
                and g["pstate_reason"] != status.get("backend_problem"):
            lines.append(f"GPU {g['pci_bus_id']}: {g['pstate_control']}: {g['pstate_reason']}")
    return "\n".join(lines)


def _users(gpu: dict[str, Any]) -> str:
    names = list(gpu["instances"]) + (["(other programs)"] if gpu.get("used_by_other_programs")
                                      else [])
    return ",".join(names) or ("empty" if gpu.get("empty") else "-")


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _now(gpu: dict[str, Any]) -> int | None:
    """The freshest reading: the controller's read-back, else the last inventory refresh."""
    read: int | None = gpu["pstate_read_back"]
    return gpu["pstate"] if read is None else read


def _pstate(value: int | None) -> str:
    if value is None:
        return "?"
    return "auto" if value == PSTATE_DRIVER_DECIDES else f"P{value}"


def _pair(used: float | None, total: float | None) -> str:
    if used is None or total is None:
        return "-"
    return f"{used:.0f}/{total:.0f}"


def _unit(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:g}{unit}"

