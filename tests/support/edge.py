"""Real parts for edge-proxy tests: TOML configs, loopback backends, a magic-packet listener.

Magic packets go only to a UDP listener on 127.0.0.1 (``wol.broadcast = "127.0.0.1"``).
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from shared.config.edge import EdgeConfig, load_edge_config
from tests.support.ports import LOOPBACK, free_port

MAC = "aa:bb:cc:dd:ee:01"
# Generous bounds for a loaded 2-core machine: they only stop a hung test, never time one.
TEST_TIMEOUT_S = 30.0
LINE_LIMIT = 1 << 16

Handler = Callable[[trio.SocketStream], Awaitable[None]]


NODE_DEFAULTS: dict[str, object] = {
    "wol_interval_s": 0.2, "wake_timeout_s": 20, "probe_interval_s": 0.05, "probe_timeout_s": 0.5,
}


def write_config(tmp_path: Path, backend_port: int, wol_port: int, *,
                 node: Mapping[str, object] | None = None, extra: str = "", routes: int = 1,
                 ready: str = "tcp", name: str = "edge.toml") -> Path:
    """A real edge-proxy TOML file: one node on loopback, ``routes`` routes to ``backend_port``.

    ``node`` overrides node settings; ``extra`` is TOML put before the tables."""
    settings = "\n".join(f"{k} = {v!r}".replace("True", "true").replace("False", "false")
                         for k, v in {**NODE_DEFAULTS, **(node or {})}.items())
    text = f"""
log_level = "debug"
{extra}
[control]
listen = "127.0.0.1:0"
token = "s3cret"

[nodes.box]
host = "127.0.0.1"
mac = "{MAC}"
wol = {{ broadcast = "127.0.0.1", port = {wol_port} }}
{settings}
"""
    for _ in range(routes):
        text += f"""
[[routes]]
listen = "127.0.0.1:0"
node = "box"
backend_port = {backend_port}
ready = "{ready}"
"""
    path = tmp_path / name
    path.write_text(text)
    return path


def load_config(tmp_path: Path, backend_port: int, wol_port: int, *,
                node: Mapping[str, object] | None = None, extra: str = "", routes: int = 1,
                ready: str = "tcp") -> EdgeConfig:
    return load_edge_config(write_config(tmp_path, backend_port, wol_port, node=node,
                                         extra=extra, routes=routes, ready=ready))


@dataclass
class PacketListener:
    """A UDP socket on 127.0.0.1 that records every datagram with its arrival time."""

    sock: trio.socket.SocketType
    port: int
    packets: list[tuple[float, bytes]] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)

    @classmethod
    async def open(cls) -> PacketListener:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind((LOOPBACK, 0))
        return cls(sock, sock.getsockname()[1])

    async def run(self) -> None:
        with self.sock:
            while True:
                data, _ = await self.sock.recvfrom(2048)
                self.packets.append((trio.current_time(), data))
                self.arrived.set()
                self.arrived = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.packets) < count:
            await self.arrived.wait()


def expected_packet(mac: str = MAC, password: bytes = b"") -> bytes:
    """The magic packet written out longhand, independent of the code under test."""
    mac_bytes = bytes(int(part, 16) for part in mac.split(":"))
    return bytes([0xFF] * 6) + b"".join(mac_bytes for _ in range(16)) + password


def response_for(request: bytes, size: int = 200_000) -> bytes:
    """What ``answer_backend`` sends back: a header naming the request, then ``size`` bytes."""
    digest = hashlib.sha256(request).hexdigest()
    body = hashlib.sha256(request + b"body").digest() * (size // 32 + 1)
    return f"ok {digest}\n".encode() + body[:size]


async def answer_backend(stream: trio.SocketStream) -> None:
    """Read one line, answer with ``response_for(line)``, then close (probes just close)."""
    line = await read_line(stream)
    if not line:  # a readiness probe: connect, then close
        await stream.aclose()
        return
    await stream.send_all(response_for(line))
    await stream.aclose()


async def echo_backend(stream: trio.SocketStream) -> None:
    """Echo every byte; on EOF, half-close back (tests half-close through the proxy)."""
    while chunk := await stream.receive_some(1 << 16):
        await stream.send_all(chunk)
    await stream.send_eof()
    # keep the socket open until the peer closes, so the EOF is a half-close, not a close
    with trio.move_on_after(TEST_TIMEOUT_S):
        while await stream.receive_some(1):
            pass
    await stream.aclose()


async def read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        data += chunk
        assert len(data) < LINE_LIMIT
    return data


async def read_all(stream: trio.SocketStream) -> bytes:
    parts = []
    while chunk := await stream.receive_some(1 << 16):
        parts.append(chunk)
    return b"".join(parts)


async def serve_backend(port: int, handler: Handler, *,
                        task_status: trio.TaskStatus[list[trio.SocketListener]]
                        = trio.TASK_STATUS_IGNORED) -> None:
    """A backend on 127.0.0.1:``port`` running ``handler`` per connection until cancelled."""
    await trio.serve_tcp(handler, port, host=LOOPBACK, task_status=task_status)


async def request(port: int, line: bytes) -> bytes:
    """Connect to the proxy, send ``line``, return everything that comes back."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    async with stream:
        await stream.send_all(line)
        return await read_all(stream)


__all__ = ["MAC", "TEST_TIMEOUT_S", "PacketListener", "answer_backend", "echo_backend",
           "expected_packet", "free_port", "load_config", "read_all", "read_line", "request",
           "response_for", "serve_backend", "write_config"]
