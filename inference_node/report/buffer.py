"""The agent's records not yet stored by the proxy: numbered, bounded, oldest dropped first.

Pure (no I/O, no clock): the service adds records as they happen, takes the oldest as a
batch, and forgets them once the proxy says it stored them. A record keeps its sequence
number across any number of retries, so the proxy can tell a resend from a new record.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from shared.reports import Report


class ReportBuffer:
    """A ring of at most ``capacity`` records in ``seq`` order; ``seq`` counts from 1."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._records: deque[Report] = deque()
        self._next_seq = 1
        self.dropped = 0  # records pushed out unsent because the ring was full
        self.stored = 0  # records the proxy acknowledged
        # A batch on its way: records pushed out of it meanwhile are lost only if its answer
        # does not cover them (they may well be stored already).
        self._sending_through = 0
        self._pushed_out_in_flight: list[int] = []

    def __repr__(self) -> str:
        return (f"<ReportBuffer {len(self._records)}/{self.capacity} next={self._next_seq} "
                f"dropped={self.dropped}>")

    def __len__(self) -> int:
        return len(self._records)

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest record ever added (0: none yet)."""
        return self._next_seq - 1

    def add(self, record: Report) -> Report:
        """Number ``record`` (its own ``seq`` is ignored) and keep it; a full ring drops its
        oldest record first. Returns the numbered record."""
        numbered = dataclasses.replace(record, seq=self._next_seq)
        self._next_seq += 1
        if len(self._records) >= self.capacity:
            oldest = self._records.popleft()
            if oldest.seq <= self._sending_through:
                self._pushed_out_in_flight.append(oldest.seq)
            else:
                self.dropped += 1
        self._records.append(numbered)
        return numbered

    def oldest(self, limit: int) -> tuple[Report, ...]:
        """Up to ``limit`` of the oldest records, in order (they stay until ``stored``)."""
        return tuple(self._records[i] for i in range(min(limit, len(self._records))))

    def sending(self, records: tuple[Report, ...]) -> None:
        """``records`` (from ``oldest``) are on their way; ``stored_through`` or
        ``send_failed`` says how it ended."""
        self._sending_through = records[-1].seq if records else 0

    def send_failed(self) -> None:
        """No answer: records pushed out of the batch on its way count as dropped."""
        self.dropped += len(self._pushed_out_in_flight)
        self._settle()

    def stored_through(self, seq: int) -> int:
        """Forget every record up to ``seq`` (the proxy stored them); how many went."""
        gone = 0
        while self._records and self._records[0].seq <= seq:
            self._records.popleft()
            gone += 1
        covered = sum(1 for s in self._pushed_out_in_flight if s <= seq)
        self.dropped += len(self._pushed_out_in_flight) - covered
        self.stored += gone + covered
        self._settle()
        return gone

    def _settle(self) -> None:
        self._pushed_out_in_flight.clear()
        self._sending_through = 0
