"""Every exception the node-agent raises on purpose, in one tree.

Three branches:

* ``LlamanapError`` (from ``shared.errors``): errors a person sees, one line that names the
  thing, the place and the fix. ``main()`` prints them without a traceback.
* Hardware-boundary errors (``NvmlUnavailable``, ``NvapiCallError``): raised where the
  ``gpu`` package calls NVML/NVAPI and translated there into the user-facing ones
  (``raise PstateError(...) from exc``); they do not leave the ``gpu`` package.
* Bugs (``RuntimeError``): a state machine was fed a move its table does not allow; the
  message names the machine, the state and the event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.errors import LlamanapError

if TYPE_CHECKING:
    from inference_node.gpu.control_state import PstateEvent, PstateHealth
    from inference_node.power.policy import PowerEvent, PowerState
    from inference_node.supervisor.state import State


# --- user-facing ------------------------------------------------------------------------------


class LaunchError(LlamanapError):
    """An instance cannot be started as configured; the message names the instance."""


class StateFileError(LlamanapError):
    """The state file cannot be written."""


class PlacementError(LlamanapError):
    """Placement cannot go on (bad input, impossible request)."""


class UnknownModel(LlamanapError):
    """No instance serves this model name (the message lists the names that exist)."""


class LoadRefused(LlamanapError):
    """The on-demand scheduler will not load (or unload) it: no room, disabled, suspending."""


class LoadFailed(LlamanapError):
    """An on-demand instance was started and did not become READY."""


class ModelFileError(PlacementError):
    """A model file is missing, not GGUF, damaged, or of a shape the estimate cannot read."""


class PstateError(LlamanapError):
    """A P-state switch failed; ``str()`` names the GPU, the call and the code."""


class PstateBackendUnavailable(LlamanapError):
    """The backend cannot switch any GPU (library missing, init failed); ``str()`` says why."""


class SuspendFailed(LlamanapError):
    """The suspend command failed or the machine did not go to sleep."""


class ProxyUnreachable(LlamanapError):
    """The proxy did not answer, or answered something that is not an event reply."""


class AgentUnreachable(LlamanapError):
    """No node-agent answered at the address."""


class AgentRefused(LlamanapError):
    """The agent answered with an error (its message is the text)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- hardware boundary (translated inside inference_node.gpu) ---------------------------------


class NvmlUnavailable(Exception):
    """NVML cannot be used on this machine; ``str()`` says why, in one line."""


class NvapiCallError(Exception):
    def __init__(self, call: str, code: int, message: str) -> None:
        super().__init__(f"{call} returned {code} ({message})")
        self.code = code


# --- bugs: a state machine refused a move -----------------------------------------------------


class IllegalInstanceTransition(RuntimeError):
    """A bug: the lifecycle code tried a move the instance table does not allow."""

    def __init__(self, state: State, target: State) -> None:
        super().__init__(f"instance state {state.name} cannot move to {target.name}")
        self.state = state
        self.target = target


class IllegalPowerTransition(RuntimeError):
    def __init__(self, state: PowerState, event: PowerEvent) -> None:
        super().__init__(f"power: event {event.name} is not allowed in state {state.name}")


class IllegalPstateTransition(RuntimeError):
    """A bug: the P-state controller fed a GPU's control health an event its table lacks."""

    def __init__(self, pci_bus_id: str, state: PstateHealth, event: PstateEvent) -> None:
        super().__init__(f"GPU {pci_bus_id} P-state control: event {event.value} is not "
                         f"allowed in state {state.name}")
        self.state = state
        self.event = event
