"""Real parts for HTTP-route tests: configs with several nodes, llama-server on a fixed port
that starts when its node's magic packet arrives, an SSE reader.

A "sleeping" node on loopback is a backend port nobody listens on. ``wake_on_packet``
watches the magic-packet listener (``wol.broadcast = "127.0.0.1"``) and starts the node's
llama-server on its port only once a packet with the node's MAC arrived.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final

import httpx
import trio

from edge_proxy.service import Proxy, RelayEngine, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from tests.support.edge import PacketListener, expected_packet, read_line
from tests.support.llama import LogLines, ServerFailed, child_process
from tests.support.ports import LOOPBACK, free_port

# Generous: bounds that stop a hung test on a loaded 2-core machine, never a timing check.
TEST_TIMEOUT_S: Final = 90.0
READY_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.02
SERVER_ARGS: Final = ("-c", "2048", "-np", "1", "-t", "1")
TOKEN: Final = "s3cret"


@dataclass(frozen=True)
class NodeSpec:
    """One node on loopback: its name, MAC, backend port and the models its route names."""

    name: str
    mac: str
    port: int
    models: tuple[str, ...] = ()


def write_http_config(tmp_path: Path, nodes: Sequence[NodeSpec], wol_port: int, *,
                      http: str = "", node_extra: str = "", listen: str = "127.0.0.1:0",
                      routed: Sequence[NodeSpec] | None = None, top: str = "") -> Path:
    """A real TOML file: each node with its own MAC, one ``protocol = "http"`` route per node
    (or per node in ``routed``), all on the one ``listen`` (so one listener fronts them all).
    ``http`` is the body of the first route's ``[routes.http]`` table; ``top`` is TOML put
    before the tables."""
    text = f'log_level = "debug"\n{top}\n[control]\nlisten = "127.0.0.1:0"\ntoken = "{TOKEN}"\n'
    for n in nodes:
        text += f"""
[nodes.{n.name}]
host = "127.0.0.1"
mac = "{n.mac}"
wol = {{ broadcast = "127.0.0.1", port = {wol_port} }}
wol_interval_s = 0.5
wake_timeout_s = 60
probe_interval_s = 0.05
probe_timeout_s = 0.5
drain_timeout_s = 0.3
{node_extra}
"""
    for i, n in enumerate(nodes if routed is None else routed):
        models = ", ".join(f'"{m}"' for m in n.models)
        text += f"""
[[routes]]
listen = "{listen}"
node = "{n.name}"
backend_port = {n.port}
ready = "http:/health"
protocol = "http"
models = [{models}]
"""
        if i == 0 and http:
            text += f"[routes.http]\n{http}\n"
    path = tmp_path / "edge-http.toml"
    path.write_text(text)
    return path


def packets_for(packets: PacketListener, mac: str) -> int:
    return sum(1 for _, data in packets.packets if data == expected_packet(mac))


async def wait_state(proxy: Proxy, node: str, state: State) -> None:
    while proxy.drivers[node].state is not state:
        await trio.sleep(POLL_S)


async def _wait_healthy(url: str, process: trio.Process, log: LogLines) -> None:
    async with httpx.AsyncClient(timeout=READY_TIMEOUT_S) as client:
        with trio.move_on_after(READY_TIMEOUT_S):
            while process.returncode is None:
                try:
                    if (await client.get(f"{url}/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(POLL_S)
    raise ServerFailed(f"llama-server on {url} not healthy:\n{log.tail()}")


@asynccontextmanager
async def llama_on_port(binary: Path, model: Path, port: int, args: Sequence[str] = SERVER_ARGS
                        ) -> AsyncIterator[LogLines]:
    """llama-server on 127.0.0.1:``port`` (the node's backend port), healthy, torn down after."""
    command = [binary, "-m", model, "--host", LOOPBACK, "--port", str(port), *args]
    async with child_process(command) as (process, log):
        await _wait_healthy(f"http://{LOOPBACK}:{port}", process, log)
        yield log


@dataclass
class Waker:
    """Starts a node's llama-server when its magic packet arrives; ``woken`` is set after."""

    node: NodeSpec
    binary: Path
    model: Path
    args: Sequence[str] = SERVER_ARGS
    woken: trio.Event = field(default_factory=trio.Event)
    gate: trio.Event | None = None  # if set, also wait for this before starting

    async def run(self, packets: PacketListener) -> None:
        """Until cancelled: wait for the node's packet, then serve until cancelled."""
        while not packets_for(packets, self.node.mac):
            await packets.arrived.wait()
        if self.gate is not None:
            await self.gate.wait()
        async with llama_on_port(self.binary, self.model, self.node.port, self.args):
            self.woken.set()
            await trio.sleep_forever()


def sse_payloads(lines: Sequence[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


Answer = Callable[[trio.SocketStream], Awaitable[None]]
HEALTH_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "stream": True}


def raw_backend(answer: Answer) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A backend of a few lines of raw HTTP on a real socket, so it can fail on cue:
    readiness probes (GET /health) get 200; every other request gets ``answer``."""
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            request_line = await read_line(stream)
            head = b""
            while (line := await read_line(stream)) not in (b"\r\n", b""):
                head += line
            length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")
                           if h.lower().startswith(b"content-length:")), 0)
            while length > 0:
                length -= len(await stream.receive_some(length))
            if request_line.startswith(b"GET /health"):
                await stream.send_all(HEALTH_OK)
            elif request_line:
                await answer(stream)
    return handle


@asynccontextmanager
async def proxy_before(tmp_path: Path, answer: Answer, *, engine: RelayEngine = "loop",
                       history: Path | None = None) -> AsyncIterator[Proxy]:
    """A proxy (relay engine ``engine``; ``[history]`` at ``history`` when given) with one
    HTTP route, on 127.0.0.1:0, to a node whose backend is ``raw_backend(answer)``; yielded
    once the node is AWAKE. The history is written when the block ends."""
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    path = write_http_config(tmp_path, [node], free_port())
    if history is not None:
        path.write_text(path.read_text()
                        + f'\n[history]\nenabled = true\npath = "{history}"\n')
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_tcp, raw_backend(answer), node.port,
                                        host=LOOPBACK))
            proxy: Proxy = await nursery.start(partial(serve_proxy, load_edge_config(path),
                                                       relay_engine=engine))
            await wait_state(proxy, "box", State.AWAKE)
            yield proxy
            nursery.cancel_scope.cancel()
