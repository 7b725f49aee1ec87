"""The last good response per node and path, for polls that must not wake a sleeping node.

While a node is awake, every ``200`` answer to a no-wake request (``GET /v1/models``,
``GET /health`` …) is remembered per ``(node, method, path?query)``. While it sleeps, the same
request is answered from here with its age in the ``Age`` header (RFC 9111) and the node in
``X-Llamanap-Cached-From``. Pure: the caller passes ``now`` (seconds, monotonic).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from edge_proxy.http_routes.headers import RawHeaders

# Poll answers are small (a model list, a health line); a larger body is not worth holding.
MAX_CACHED_BODY_BYTES: Final = 1 << 20
# Glob rules (``/v1/models*``) could make a key per distinct path; keep the newest this many.
MAX_ENTRIES_PER_NODE: Final = 256
CACHED_FROM_HEADER: Final = b"x-llamanap-cached-from"
# Stored headers that describe one transfer rather than the content.
_NOT_STORED: Final = frozenset({b"content-length", b"age", b"date", b"server"})


@dataclass(frozen=True)
class CachedResponse:
    status: int
    headers: RawHeaders
    body: bytes
    stored_at: float

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.stored_at)

    def replay_headers(self, node: str, now: float) -> RawHeaders:
        """Headers to answer with: the stored ones plus age and origin (not the length)."""
        return [
            *self.headers,
            (b"age", str(int(self.age_s(now))).encode()),
            (CACHED_FROM_HEADER, node.encode()),
        ]


def cache_key(method: str, path: str, query: bytes) -> str:
    return f"{method} {path}?{query.decode('latin-1')}" if query else f"{method} {path}"


def cacheable(status: int, size: int) -> bool:
    """Whether a response this big with this status is worth remembering."""
    return status == 200 and size <= MAX_CACHED_BODY_BYTES


class ResponseCache:
    """Per node, the newest good answer for each key."""

    def __init__(self) -> None:
        self._entries: dict[str, OrderedDict[str, CachedResponse]] = {}

    def __repr__(self) -> str:
        sizes = {node: len(entries) for node, entries in self._entries.items()}
        return f"<ResponseCache {sizes}>"

    def store(self, node: str, key: str, status: int, headers: RawHeaders, body: bytes,
              now: float) -> bool:
        """Remember a response; returns False (and keeps the old one) if it is not cacheable."""
        if not cacheable(status, len(body)):
            return False
        entries = self._entries.setdefault(node, OrderedDict())
        kept = [(n, v) for n, v in headers if n not in _NOT_STORED]
        entries[key] = CachedResponse(status, kept, body, now)
        entries.move_to_end(key)
        while len(entries) > MAX_ENTRIES_PER_NODE:
            entries.popitem(last=False)
        return True

    def lookup(self, node: str, key: str) -> CachedResponse | None:
        entries = self._entries.get(node)
        return None if entries is None else entries.get(key)
