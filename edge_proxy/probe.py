"""Connecting to a backend and checking that it is ready, in the three outcomes the wake
state machine understands: ready, refused (the host is up, the service is not) and timeout
(no answer: a sleeping host does not answer ARP, so connect hangs until our timeout).
"""

from __future__ import annotations

import errno

import trio

from edge_proxy.errors import BackendUnavailable
from edge_proxy.wake.machine import Event
from shared.net import open_tcp

HTTP_ANSWER_TIMEOUT_S = 5.0  # a loading llama-server answers 503 at once; a silent one is not ready
MAX_STATUS_LINE_BYTES = 4096
# Errors that mean "nobody answered" rather than "somebody said no".
_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, errno.EHOSTDOWN}


async def connect(host: str, port: int, timeout_s: float) -> trio.SocketStream:
    """Open a TCP connection to the backend or raise ``BackendUnavailable``."""
    try:
        with trio.fail_after(timeout_s):
            stream = await open_tcp(host, port)
    except trio.TooSlowError:
        raise BackendUnavailable(
            Event.PROBE_TIMEOUT, f"connect to {host}:{port} timed out after {timeout_s:g} s"
        ) from None
    except OSError as exc:
        root = _root_errno(exc)
        event = Event.PROBE_TIMEOUT if root in _UNREACHABLE else Event.PROBE_REFUSED
        raise BackendUnavailable(event, f"connect to {host}:{port}: {_describe(exc)}") from exc
    return stream


async def check_ready(host: str, port: int, http_path: str | None, timeout_s: float) -> str:
    """Return a reason when the backend is ready, else raise ``BackendUnavailable``.

    ``http_path`` None: ready when it accepts. Otherwise ready when ``GET http_path`` answers
    200 (llama-server answers 503 while its model loads: that is REFUSED, not ready).
    """
    stream = await connect(host, port, timeout_s)
    async with stream:
        if http_path is None:
            return f"{host}:{port} accepts connections"
        status = await _http_status(stream, host, port, http_path)
    if status != 200:
        raise BackendUnavailable(Event.PROBE_REFUSED, f"GET {http_path} answered {status}")
    return f"GET {http_path} answered 200"


async def _http_status(stream: trio.SocketStream, host: str, port: int, path: str) -> int:
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: llamanap-edge-proxy\r\n"
               "Connection: close\r\n\r\n").encode()
    data = b""
    try:
        with trio.fail_after(HTTP_ANSWER_TIMEOUT_S):
            await stream.send_all(request)
            while b"\r\n" not in data and len(data) < MAX_STATUS_LINE_BYTES:
                chunk = await stream.receive_some(MAX_STATUS_LINE_BYTES)
                if not chunk:
                    break
                data += chunk
    except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
        raise BackendUnavailable(Event.PROBE_REFUSED, f"GET {path}: no answer ({exc!r})") from exc
    parts = data.split(b"\r\n", 1)[0].split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise BackendUnavailable(Event.PROBE_REFUSED, f"GET {path}: not an HTTP answer")
    return int(parts[1])


def _root_errno(exc: BaseException) -> int | None:
    """open_tcp_stream wraps per-address failures in one OSError; find the first real errno."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    for inner in (exc.__cause__, exc.__context__, *getattr(exc, "exceptions", ())):
        if inner is not None:
            found = _root_errno(inner)
            if found is not None:
                return found
    return None


def _describe(exc: OSError) -> str:
    root = _root_errno(exc)
    return errno.errorcode.get(root, str(exc)) if root is not None else str(exc)
