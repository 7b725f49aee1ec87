"""The real llama-server serves the tiny models and logs what the node agent relies on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

import httpx
import pytest
import trio

from shared.llama_bin import find_rpc_server, llama_server_version
from shared.tiny_gguf import PRESETS, write_tiny_model
from tests.support.llama import ServerFailed, llama_server, rpc_servers

pytestmark = pytest.mark.llama

# Generous: other test runs share the two cores.
REQUEST_TIMEOUT_S: Final = 60.0
LOG_WAIT_S: Final = 10.0
SERVER_ARGS: Final = ("-lv", "4", "-c", "512", "-np", "2", "-t", "1")
TASK_START: Final = "processing task"
TASK_END: Final = "stop processing"


def test_version_is_reported(llama_server_bin: Path) -> None:
    assert llama_server_version(llama_server_bin)


async def test_completion_and_streamed_chat(llama_server_bin: Path, tiny_model: Path) -> None:
    async with (
        llama_server(llama_server_bin, tiny_model, SERVER_ARGS) as server,
        httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as client,
    ):
        # A random tiny model may sample its end token early; ignore_eos keeps the lengths.
        response = await client.post("/completion", json={"prompt": "Hello", "n_predict": 6,
                                                           "ignore_eos": True})
        assert response.status_code == 200
        body = response.json()
        assert body["tokens_predicted"] == 6
        # Byte-level vocab: BOS + one token per byte.
        assert body["tokens_evaluated"] == 1 + len(b"Hello")

        payloads: list[str] = []
        request = {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "stream": True,
            "ignore_eos": True,
        }
        async with client.stream("POST", "/v1/chat/completions", json=request) as stream:
            assert stream.status_code == 200
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    payloads.append(line.removeprefix("data: "))
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert len(chunks) >= 3
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"

        with trio.fail_after(LOG_WAIT_S):
            ends = await server.log.wait_for(TASK_END, count=2)
            await server.log.wait_for("all slots are idle", count=3)
        starts = server.log.matching(TASK_START)
        assert len(starts) == 2
        assert all("slot launch_slot_: id" in line and "| task " in line for line in starts)
        assert all("slot      release: id" in line and "n_tokens = " in line for line in ends)
        for memory_line in ("model buffer size", "KV buffer size", "compute buffer size"):
            assert server.log.matching(memory_line), memory_line


@pytest.mark.parametrize("preset", sorted(PRESETS))
async def test_each_preset_loads_and_chats(
    preset: str, llama_server_bin: Path, tmp_path: Path
) -> None:
    model = write_tiny_model(tmp_path / f"{preset}.gguf", PRESETS[preset])
    async with (
        llama_server(llama_server_bin, model, SERVER_ARGS) as server,
        httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as client,
    ):
        # A random tiny model may sample its end token at once; ignore_eos keeps the length.
        request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                   "ignore_eos": True}
        response = await client.post("/v1/chat/completions", json=request)
        assert response.status_code == 200
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert isinstance(choice["message"]["content"], str)
        expected_arch = PRESETS[preset].family
        assert server.log.matching(f"general.architecture str              = {expected_arch}")


async def test_rpc_devices_split_layers(llama_server_bin: Path, tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "gqa.gguf", PRESETS["llama-gqa"])
    async with rpc_servers(find_rpc_server(), 2) as endpoints:
        rpc = ",".join(endpoint for endpoint, _ in endpoints)
        args = (*SERVER_ARGS, "--rpc", rpc, "-ngl", "99", "-ts", "1,3")
        async with (
            llama_server(llama_server_bin, model, args) as server,
            httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as client,
        ):
            response = await client.post("/completion", json={"prompt": "Hi", "n_predict": 3})
            assert response.status_code == 200
            for endpoint, _ in endpoints:
                # Buffer names carry the endpoint; the RPCn prefix is not per device.
                for kind in ("model", "KV", "compute"):
                    needle = f"[{endpoint}] {kind} buffer size"
                    assert server.log.matching(needle), needle


async def test_early_exit_fails_fast_with_the_log(llama_server_bin: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ServerFailed, match="exited with") as failure:
        async with llama_server(llama_server_bin, missing, SERVER_ARGS):
            pass
    assert "missing.gguf" in str(failure.value)
