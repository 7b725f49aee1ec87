"""Following a chunked HTTP/1.1 body as its raw bytes pass, without re-framing it.

A streamed answer is passed to the client exactly as the backend framed it (chunk sizes,
extensions and trailers included), so the proxy writes each read once and never builds a
chunk of its own. ``ChunkedScanner`` reads the framing beside the bytes: where the body ends
(the zero-size chunk and its trailer section) and what the payload is, for the request's
history row and the model metrics (``history.timings``). Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

# A chunk-size line (hex size, optional extensions) or a trailer line longer than this is
# not HTTP a llama-server writes: the answer is treated as broken.
MAX_LINE_BYTES: Final = 4096

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class FramingError(ValueError):
    """The backend's chunked framing is broken (the remote's fault)."""


class ChunkedScanner:
    """Feed it the body's raw bytes in any pieces; ``feed`` says where the body ends.
    ``payload`` gets each piece of chunk data (not the framing) as it is found."""

    def __init__(self, payload: Callable[[bytes], None] | None = None) -> None:
        self._payload = payload
        self._state = _SIZE
        self._left = 0  # payload bytes still to come in the current chunk
        self._line = b""  # a size or trailer line cut by a read
        self.size = 0  # payload bytes seen

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> int | None:
        """None while the body goes on after ``data``; else how many bytes of ``data`` it
        took to reach its end (anything after that is not this body's). Raises
        ``FramingError``."""
        pos, n = 0, len(data)
        while pos < n:
            state = self._state
            if state == _DATA:
                take = min(self._left, n - pos)
                if self._payload is not None:
                    self._payload(data[pos:pos + take])
                self._left -= take
                self.size += take
                pos += take
                if not self._left:
                    self._state = _DATA_END
            elif state == _DATA_END:
                # the CRLF after a chunk's data, possibly split across reads
                need = 2 - len(self._line)
                got = data[pos:pos + need]
                self._line += got
                pos += len(got)
                if len(self._line) == 2:
                    if self._line != b"\r\n":
                        raise FramingError("chunk data not followed by CRLF")
                    self._line = b""
                    self._state = _SIZE
            else:
                end = data.find(b"\n", pos)
                if end < 0:
                    self._keep_partial(data[pos:])
                    return None
                line = (self._line + data[pos:end]).rstrip(b"\r") if self._line else \
                    data[pos:end].rstrip(b"\r")
                self._line = b""
                pos = end + 1
                if state == _SIZE:
                    self._size_line(line)
                elif not line:  # the empty line that ends the trailer section
                    self._state = _DONE
                    return pos
        return None

    def _keep_partial(self, rest: bytes) -> None:
        self._line += rest
        if len(self._line) > MAX_LINE_BYTES:
            raise FramingError(f"a chunk-size or trailer line over {MAX_LINE_BYTES} bytes")

    def _size_line(self, line: bytes) -> None:
        digits = line.split(b";", 1)[0].strip()
        if not digits or len(digits) > 16 or digits.strip(b"0123456789abcdefABCDEF"):
            raise FramingError(f"bad chunk size {line[:40]!r}")
        self._left = int(digits, 16)
        self._state = _DATA if self._left else _TRAILER

