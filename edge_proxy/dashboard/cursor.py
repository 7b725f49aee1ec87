"""Where the page's last answer ended: per history table, the highest row id it held.

The page sends it back (``cursor=...``) and gets only the rows written since, so a poll
every few seconds costs what is new, not the whole window. Row ids, not times, mark the
place: the agent's reports arrive late (batched, or after a sleep) with times in the past,
and a time cursor would skip them. Pure: text in, ids out, and back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from edge_proxy.history.records import TABLES

KNOWN_TABLES: Final = frozenset(table for table, _ in TABLES.values())
_PART: Final = re.compile(r"^([a-z_]+):(\d{1,18})$")


class CursorError(ValueError):
    """A cursor the page could not have sent (the caller's fault)."""


@dataclass(frozen=True)
class Cursor:
    """Per table name, the highest row id already sent (a table missing: none sent)."""

    ids: Mapping[str, int] = field(default_factory=dict)

    def after(self, table: str) -> int:
        """The id rows of ``table`` must be above to be new."""
        return self.ids.get(table, 0)

    def encode(self) -> str:
        """``table:id`` pairs, comma-separated, in table order (stable for tests)."""
        return ",".join(f"{t}:{i}" for t, i in sorted(self.ids.items()))

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Parse what ``encode`` wrote; anything else raises ``CursorError``."""
        ids: dict[str, int] = {}
        for part in filter(None, text.split(",")):
            m = _PART.match(part)
            if m is None or m.group(1) not in KNOWN_TABLES:
                raise CursorError(f"cursor part {part[:60]!r}; expected table:id with a table "
                                  f"of {', '.join(sorted(KNOWN_TABLES))}")
            ids[m.group(1)] = int(m.group(2))
        return cls(ids)
