"""The P-state controller's record of one GPU, the table of how its control health moves, and
the requests other tasks send the control loop (the only caller of the P-state backend).

``PstateHealth`` says whether switching works on a GPU; ``PstateEvent`` is what the
controller observed (the backend's answer when opened, a switch's result, a read-back);
``TRANSITIONS`` lists every allowed ``(state, event) -> state`` and ``GpuControl.handle``
is the one method that applies it: a move the table lacks raises ``IllegalPstateTransition``
naming the GPU, the state and the event (a bug in the controller, not a hardware fault).
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass, field
from typing import Final

import trio

from inference_node.errors import IllegalPstateTransition
from inference_node.gpu.inventory import GpuInfo
from inference_node.gpu.policy import GpuActivity

log = logging.getLogger(__name__)


class PstateHealth(enum.Enum):
    UNKNOWN = "unknown"  # nothing forced and read back yet
    OK = "ok"  # the last forced state read back as set
    NOT_WORKING = "not-working"  # the switch failed, or NVML shows another state
    UNSUPPORTED = "unsupported"  # one P-state only: nothing to switch
    NO_BACKEND = "no-backend"  # NVAPI missing or cannot reach this GPU


class PstateEvent(enum.Enum):
    ONE_PSTATE = "one-pstate"  # inventory: a single memory clock, nothing to switch
    NO_BACKEND = "no-backend"  # the backend cannot reach this GPU (or is missing)
    SWITCH_FAILED = "switch-failed"  # the backend refused a switch
    READ_BACK_MATCHED = "read-back-matched"  # NVML shows the state that was forced
    READ_BACK_DIFFERS = "read-back-differs"  # NVML still shows another state at the deadline
    READ_BACK_UNAVAILABLE = "read-back-unavailable"  # NVML cannot read this GPU's P-state


# Where switching is tried at all: the two other states are final for the agent's run.
CONTROLLABLE: Final = frozenset({PstateHealth.UNKNOWN, PstateHealth.OK, PstateHealth.NOT_WORKING})

_WHILE_CONTROLLED: Final = {
    PstateEvent.SWITCH_FAILED: PstateHealth.NOT_WORKING,
    PstateEvent.READ_BACK_MATCHED: PstateHealth.OK,
    PstateEvent.READ_BACK_DIFFERS: PstateHealth.NOT_WORKING,
    PstateEvent.READ_BACK_UNAVAILABLE: PstateHealth.UNKNOWN,
}
TRANSITIONS: Final[dict[PstateHealth, dict[PstateEvent, PstateHealth]]] = {
    # The backend is opened once, before any switch: only then can a GPU leave control.
    PstateHealth.UNKNOWN: {PstateEvent.ONE_PSTATE: PstateHealth.UNSUPPORTED,
                           PstateEvent.NO_BACKEND: PstateHealth.NO_BACKEND,
                           **_WHILE_CONTROLLED},
    PstateHealth.OK: dict(_WHILE_CONTROLLED),
    PstateHealth.NOT_WORKING: dict(_WHILE_CONTROLLED),
    PstateHealth.UNSUPPORTED: {},
    PstateHealth.NO_BACKEND: {},
}


@dataclass
class GpuControl:
    """The controller's record of one GPU: wanted, applied and read-back states, health."""

    gpu: GpuInfo
    health: PstateHealth = PstateHealth.UNKNOWN
    reason: str = ""
    wanted: int | None = None
    applied: int | None = None
    read_back: int | None = None
    activity: GpuActivity | None = None
    switches: int = 0
    failures: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"low": 0.0, "high": 0.0})
    retry_at: float = -math.inf
    verify_target: int | None = None
    verify_due: float = math.inf
    verify_deadline: float = math.inf

    def handle(self, event: PstateEvent, reason: str) -> None:
        """Apply ``event`` by the table; logs ``old -> new (reason)`` when anything changed."""
        new = TRANSITIONS[self.health].get(event)
        if new is None:
            raise IllegalPstateTransition(self.gpu.pci_bus_id, self.health, event)
        if new is self.health and reason == self.reason:
            return
        level = logging.WARNING if new is PstateHealth.NOT_WORKING else logging.INFO
        log.log(level, "GPU %s P-state control: %s -> %s (%s)", self.gpu.pci_bus_id,
                self.health.value, new.value, reason)
        self.health, self.reason = new, reason

    @property
    def controllable(self) -> bool:
        return self.health in CONTROLLABLE

    def __repr__(self) -> str:
        return (f"<GpuControl {self.gpu.pci_bus_id} {self.health.value} wanted={self.wanted} "
                f"applied={self.applied} read={self.read_back} switches={self.switches}>")


class Ask(enum.Enum):
    RELEASE = "release"  # give every GPU back to the driver and force nothing until RESUME
    RESUME = "resume"


@dataclass
class LoopRequest:
    """A request to the control loop; ``done`` is set once the loop has carried it out."""

    ask: Ask
    reason: str
    done: trio.Event = field(default_factory=trio.Event)
