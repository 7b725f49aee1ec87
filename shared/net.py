"""Opening TCP connections from both services."""

from __future__ import annotations

import ipaddress
import socket

import trio


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection (``TCP_NODELAY`` set). An IP literal is one ``connect()``: trio's
    ``open_tcp_stream`` resolves the name and races the addresses (happy eyeballs), which
    costs a nursery and a task per connect, about 0.3 ms here. That counts where connects are
    many and on the path of an answer: thousands of held clients released at once, streamed
    requests (llama-server closes its connection after each), a health probe every few
    milliseconds while a model loads. Host names go through ``open_tcp_stream``."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)  # sets TCP_NODELAY: small writes must not wait for ACKs
