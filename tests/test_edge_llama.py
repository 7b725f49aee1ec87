"""The whole point, with the real llama-server: a request sent while the server is down is
held, the server starts and loads (answering 503 on /health meanwhile), and the streamed
completion arrives through the proxy exactly as it comes from the server directly."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from tests.support.edge import TEST_TIMEOUT_S, PacketListener, free_port, load_config
from tests.support.llama import child_process

REQUEST_TIMEOUT_S = 60.0
# temperature 0 makes the completion deterministic, so direct and proxied answers must match
REQUEST = {"prompt": "Hello", "n_predict": 12, "temperature": 0, "stream": True,
           "cache_prompt": False}


async def stream_completion(base_url: str) -> list[str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client, \
            client.stream("POST", "/completion", json=REQUEST) as response:
        assert response.status_code == 200
        return [line async for line in response.aiter_lines() if line.startswith("data: ")]


@pytest.mark.llama
async def test_held_request_reaches_llama_server_started_later(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    backend_port = free_port()
    with trio.fail_after(TEST_TIMEOUT_S * 4):
        async with trio.open_nursery() as nursery:
            packets = await PacketListener.open()
            nursery.start_soon(packets.run)
            cfg = load_config(tmp_path, backend_port, packets.port, ready="http:/health")
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            host, port = proxy.route_address()
            proxied: list[list[str]] = []

            async def client() -> None:
                proxied.append(await stream_completion(f"http://{host}:{port}"))

            nursery.start_soon(client)
            await packets.wait_for(1)
            assert proxy.drivers["box"].held == 1
            command: list[str | Path] = [llama_server_bin, "-m", tiny_model, "--host", "127.0.0.1",
                       "--port", str(backend_port), "-c", "256", "-np", "1", "-t", "1"]
            async with child_process(command):
                while not proxied:
                    await trio.sleep(0.05)
                assert proxy.drivers["box"].state is State.AWAKE
                direct = await stream_completion(f"http://127.0.0.1:{backend_port}")
            chunks = proxied[0]
            assert len(chunks) >= 2 and '"stop":true' in chunks[-1]
            # timings differ between runs; the generated text must not
            strip = [c.split('"timings"')[0] for c in chunks]
            assert strip == [c.split('"timings"')[0] for c in direct]
            nursery.cancel_scope.cancel()
