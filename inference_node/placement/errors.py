"""Errors of the placement code; each renders as one line that names the thing and the fix."""

from __future__ import annotations

from shared.errors import LlamanapError


class PlacementError(LlamanapError):
    """Placement cannot go on (bad input, impossible request)."""


class ModelFileError(PlacementError):
    """A model file is missing, not GGUF, damaged, or of a shape the estimate cannot read."""
