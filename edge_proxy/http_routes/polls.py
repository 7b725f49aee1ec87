"""No-wake polls: when one goes to an awake node, and what answers it otherwise. Pure.

Frontends poll ``GET /v1/models`` (and ``/health``, ``/api/tags`` …) on every page load or on
a timer. None of that is use, so none of it should reach the node more than needed: while a
node is awake, one poll per node and path goes through each ``poll_refresh_s`` (its answer
refreshes the cache), and the others are answered from the cache as if the node slept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

# The proxy's own model-list answers (from what it knows, not a cached answer) say so here:
# "agent", "answer", "config", joined by commas, besides X-Llamanap-Cached-From.
MODELS_SOURCE_HEADER: Final = b"x-llamanap-models-source"


@dataclass
class PollGate:
    """Per node and cache key, when a poll last went through to the node."""

    _last: dict[tuple[str, str], float] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<PollGate {len(self._last)} keys>"

    def claim(self, node: str, key: str, now: float, refresh_s: float, *, cached: bool) -> bool:
        """Whether this poll goes to the (awake) node; True claims the slot until
        ``now + refresh_s``. Without a cached answer every poll goes through."""
        last = self._last.get((node, key))
        if cached and last is not None and now - last < refresh_s:
            return False
        self._last[node, key] = now
        return True

    def forget(self, node: str) -> None:
        """The node left the listener."""
        for key in [k for k in self._last if k[0] == node]:
            del self._last[key]


def sources(from_agent: bool, from_answer: bool, from_config: bool) -> bytes:
    """The value of ``MODELS_SOURCE_HEADER``."""
    names = [n for n, used in (("agent", from_agent), ("answer", from_answer),
                               ("config", from_config)) if used]
    return ",".join(names).encode()
