"""systemd notify protocol: READY, STOPPING, RELOADING, STATUS, watchdog. No-op outside systemd.

Written against the socket protocol (sd_notify(3)) so no libsystemd binding is needed.
"""

from __future__ import annotations

import os
import socket
import time

# systemd's variables, moved out of the environment by ``claim()`` so that no child (llama-server,
# busctl, the suspend command) inherits them: systemd tools report their own exit status to
# $NOTIFY_SOCKET (ERRNO=...), which the service manager would read as the service's.
_claimed: dict[str, str] = {}
_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def claim() -> None:
    """Keep systemd's notify variables for this process only (call once, at start)."""
    for name in _VARIABLES:
        value = os.environ.pop(name, None)
        if value is not None:
            _claimed[name] = value


def _get(name: str) -> str | None:
    return _claimed.get(name) or os.environ.get(name)


def notify(*fields: str) -> bool:
    """Send ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``; False (and nothing sent) outside systemd."""
    addr = _get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace socket
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(addr)
            sock.sendall("\n".join(fields).encode())
        except OSError:
            return False
    return True


def ready(status: str = "") -> bool:
    """Tell systemd the service is up (``Type=notify`` units wait for this)."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    """Tell systemd a reload started; call ``ready()`` when it is done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval_s() -> float | None:
    """Half the unit's ``WatchdogSec`` (the interval to ping at), or None when not asked for."""
    usec = _get("WATCHDOG_USEC")
    pid = _get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
