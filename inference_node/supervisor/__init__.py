"""Instance supervision: spawn, health-check, respawn, stop and reload llama-server processes.

Public names: ``Supervisor`` (the service), ``State``, ``InstanceStatus``, ``ReloadPlan``,
``LaunchOverrides`` / ``build_launch`` / ``preflight`` (what a child runs), ``LogLine``.
"""

from inference_node.supervisor.launch import LaunchOverrides, LaunchSpec, build_launch, preflight
from inference_node.supervisor.output import LineSink, LogLine
from inference_node.supervisor.state import State
from inference_node.supervisor.supervisor import InstanceStatus, ReloadPlan, Supervisor, plan_reload

__all__ = [
    "InstanceStatus", "LaunchOverrides", "LaunchSpec", "LineSink", "LogLine",
    "ReloadPlan", "State", "Supervisor", "build_launch", "plan_reload", "preflight",
]
