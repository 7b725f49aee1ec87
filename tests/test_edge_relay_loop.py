"""The relay loop thread on its own, with real loopback TCP connections."""

from __future__ import annotations

import trio

from edge_proxy.tcp_routes.relay_loop import RelayLoop
from tests.support.edge import TEST_TIMEOUT_S, read_all


async def connected_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of one loopback TCP connection."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        port = listener.socket.getsockname()[1]
        near = await trio.open_tcp_stream("127.0.0.1", port)
        far = await listener.accept()
    return near, far


async def test_a_cancelled_relay_leaves_the_loop_and_others_go_on() -> None:
    loop = RelayLoop()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(loop.run)
            relays = []
            for _ in range(2):
                client, proxy_in = await connected_pair()
                proxy_out, backend = await connected_pair()
                relays.append((client, proxy_in, proxy_out, backend))
            outcomes: list[str] = []
            scopes = [trio.CancelScope(), trio.CancelScope()]

            async def run(i: int) -> None:
                _, proxy_in, proxy_out, _ = relays[i]
                with scopes[i]:
                    outcomes.append(await loop.relay(proxy_in, proxy_out))
                    return
                outcomes.append("cancelled")

            for i in range(2):
                nursery.start_soon(run, i)
            client, _, _, backend = relays[0]
            await client.send_all(b"ping")
            assert await backend.receive_some(4) == b"ping"
            scopes[0].cancel()
            while not outcomes:
                await trio.sleep(0.01)
            assert outcomes == ["cancelled"]
            # the sockets are ours again: closing them cannot disturb the loop
            for stream in relays[0]:
                await stream.aclose()
            client, _, _, backend = relays[1]
            await client.send_all(b"still here")
            await client.send_eof()
            assert await read_all(backend) == b"still here"
            await backend.send_all(b"bye")
            await backend.send_eof()
            assert await read_all(client) == b"bye"
            while len(outcomes) < 2:
                await trio.sleep(0.01)
            assert outcomes == ["cancelled", "done"]
            nursery.cancel_scope.cancel()
    for stream in relays[1]:
        await stream.aclose()
