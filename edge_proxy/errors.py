"""Errors the edge-proxy shows to people: one line naming the thing, the place and the fix."""

from __future__ import annotations

from shared.errors import LlamanapError


class ListenError(LlamanapError):
    """A route or the control endpoint could not listen (port in use, address not local)."""


class ControlError(LlamanapError):
    """The running proxy's control endpoint could not be reached or refused a request."""
