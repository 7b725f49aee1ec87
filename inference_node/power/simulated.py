"""A simulated suspend for the demo and tests: "sleep" until a correct magic packet arrives.

Used as the suspend command (``node-agent simulate-sleep ...``): it blocks like a frozen
machine, listens on a UDP address (loopback in the demo) for a magic packet carrying this node's
MAC, then tells the agent ``post`` through its API, exactly as the system-sleep hook does after
a real resume.
"""

from __future__ import annotations

import logging

import trio

log = logging.getLogger(__name__)

SYNC = b"\xff" * 6
MAC_REPEATS = 16
PACKET_LEN = len(SYNC) + 6 * MAC_REPEATS  # 102
SECUREON_LEN = 6


def parse_magic_packet(data: bytes) -> tuple[bytes, bytes] | None:
    """``(mac, secureon_password)`` if ``data`` is a well-formed magic packet, else None."""
    if len(data) not in (PACKET_LEN, PACKET_LEN + SECUREON_LEN) or not data.startswith(SYNC):
        return None
    mac = data[6:12]
    if data[6:PACKET_LEN] != mac * MAC_REPEATS:
        return None
    return mac, data[PACKET_LEN:]


async def wait_for_magic_packet(
    mac: bytes,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Listen on ``host:port`` (UDP) until a magic packet for ``mac`` arrives; return how many
    datagrams were ignored on the way (wrong MAC or malformed)."""
    sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET,
                              trio.socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await sock.bind((host, port))
        task_status.started()
        ignored = 0
        while True:
            data, sender = await sock.recvfrom(2048)
            parsed = parse_magic_packet(data)
            if parsed is not None and parsed[0] == mac:
                log.info("magic packet for %s from %s: waking", mac.hex(":"), sender[0])
                return ignored
            ignored += 1
            log.info("ignored a %d-byte datagram from %s (not a magic packet for %s)",
                     len(data), sender[0], mac.hex(":"))
