"""llama-server's own numbers, taken from a response as its body passes through.

llama-server puts a ``timings`` object (and ``usage``, when asked) at the end of a JSON body
and in the last SSE event of a stream. ``TimingsParser`` is fed the body in whatever chunks
the network delivers and keeps only what it needs: for SSE, the current line (bounded; an
over-long line is skipped) and the last numbers seen; for JSON, the last ``TAIL_BYTES``.
It never holds a whole body, never raises, and is pure (no I/O).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

# The end of a JSON body kept for the numbers: llama-server writes ``usage``, ``id`` and
# ``timings`` last (under 1 KiB); /completion adds short fields after a long ``prompt``.
TAIL_BYTES: Final = 16 * 1024
# An SSE line longer than this is a content chunk, not the final one with the numbers.
MAX_LINE_BYTES: Final = 64 * 1024
_TIMINGS_KEY: Final = b'"timings":'
_USAGE_KEY: Final = b'"usage":'
_DECODER: Final = json.JSONDecoder()


@dataclass(frozen=True)
class LlamaNumbers:
    """What llama-server reported for one request; a field it did not send is None."""

    prompt_n: int | None = None
    prompt_ms: float | None = None
    prompt_per_second: float | None = None
    predicted_n: int | None = None
    predicted_ms: float | None = None
    predicted_per_second: float | None = None
    cache_n: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def prompt_total(self) -> int | None:
        """Prompt tokens including those served from the cache."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        if self.prompt_n is None:
            return None
        return self.prompt_n + (self.cache_n or 0)

    @property
    def predicted_total(self) -> int | None:
        """Generated tokens."""
        return self.completion_tokens if self.completion_tokens is not None else self.predicted_n


class TimingsParser:
    """Feed it body chunks with ``feed``; ``numbers()`` says what was found so far.

    ``content_type`` (the response's header) picks SSE or JSON; without it the first
    bytes decide (``data:`` or ``:`` start an event stream).
    """

    def __init__(self, content_type: str | None = None) -> None:
        self._sse: bool | None = None
        if content_type is not None:
            self._sse = "text/event-stream" in content_type.lower()
        self._buf = bytearray()
        self._skipping = False  # inside an over-long SSE line
        self._timings: dict[str, Any] | None = None
        self._usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> None:
        """Take the next piece of the body."""
        if not chunk:
            return
        if self._sse is None:
            head = bytes(self._buf + chunk).lstrip()
            if not head:
                self._buf += chunk
                return
            self._sse = head.startswith((b"data:", b":", b"event:"))
        if self._sse:
            self._feed_sse(chunk)
        else:
            self._buf += chunk
            if len(self._buf) > TAIL_BYTES:
                del self._buf[:-TAIL_BYTES]

    @property
    def held_bytes(self) -> int:
        """Bytes of the body kept right now (bounded by TAIL_BYTES or MAX_LINE_BYTES)."""
        return len(self._buf)

    def numbers(self) -> LlamaNumbers | None:
        """The numbers found, or None if the body had none (yet). Call after the last chunk
        for JSON bodies; for streams, at any time."""
        if self._sse is False:
            self._scan_tail()
        elif self._sse and self._buf and not self._skipping:
            self._sse_line(bytes(self._buf))  # a last line without its newline
        if self._timings is None and self._usage is None:
            return None
        t, u = self._timings or {}, self._usage or {}
        return LlamaNumbers(
            prompt_n=_int(t.get("prompt_n")), prompt_ms=_float(t.get("prompt_ms")),
            prompt_per_second=_float(t.get("prompt_per_second")),
            predicted_n=_int(t.get("predicted_n")), predicted_ms=_float(t.get("predicted_ms")),
            predicted_per_second=_float(t.get("predicted_per_second")),
            cache_n=_int(t.get("cache_n")), prompt_tokens=_int(u.get("prompt_tokens")),
            completion_tokens=_int(u.get("completion_tokens")),
        )

    def _feed_sse(self, chunk: bytes) -> None:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                break
            if self._buf and not self._skipping:
                self._buf += chunk[start:end]
                self._sse_line(bytes(self._buf))
            elif not self._skipping and _has_numbers(chunk, start, end):
                self._sse_line(chunk[start:end])  # a whole line in this chunk: no copy first
            self._buf.clear()
            self._skipping = False
            start = end + 1
        if not self._skipping:
            self._buf += chunk[start:]
            if len(self._buf) > MAX_LINE_BYTES:
                self._buf.clear()
                self._skipping = True

    def _sse_line(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if not line.startswith(b"data:") or (_TIMINGS_KEY not in line and _USAGE_KEY not in line):
            return
        try:
            event = json.loads(line[len(b"data:"):])
        except ValueError:
            return
        if isinstance(event, dict):
            self._take(event.get("timings"), event.get("usage"))

    def _scan_tail(self) -> None:
        tail = bytes(self._buf)
        self._take(_object_after(tail, _TIMINGS_KEY), _object_after(tail, _USAGE_KEY))

    def _take(self, timings: Any, usage: Any) -> None:
        if isinstance(timings, dict):
            self._timings = timings
        if isinstance(usage, dict):
            self._usage = usage


def _has_numbers(chunk: bytes, start: int, end: int) -> bool:
    # most lines are content deltas: look without copying them
    return chunk.find(_TIMINGS_KEY, start, end) >= 0 or chunk.find(_USAGE_KEY, start, end) >= 0


def _object_after(tail: bytes, key: bytes) -> Any:
    """The JSON value after the last ``key`` in ``tail``. Inside a JSON string a quote is
    escaped, so the unescaped ``"key":`` is only ever a key."""
    at = tail.rfind(key)
    if at < 0:
        return None
    try:
        text = tail[at + len(key):].decode("utf-8", "replace").lstrip()
        value, _ = _DECODER.raw_decode(text)
    except ValueError:
        return None
    return value


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
