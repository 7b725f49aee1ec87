"""Magic packets: how they are built and how they leave the box.

A magic packet is 6 bytes of 0xFF, the target MAC 16 times (102 bytes), and optionally a
6-byte SecureOn password (108 bytes). It goes out as one UDP datagram to the node's LAN
broadcast address (``wol.broadcast``, port ``wol.port``), optionally from ``wol.source`` to pick
the interface. The bytes come from ``wakeonlan.create_magic_packet``; its own sending is
blocking and cannot bind a source port per packet, so sending stays here, on a trio UDP socket,
behind the small ``WolSender`` protocol: ``UdpWolSender`` is the real one; tests may record
instead.
"""

from __future__ import annotations

import socket
from typing import Protocol

import trio
import wakeonlan

from edge_proxy.errors import WolError
from shared.config.edge import WolConfig

MAC_BYTES = 6
MAC_REPEATS = 16
SYNC_STREAM = b"\xff" * 6
PACKET_BYTES = len(SYNC_STREAM) + MAC_BYTES * MAC_REPEATS  # 102


def magic_packet(mac: bytes, password: bytes = b"") -> bytes:
    """The packet that wakes ``mac`` (6 bytes), with an optional 6-byte SecureOn password."""
    if len(mac) != MAC_BYTES:
        raise ValueError(f"a MAC address has 6 bytes, got {len(mac)}")
    if password and len(password) != MAC_BYTES:
        raise ValueError(f"a SecureOn password has 6 bytes, got {len(password)}")
    # wakeonlan takes text: the MAC in hex, and a SecureOn password after a "/"
    return wakeonlan.create_magic_packet(mac.hex() + (f"/{password.hex()}" if password else ""))


class WolSender(Protocol):
    """Puts one magic packet on the wire. Raises ``WolError`` when it cannot."""

    async def send(self, packet: bytes, wol: WolConfig) -> None: ...


class UdpWolSender:
    """Sends each packet on a fresh trio UDP socket with SO_BROADCAST set.

    A fresh socket per packet keeps a changed ``wol.source`` (after a reload) or a NIC that
    came back from being down from sticking to a stale socket; packets are seconds apart.
    """

    async def send(self, packet: bytes, wol: WolConfig) -> None:
        family = socket.AF_INET6 if ":" in wol.broadcast else socket.AF_INET
        try:
            with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                if wol.source:
                    await sock.bind((wol.source, 0))
                await sock.sendto(packet, (wol.broadcast, wol.port))
        except OSError as exc:
            where = f"{wol.broadcast}:{wol.port}" + (f" from {wol.source}" if wol.source else "")
            raise WolError(f"cannot send magic packet to {where}: {exc.strerror or exc}") from exc
