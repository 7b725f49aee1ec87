"""Which requests may wake a sleeping node: pure decisions on the method and path.

A rule is written ``"METHOD /path"`` in config. ``METHOD`` is an HTTP method or ``*``; the
path is matched as a whole against the request path (no query string), where ``*`` matches
any run of characters (``/v1/models*`` also covers ``/v1/models/qwen``). Requests that match
a rule never wake a node: while the node sleeps they are answered from the response cache.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from edge_proxy.errors import RuleError
from shared.config.edge import DEFAULT_NO_WAKE
from shared.config.values import split_rule


@dataclass(frozen=True)
class NoWakeRule:
    """One ``METHOD /path`` pattern."""

    method: str
    path: str
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", _compile(self.path))

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method)) and self._regex.fullmatch(path) is not None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def parse_rule(text: str) -> NoWakeRule:
    """``"GET /v1/models"`` into a rule; raises ``RuleError`` with the fix."""
    try:
        method, path = split_rule(text)
    except ValueError as exc:
        raise RuleError(str(exc)) from None
    return NoWakeRule(method, path)


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


@dataclass(frozen=True)
class WakePolicy:
    """The rules of one listener."""

    no_wake: tuple[NoWakeRule, ...]

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> WakePolicy:
        return cls(tuple(parse_rule(t) for t in texts))

    def may_wake(self, method: str, path: str, preflight_for: str | None = None) -> bool:
        """False when the request matches a no-wake rule. A CORS preflight (``OPTIONS`` with
        ``Access-Control-Request-Method``, given as ``preflight_for``) goes by the method it
        asks about: a browser polling ``/v1/models`` with an API key sends one before each
        poll, and it must not wake the node either."""
        if method == "OPTIONS" and preflight_for:
            method = preflight_for.upper()
        return not any(rule.matches(method, path) for rule in self.no_wake)

    def rule_for(self, method: str, path: str) -> NoWakeRule | None:
        return next((r for r in self.no_wake if r.matches(method, path)), None)


def default_policy() -> WakePolicy:
    """The rules a listener gets when its config names none."""
    return WakePolicy.from_texts(DEFAULT_NO_WAKE)
