"""The placement component of the agent: plans ``gpus = "auto"`` instances as they start.

``PlacementService(agent)`` installs an ``AutoPlacer`` as the supervisor's launch planner
and adds ``GET /v1/placement`` (what was decided per instance: GPUs, layers, MiB per
GPU, flags; or the refusal). A config reload updates the safety margin for the next start. It has no loop of its own: decisions happen when the
supervisor starts an instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from inference_node.gpu.inventory import GpuInventory, open_inventory
from inference_node.placement.autoplace import AutoPlacer

if TYPE_CHECKING:
    from inference_node.agent import Agent
    from shared.config.node import NodeAgentConfig
    from shared.http import App, Request, Response


class PlacementService:
    """Component: VRAM placement for instances with ``gpus = "auto"``."""

    def __init__(self, agent: Agent, inventory: GpuInventory | None = None) -> None:
        self.placer = AutoPlacer(inventory if inventory is not None else open_inventory(),
                                 agent.config.placement.safety_margin_mib)
        agent.supervisor.launch_planner = self.placer
        agent.route_registrars.append(self.routes)
        agent.reload_listeners.append(self._reloaded)

    def _reloaded(self, config: NodeAgentConfig) -> None:
        # the next start uses the new margin; running instances keep their place
        self.placer.margin_mib = config.placement.safety_margin_mib

    def __repr__(self) -> str:
        return f"<PlacementService {self.placer!r}>"

    def routes(self, app: App, agent: Agent) -> None:
        """Route registrar: ``GET /v1/placement``."""
        from shared.http import Response

        @app.route("GET", "/v1/placement")
        async def placement(req: Request) -> Response:
            return Response.json({"instances": self.placer.decisions})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()
