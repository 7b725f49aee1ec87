"""Every exception the edge-proxy raises on purpose, in one tree.

* ``LlamanapError`` (from ``shared.errors``): errors a person sees, one line naming the
  thing, the place and the fix.
* Control flow inside a request, grouped by whose fault it is: ``ClientFault`` (the client
  left or sent too much) and ``BackendFault`` (the backend or its wake failed). The routes
  catch them and answer the client (or close the connection); they never reach ``main()``.
* ``LoopStopped``: the relay loop does not take relays (it stopped or failed); the caller
  relays with the trio engine instead.
* A bug: ``IllegalWakeTransition``, the wake state machine was fed an event its table does
  not allow; the message names the node, the state and the event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.errors import LlamanapError

if TYPE_CHECKING:
    from edge_proxy.wake.machine import Event, State


# --- user-facing ------------------------------------------------------------------------------


class ListenError(LlamanapError):
    """A route or the control endpoint could not listen (port in use, address not local)."""


class ControlError(LlamanapError):
    """The running proxy's control endpoint could not be reached or refused a request."""


class RuleError(ValueError):
    """A rule is not ``"METHOD /path"``; the message says what is wrong."""


# --- control flow: the client's side ----------------------------------------------------------


class ClientFault(Exception):
    """The client ended or broke its exchange; nothing more is sent to it."""


class ClientGone(ClientFault):
    """The client went away while its connection was held."""


class ClientLeft(ClientFault):
    """The client went away before its request body was complete (nothing is forwarded)."""


class BodyTooLarge(ClientFault):
    """The client's request body passed the route's limit."""


# --- control flow: the backend's side ---------------------------------------------------------


class BackendFault(Exception):
    """The backend (or waking it) failed; the client gets an error or a closed connection."""


class BackendUnavailable(BackendFault):
    """The backend could not be reached; ``event`` is PROBE_REFUSED or PROBE_TIMEOUT."""

    def __init__(self, event: Event, reason: str) -> None:
        super().__init__(reason)
        self.event = event
        self.reason = reason


class UpstreamError(BackendFault):
    """The backend failed after a connection was open (reset, malformed answer, ...)."""


class UpstreamClosedEarly(UpstreamError):
    """The backend closed (or reset) the connection without a byte of its answer: a
    llama-server that was exiting when the request reached it (an instance on demand that its
    TTL or an eviction stops)."""


class UpstreamTimeout(UpstreamError):
    """The backend sent nothing for the route's ``upstream_idle_timeout_s`` while a request
    waited for it (a hung or stopped llama-server)."""


class WakeFailed(BackendFault):
    """The node did not become ready in time (or was removed); held connections close."""


class AgentError(BackendFault):
    """A node's agent API could not be asked (unreachable, an error, a malformed answer)."""


class LoadFailed(BackendFault):
    """A model on demand did not load; the message names the model, the node and why."""

    def __init__(self, model: str, node: str, reason: str) -> None:
        super().__init__(f"model {model} on node {node} did not load: {reason}")
        self.model = model
        self.node = node
        self.reason = reason


class WolError(BackendFault):
    """A magic packet could not be sent (bad source address, no route, ...)."""


# --- control flow: the relay engine -----------------------------------------------------------


class LoopStopped(Exception):
    """The relay loop is not running (stopped, or failed): relay with the trio engine."""


# --- a bug: the wake state machine refused an event -------------------------------------------


class IllegalWakeTransition(Exception):
    """The driver fed an event the table does not allow in this state (a bug, not a user error)."""

    def __init__(self, node: str, state: State, event: Event) -> None:
        super().__init__(f"node {node}: event {event.value} is not allowed in state {state.name}")
        self.state = state
        self.event = event
