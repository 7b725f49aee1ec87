"""The placement component of the agent: plans ``gpus = "auto"`` instances as they start.

``PlacementService(inventory, margin_mib)`` offers an ``AutoPlacer`` (``placer``, which the
agent's root makes the supervisor's launch planner), a line sink (``feed``) and a state listener
(``on_state``), and ``GET /v1/placement``: what was decided per instance (GPUs, layers, MiB per
GPU, flags; or the refusal), beside what each running llama-server reported it allocated (its
``model/KV/compute buffer size`` lines, printed with ``-lv 4``): on real GPUs this is the check
of the estimate. A config reload updates the safety margin for the next start. It has no loop
of its own: decisions happen when the supervisor starts an instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from inference_node.gpu.inventory import GpuInventory
from inference_node.placement.autoplace import AutoPlacer
from inference_node.placement.measured import BUFFER_LINE, MeasuredMemory, parse_memory
from inference_node.supervisor.state import State
from shared.http import Response

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from shared.config.node import NodeAgentConfig
    from shared.http import App, Request


class PlacementService:
    """Component: VRAM placement for instances with ``gpus = "auto"``."""

    def __init__(self, inventory: GpuInventory, margin_mib: int) -> None:
        self.placer = AutoPlacer(inventory, margin_mib)
        # buffer-size lines of each instance's current run, for "measured"
        self._buffer_lines: dict[str, list[str]] = {}

    def feed(self, name: str, line: str, t: float) -> None:
        """Line sink: keep the buffer-size lines of each instance's current run."""
        if BUFFER_LINE.search(line):
            self._buffer_lines.setdefault(name, []).append(line)

    def on_state(self, name: str, old: State, new: State, why: str) -> None:
        """State listener: a new run reports its buffers afresh."""
        if new is State.STARTING:
            self._buffer_lines.pop(name, None)  # a new run reports afresh

    def reported(self) -> dict[str, MeasuredMemory]:
        """Per instance, the buffers its current (or last) llama-server run reported."""
        return {name: parse_memory(lines) for name, lines in self._buffer_lines.items()}

    def status(self) -> dict[str, object]:
        """Per instance: the decision and the MiB its llama-server reported per device."""
        out: dict[str, object] = {}
        for name in sorted(set(self.placer.decisions) | set(self._buffer_lines)):
            measured = parse_memory(self._buffer_lines.get(name, []))
            out[name] = {
                "decision": self.placer.decisions.get(name),
                "measured_mib": {dev: {"model": round(m.model, 2), "kv": round(m.kv, 2),
                                       "compute": round(m.compute, 2),
                                       "total": round(m.total, 2)}
                                 for dev, m in measured.devices.items()},
            }
        return out

    def on_reload(self, config: NodeAgentConfig) -> None:
        # the next start uses the new margin; running instances keep their place
        self.placer.margin_mib = config.placement.safety_margin_mib

    def __repr__(self) -> str:
        return f"<PlacementService {self.placer!r}>"

    def routes(self, app: App) -> None:
        """``GET /v1/placement``."""

        @app.route("GET", "/v1/placement")
        async def placement(req: Request) -> Response:
            return Response.json({"instances": self.status()})

    def collectors(self) -> list[Collector]:
        return []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()
