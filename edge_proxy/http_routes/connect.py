"""httpcore's network layer for upstream pools, with a one-call connect to IP addresses.

llama-server closes its connection after every streamed answer, so each streamed request
through the proxy opens a new connection to the node, on the path that sets the time to the
first token. trio's ``open_tcp_stream`` runs its happy-eyeballs machinery (a nursery and a
task per attempt) even for one numeric address: about 0.3 ms per connect on a small box.
Nodes are nearly always configured by IP address; those get one ``connect()``, host names
still go through ``open_tcp_stream``. Errors are httpcore's own, as its pool expects.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import typing

import httpcore
import trio

_INF = float("inf")
# Writes are held until the next read or this much is pending (a large body streams out).
WRITE_BEHIND_BYTES = 64 * 1024


class DirectBackend(httpcore.AsyncNetworkBackend):
    """Plain-TCP connects for httpcore pools (no TLS: backends are plain HTTP)."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        try:
            with trio.fail_after(_INF if timeout is None else timeout):
                stream = await _open(host, port, local_address)
        except trio.TooSlowError as exc:
            raise httpcore.ConnectTimeout(f"connect to {host}:{port} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        for option in socket_options or ():
            stream.setsockopt(*option)
        return _Stream(stream)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[httpcore.SOCKET_OPTION]
                                  | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not used for backends")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


async def _open(host: str, port: int, local_address: str | None) -> trio.SocketStream:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return await trio.open_tcp_stream(host, port, local_address=local_address)
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        if local_address is not None:
            await sock.bind((local_address, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)  # sets TCP_NODELAY: chunks must not wait for ACKs


class _Stream(httpcore.AsyncNetworkStream):
    """A connection whose writes wait for the next read (or ``WRITE_BEHIND_BYTES``): httpcore
    writes a request's head and body separately, and one segment instead of two spares the
    backend a wake-up on the way to the first token."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._pending = bytearray()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._pending:
            await self._flush(timeout)
        try:
            with trio.fail_after(_INF if timeout is None else timeout):
                return await self._stream.receive_some(max_bytes)
        except trio.TooSlowError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._pending += buffer
        if len(self._pending) >= WRITE_BEHIND_BYTES:
            await self._flush(timeout)

    async def _flush(self, timeout: float | None) -> None:
        data, self._pending = bytes(self._pending), bytearray()
        try:
            with trio.fail_after(_INF if timeout is None else timeout):
                await self._stream.send_all(data)
        except trio.TooSlowError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("TLS is not used for backends")

    def get_extra_info(self, info: str) -> typing.Any:
        sock = self._stream.socket
        if info == "socket":
            return sock
        if info == "is_readable":  # the pool's check for a keep-alive connection closed meanwhile
            return sock.is_readable()
        if info == "client_addr":
            return sock.getsockname()
        if info == "server_addr":
            return sock.getpeername()
        return None
