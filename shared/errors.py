"""The one vocabulary of errors that llamanap shows to people.

Every error a user can cause renders as one line that names the thing, the place and the fix.
Third-party exceptions are translated at the boundary (``raise ConfigError(...) from exc``).
"""

from __future__ import annotations

from pathlib import Path


class LlamanapError(Exception):
    """Base of every error llamanap raises on purpose; ``str()`` is the one line to show."""


class ConfigError(LlamanapError):
    """A config file is unreadable or does not fit the schema.

    Renders as ``FILE: dotted.key: found X; expected Y`` so the user can jump to the spot.
    """

    def __init__(self, source: Path | str, key: str, problem: str) -> None:
        self.source = str(source)
        self.key = key
        self.problem = problem
        where = f"{self.source}: {key}: " if key else f"{self.source}: "
        super().__init__(where + problem)


class BinaryNotFound(LlamanapError):
    """A program llamanap needs (llama-server and friends) could not be found."""
