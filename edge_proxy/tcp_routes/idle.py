"""Idle timeouts of a TCP relay (HAProxy's ``timeout server`` / ``timeout client``), the
same in both relay engines.

A relay ends when nothing moved for a while, and who spoke last says how long: for
``upstream_s`` when the client spoke last (it waits for an answer: a hung or stopped backend),
for ``client_s`` when the backend spoke last or nobody spoke yet (an idle kept-alive
connection). Any byte moved either way, a write to a slow reader included, starts the wait
anew.
"""

from __future__ import annotations

from dataclasses import dataclass

# The relay loop looks for idle relays this many times per (shortest) idle timeout: a relay
# ends at most a tenth late, and 10,000 relays with the default 600 s cost a sweep a minute.
IDLE_CHECKS_PER_TIMEOUT = 10
IDLE_CHECK_MIN_S = 0.01
IDLE_CHECK_MAX_S = 1.0
SIDES = ("client", "upstream")


@dataclass(frozen=True)
class IdleTimeouts:
    """How long a relay may sit idle, by who spoke last."""

    upstream_s: float  # the client spoke last and waits: nothing came from the upstream
    client_s: float  # the upstream spoke last (or nobody did): nothing came from the client

    def limit_s(self, waiting: bool) -> float:
        """The timeout that applies; ``waiting``: the client spoke last."""
        return self.upstream_s if waiting else self.client_s

    @property
    def check_every_s(self) -> float:
        shortest = min(self.upstream_s, self.client_s) / IDLE_CHECKS_PER_TIMEOUT
        return max(IDLE_CHECK_MIN_S, min(IDLE_CHECK_MAX_S, shortest))


def idle_outcome(waiting: bool) -> str:
    """The outcome of a relay ended idle; ``waiting``: the client spoke last, so the
    upstream is the side that was silent."""
    return f"idle {'upstream' if waiting else 'client'}"


def idle_side(outcome: str) -> str | None:
    """``"client"`` or ``"upstream"`` for an outcome that ended an idle relay, else None."""
    side = outcome.removeprefix("idle ")
    return side if side != outcome and side in SIDES else None
