"""A simulated suspend for the demo and tests: "sleep" until a correct magic packet arrives.

``node-agent simulate-sleep`` is used as the suspend command. Like ``systemctl suspend`` it
returns at once and the sleep happens behind it: it binds a UDP address (loopback in the demo),
detaches a child and exits 0. The child ignores every datagram but a magic packet carrying this
node's MAC, then tells the agent ``post`` through its API, exactly as the system-sleep hook does
after a real resume. The agent has stopped its instances before running the command, so the
"node" ignores traffic meanwhile (connections to its ports are refused).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

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


def open_wol_socket(host: str, port: int) -> socket.socket:
    """The UDP socket the sleeping "node" listens on (bound now, so no packet comes too early)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def wait_for_magic_packet(sock: socket.socket, mac: bytes,
                          log: Callable[[str], None] = lambda line: None) -> int:
    """Block until a magic packet for ``mac`` arrives; return how many datagrams were ignored."""
    ignored = 0
    while True:
        data, sender = sock.recvfrom(2048)
        parsed = parse_magic_packet(data)
        if parsed is not None and parsed[0] == mac:
            log(f"magic packet for {mac.hex(':')} from {sender[0]}: waking")
            return ignored
        ignored += 1
        log(f"ignored a {len(data)}-byte datagram from {sender[0]} "
            f"(not a magic packet for {mac.hex(':')})")


def detach(log_path: Path | None) -> bool:
    """Fork; True in the child, which leaves the caller's session and output pipes behind
    (the agent waits for the suspend command's output to close), writing to ``log_path``."""
    if os.fork() != 0:
        return False
    os.setsid()
    target = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log_path \
        else os.open(os.devnull, os.O_WRONLY)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(target, 1)
    os.dup2(target, 2)
    return True
