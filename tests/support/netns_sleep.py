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
import subprocess
import sys
import time

from inference_node.power import simulated

TABLE = "llamanap_e2e_sleep"


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iface", required=True)
    p.add_argument("--mac", required=True)
    p.add_argument("--hook", required=True, help="the system-sleep hook to run with 'post suspend'")
    p.add_argument("--record", help="append 'asleep|packet|awake TIME' lines here")
    args = p.parse_args()
    mac = bytes(int(x, 16) for x in args.mac.split(":"))
    agent = os.getppid()
    sock = simulated.open_wol_socket("0.0.0.0", 9)  # before returning: no packet comes too early
    if not simulated.detach(None):
        return 0  # the command returns; the "machine" goes to sleep right after
    time.sleep(0.05)  # systemctl has returned by now
    fall_asleep(args.iface)
    os.kill(agent, signal.SIGSTOP)
    record(args.record, "asleep")
    try:
        simulated.wait_for_magic_packet(sock, mac)
        record(args.record, "packet")
    finally:
        wake_up()
        os.kill(agent, signal.SIGCONT)
    record(args.record, "awake")  # the "hardware" is back; the sleep hook runs next
    subprocess.run([args.hook, "post", "suspend"], check=False)
    os._exit(0)  # a forked child: skip the parent's exit handlers


def record(path: str | None, what: str) -> None:
    if path:
        with open(path, "a") as fh:
            fh.write(f"{what} {time.time():.6f}\n")


if __name__ == "__main__":
    sys.exit(main())
