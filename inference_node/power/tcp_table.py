"""Established TCP connections to a few local ports, read cheaply from the kernel's tables.

``psutil.net_connections()`` maps every socket of the system to its process by reading the
file descriptors of every process: on a busy host that costs tens of milliseconds of CPU
per call, and the idle checks call it every few seconds for the node's whole life. The
connections check only needs the server side of connections to the instances' ports (no
process) and the agent's own sockets (one process: the inodes behind ``/proc/self/fd``), so
``established_to(ports)`` reads ``/proc/net/tcp`` and ``/proc/net/tcp6`` once for both.
Where those tables are missing (not Linux) it falls back to psutil's full scan.
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
SELF_FDS: Final = "/proc/self/fd"


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
    own, pid = _own_inodes(), os.getpid()
    rows: list[Conn] = []
    try:
        for path, family in PROC_TABLES:
            rows += _read_table(path.read_text(), family, ports, own, pid)
    except FileNotFoundError:
        return _full_scan()
    return rows


def _own_inodes() -> set[str]:
    """Inodes of this process's sockets, as the tables print them."""
    inodes = set()
    try:
        with os.scandir(SELF_FDS) as fds:
            for fd in fds:
                try:
                    target = os.readlink(fd.path)
                except OSError:  # closed meanwhile
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except FileNotFoundError:
        pass  # no /proc: established_to falls back to psutil
    return inodes


def _full_scan() -> list[Conn]:
    try:
        return [_conn(c, c.pid) for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_ESTABLISHED]
    except psutil.AccessDenied:  # without root, only our own sockets are visible
        pid = os.getpid()
        return [_conn(c, pid) for c in psutil.Process().net_connections(kind="tcp")
                if c.status == psutil.CONN_ESTABLISHED]


def _conn(row: Any, pid: int | None) -> Conn:
    return Conn(Addr(*row.laddr) if row.laddr else None,
                Addr(*row.raddr) if row.raddr else None, pid)


def _read_table(text: str, family: socket.AddressFamily, ports: Set[int], own: Set[str],
                pid: int) -> list[Conn]:
    """ESTABLISHED rows of one ``/proc/net/tcp*`` table: those on one of ``ports``, and this
    process's own (socket inodes ``own``; they get ``pid``)."""
    suffixes = {f":{p:04X}" for p in ports}
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != TCP_ESTABLISHED:
            continue
        mine = fields[9] in own
        if mine or fields[1][-5:] in suffixes:
            out.append(Conn(_address(fields[1], family), _address(fields[2], family),
                            pid if mine else None))
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
