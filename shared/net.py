"""Opening TCP connections from both services."""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import select
import socket

import trio


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection (``TCP_NODELAY`` set). An IP literal is one ``connect()``: trio's
    ``open_tcp_stream`` resolves the name and races the addresses (happy eyeballs), which
    costs a nursery and a task per connect, about 0.3 ms here, and even trio's own
    ``socket.connect`` looks a literal up with ``getaddrinfo`` each time. That counts where
    connects are many and on the path of an answer: thousands of held clients released at
    once, streamed requests (llama-server closes its connection after each), a health probe
    every few milliseconds while a model loads. Host names go through ``open_tcp_stream``."""
    family = _literal_family(host)
    if family is None:
        return await trio.open_tcp_stream(host, port)
    await trio.lowlevel.checkpoint_if_cancelled()
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err == errno.EINPROGRESS:
            # on loopback and a near LAN the handshake is often over already: look first,
            # as trio's own wait would cost a pass of its run loop
            if not _writable_now(sock):
                await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"Error connecting to {(host, port)!r}: {os.strerror(err)}")
    except BaseException:
        sock.close()
        raise
    # SocketStream sets TCP_NODELAY: small writes must not wait for ACKs
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


def _writable_now(sock: socket.socket) -> bool:
    poller = select.poll()  # (select() cannot take descriptors past 1023)
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


@functools.lru_cache(maxsize=256)
def _literal_family(host: str) -> socket.AddressFamily | None:
    """The address family of an IP literal; None for a host name."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return None
    return socket.AF_INET6 if version == 6 else socket.AF_INET
