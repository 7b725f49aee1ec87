"""HTTP routes when the backend misbehaves: a stream cut in the middle stays visibly cut, and
an error answer after a held stream has started becomes one SSE error event.

The backend here is a few lines of raw HTTP on a real loopback socket, so it can fail on cue.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from tests.support.edge import PacketListener
from tests.support.edge_http import (
    CHAT,
    TEST_TIMEOUT_S,
    NodeSpec,
    packets_for,
    proxy_before,
    raw_backend,
    sse_payloads,
    wait_state,
    write_http_config,
)
from tests.support.ports import LOOPBACK, free_port


async def test_a_stream_cut_by_the_backend_is_cut_for_the_client(tmp_path: Path) -> None:
    async def half_a_stream(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n"
                              b"f\r\ndata: {\"a\":1}\n\n\r\n")
        # and then the box dies: no last chunk

    async with proxy_before(tmp_path, half_a_stream) as proxy:
        received: list[str] = []
        async with httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                     timeout=TEST_TIMEOUT_S) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                async with client.stream("POST", "/v1/chat/completions",
                                         json=CHAT) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        received.append(line)
        assert received[:1] == ['data: {"a":1}']


async def test_an_error_after_a_held_stream_started_is_one_sse_error_event(
        tmp_path: Path) -> None:
    error = {"error": {"code": 400, "message": "the request exceeds the context size",
                       "type": "exceed_context_size_error"}}
    body = json.dumps(error).encode()

    async def refuse(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n" % len(body) + body)

    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    packets = await PacketListener.open()
    path = write_http_config(tmp_path, [node], packets.port,
                             http="waking_comment_interval_s = 0.05")
    heard_comment = trio.Event()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, "box", State.ASLEEP)

            async def wake() -> None:
                await packets.wait_for(1)
                await heard_comment.wait()
                await trio.serve_tcp(raw_backend(refuse), node.port, host=LOOPBACK)

            nursery.start_soon(wake)
            lines: list[str] = []
            async with (
                httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                  timeout=TEST_TIMEOUT_S) as client,
                client.stream("POST", "/v1/chat/completions", json=CHAT) as response,
            ):
                assert response.status_code == 200  # sent with the first comment
                async for line in response.aiter_lines():
                    lines.append(line)
                    heard_comment.set()
            assert lines[0].startswith(": waking box")
            assert [json.loads(p) for p in sse_payloads(lines)] == [error]
            assert packets_for(packets, node.mac) >= 1
            nursery.cancel_scope.cancel()


async def test_requests_inside_the_wake_cooldown_fail_at_once_with_the_reason(
        tmp_path: Path) -> None:
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    packets = await PacketListener.open()
    path = write_http_config(tmp_path, [node], packets.port,
                             node_extra="wake_cooldown_s = 3.0",
                             http="waking_comment_interval_s = 0.05")
    path.write_text(path.read_text().replace("wake_timeout_s = 60", "wake_timeout_s = 0.6"))
    plain = {"messages": [{"role": "user", "content": "hi"}]}
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, "box", State.ASLEEP)
            async with httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                         timeout=TEST_TIMEOUT_S) as client:
                first = await client.post("/v1/chat/completions", json=plain)
                assert first.status_code == 504
                assert "wake timed out after 0.6 s" in first.json()["error"]["message"]
                sent = packets_for(packets, node.mac)
                assert sent >= 1
                # the frontend's follow-ups (a title, a retry): no second wake, the same error
                for body in (plain, CHAT):
                    again = await client.post("/v1/chat/completions", json=body)
                    assert again.status_code == 504  # not a stream held open: an answer at once
                    error = again.json()["error"]
                    assert error["source"] == "edge-proxy" and error["type"] == "wake_timeout"
                    assert "wake of box failed" in error["message"]
                    assert "; not retrying for another" in error["message"]
                assert packets_for(packets, node.mac) == sent
                assert proxy.drivers["box"].state is State.ASLEEP
                status = proxy.status()["nodes"]["box"]
                assert 0 < status["wake_cooldown_left_s"] <= 3.0
                # once it is over, a request wakes the node again
                await trio.sleep(status["wake_cooldown_left_s"])
                later = await client.post("/v1/chat/completions", json=plain)
                assert later.status_code == 504
                assert "wake timed out" in later.json()["error"]["message"]
                assert packets_for(packets, node.mac) > sent
            nursery.cancel_scope.cancel()


async def test_a_request_right_after_a_stream_goes_on_a_new_connection(tmp_path: Path) -> None:
    # As llama-server does: the connection closes after a streamed answer, without a
    # `Connection: close`; here the close comes late, so it cannot be seen in time.
    async def stream_then_close_late(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n"
                              b"f\r\ndata: {\"a\":1}\n\n\r\n0\r\n\r\n")
        await trio.sleep(0.5)

    async with proxy_before(tmp_path, stream_then_close_late) as proxy, httpx.AsyncClient(
            base_url=proxy.http_routes.url("127.0.0.1:0"), timeout=TEST_TIMEOUT_S) as client:
        first = await client.post("/v1/chat/completions", json=CHAT)
        second = await client.post("/v1/chat/completions", json=CHAT)
    assert (first.status_code, second.status_code) == (200, 200)
    assert sse_payloads(second.text.splitlines()) == ['{"a":1}']
