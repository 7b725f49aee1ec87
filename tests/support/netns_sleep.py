"""A suspend command for the end-to-end test: the "GPU box" network namespace really drops off.

Run by node-agent (inside the gpubox namespace) as its ``power.suspend_command``::

    python netns_sleep.py --iface veth-g --mac MAC --hook HOOK [--record FILE]

Like ``systemctl suspend`` it returns at once and the "sleep" happens behind it: a detached
child adds an nftables rule that drops every TCP packet coming in on ``--iface`` (connections to
the box time out, as they do to a sleeping machine, rather than being refused), freezes the
agent (SIGSTOP, as the kernel freezes user space), and waits for a magic packet for ``--mac`` on
UDP port 9. Then it removes the rule, thaws the agent and runs the system-sleep hook
(``HOOK post suspend``), exactly as systemd-sleep does after a real resume.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

TABLE = "llamanap_e2e_sleep"
SYNC = b"\xff" * 6


def nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script.encode(), check=True)


def fall_asleep(iface: str) -> None:
    nft(f"""
table inet {TABLE} {{
    chain input {{
        type filter hook input priority -10; policy accept;
        iifname "{iface}" meta l4proto tcp drop
    }}
}}
""")


def wake_up() -> None:
    nft(f"delete table inet {TABLE}")


def is_magic_packet_for(data: bytes, mac: bytes) -> bool:
    return data[:6] == SYNC and data[6:102] == mac * 16


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iface", required=True)
    p.add_argument("--mac", required=True)
    p.add_argument("--hook", required=True, help="the system-sleep hook to run with 'post suspend'")
    p.add_argument("--record", help="append 'asleep|packet|awake TIME' lines here")
    args = p.parse_args()
    mac = bytes(int(x, 16) for x in args.mac.split(":"))
    agent = os.getppid()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.bind(("0.0.0.0", 9))  # bound before returning: no packet can come too early
    if os.fork() != 0:
        return 0  # the command returns; the "machine" goes to sleep right after
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # let go of the agent's pipes, or it would wait for our output
        os.dup2(devnull, fd)
    time.sleep(0.05)  # systemctl has returned by now
    fall_asleep(args.iface)
    os.kill(agent, signal.SIGSTOP)
    record(args.record, "asleep")
    try:
        while True:
            data, _ = sock.recvfrom(2048)
            if is_magic_packet_for(data, mac):
                record(args.record, "packet")
                break
    finally:
        wake_up()
        os.kill(agent, signal.SIGCONT)
    record(args.record, "awake")  # the "hardware" is back; the sleep hook runs next
    subprocess.run([args.hook, "post", "suspend"], check=False)
    return 0


def record(path: str | None, what: str) -> None:
    if path:
        with open(path, "a") as fh:
            fh.write(f"{what} {time.time():.6f}\n")


if __name__ == "__main__":
    sys.exit(main())
