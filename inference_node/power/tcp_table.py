"""Established TCP connections to a few local ports, read cheaply from the kernel's tables.

``psutil.net_connections()`` maps every socket of the system to its process by reading the
file descriptors of every process: on a busy host that costs tens of milliseconds of CPU
per call, and the idle checks call it every few seconds for the node's whole life. The
connections check only needs the server side of connections to the instances' ports (no
process) and the agent's own sockets (one process), so ``established_to(ports)`` reads
``/proc/net/tcp`` and ``/proc/net/tcp6`` for the first and ``psutil.Process()`` for the
second. Where those tables are missing (not Linux) it falls back to psutil's full scan.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from collections.abc import Set
from pathlib import Path
from typing import Any, Final, NamedTuple

import psutil

PROC_TABLES: Final = ((Path("/proc/net/tcp"), socket.AF_INET),
                      (Path("/proc/net/tcp6"), socket.AF_INET6))
TCP_ESTABLISHED: Final = "01"  # the kernel's state code (include/net/tcp_states.h)


class Addr(NamedTuple):
    ip: str
    port: int


class Conn(NamedTuple):
    """One established connection, shaped like psutil's rows (``pid`` None: not looked up)."""

    laddr: Addr | None
    raddr: Addr | None
    pid: int | None


def established_to(ports: Set[int]) -> list[Conn]:
    """Established TCP connections whose local port is one of ``ports`` (``pid`` None), and
    every established connection of this process (``pid`` ours)."""
    rows = _own()
    try:
        for path, family in PROC_TABLES:
            rows += _read_table(path.read_text(), family, ports)
    except FileNotFoundError:
        return _full_scan()
    return rows


def _own() -> list[Conn]:
    pid = os.getpid()
    return [_conn(c, pid) for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED]


def _full_scan() -> list[Conn]:
    try:
        return [_conn(c, c.pid) for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_ESTABLISHED]
    except psutil.AccessDenied:  # without root, only our own sockets are visible
        return _own()


def _conn(row: Any, pid: int | None) -> Conn:
    return Conn(Addr(*row.laddr) if row.laddr else None,
                Addr(*row.raddr) if row.raddr else None, pid)


def _read_table(text: str, family: socket.AddressFamily, ports: Set[int]) -> list[Conn]:
    """Rows of one ``/proc/net/tcp*`` table in ESTABLISHED state on one of ``ports``."""
    suffixes = {f":{p:04X}" for p in ports}
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != TCP_ESTABLISHED or fields[1][-5:] not in suffixes:
            continue
        out.append(Conn(_address(fields[1], family), _address(fields[2], family), None))
    return out


def _address(field: str, family: socket.AddressFamily) -> Addr:
    """``0100007F:1F90`` (the kernel's hex, host byte order per 32-bit word) as an ``Addr``."""
    ip_hex, port_hex = field.split(":")
    raw = base64.b16decode(ip_hex)
    if family == socket.AF_INET:
        packed = struct.pack(">I", *struct.unpack("=I", raw))
    else:
        packed = struct.pack(">4I", *struct.unpack("=4I", raw))
    return Addr(socket.inet_ntop(family, packed), int(port_hex, 16))
