"""The wake timeline, from the sleep/wake end-to-end harness (two network namespaces; root).

Each cycle: the node goes idle and "sleeps" (incoming TCP dropped, agent frozen), then
``--clients`` clients connect through the proxy at once. Measured per cycle, on one clock:

    packet    the proxy sends the first magic packet (proxy's last wake)
    heard     the box receives it (the simulated NIC)
    thawed    the simulated resume is done (nftables rule gone, agent thawed); a real machine
              spends its hardware resume time here
    resume    the agent sees the resume (the sleep hook's ``post``: a shell and ``node-agent hook``)
    spawn     llama-server spawned
    READY     /health answered 200 (llama-server's own load: spawn -> READY)
    released  the proxy connects the held clients (the agent's ``ready``, or its own probe)
    byte      the first held client receives its first byte (llama-server answering); ``all``
              the last one

Our overhead = thawed -> resume -> spawn, plus READY -> released: the agent's and the proxy's
share of a wake, beyond the hardware, llama-server's load and its answer. Target: <= 200 ms.
Timings in the configs are the shipped defaults (health checks every 0.25 s, probes every 1 s,
packets every 2 s).

    sudo .venv/bin/python benchmarks/wake_timeline.py [--cycles 10] [--clients 16]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared.llama_bin import find_llama_server  # noqa: E402
from shared.tiny_gguf import TinyModelSpec, write_tiny_model  # noqa: E402
from tests.support.netns import (  # noqa: E402
    Completion,
    Hosts,
    Stack,
    complete,
    inside,
    netns_problem,
    start,
    stop,
    two_hosts,
)

TARGET_OVERHEAD_MS = 200.0
WAIT_S = 180.0


def log_times(path: Path, needle: str, after: float) -> list[float]:
    """Wall times of agent log lines containing ``needle`` at or after ``after`` (ms resolution)."""
    times = []
    for line in path.read_text(errors="replace").splitlines():
        if needle not in line or len(line) < 23:
            continue
        try:
            t = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        if t >= after - 0.001:
            times.append(t)
    return times


async def wait_ready(stack: Stack) -> None:
    with trio.fail_after(WAIT_S):
        while not await stack.instances_ready():
            await trio.sleep(0.05)


async def one_cycle(stack: Stack, cycle: int, clients: int) -> dict[str, float]:
    with trio.fail_after(WAIT_S):
        while sum(1 for w, _ in stack.sleeps() if w == "asleep") < cycle:
            await trio.sleep(0.01)
    await trio.sleep(0.5)  # fully asleep: the agent frozen, the proxy's last word said
    results: list[Completion] = []

    async def client() -> None:
        results.append(await complete(stack.proxy.route_address()))

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
    now = time.time()
    wake = stack.node()["last_wake"]
    packet = now - wake["started_s_ago"]
    released = packet + wake["duration_s"]  # the proxy connects the held clients
    heard = [t for w, t in stack.sleeps() if w == "packet"][cycle - 1]
    thawed = [t for w, t in stack.sleeps() if w == "awake"][cycle - 1]
    await trio.sleep(0.3)  # let the agent's log lines reach the file
    log = stack.agent_log
    resume = log_times(log, "power: resume seen", heard)[0]
    spawn = log_times(log, "STOPPED -> STARTING", heard)[0]
    ready = log_times(log, "STARTING -> READY", heard)[0]
    first = min(r.first_byte for r in results)
    last = max(r.first_byte for r in results)
    assert all(r.done for r in results), "a held client's stream was cut"
    return {"packet->heard": heard - packet, "heard->thawed": thawed - heard,
            "thawed->resume": resume - thawed, "resume->spawn": spawn - resume,
            "spawn->READY": ready - spawn, "READY->released": released - ready,
            "released->byte": first - released, "byte->all": last - first,
            "heard->byte": first - heard,
            "overhead": (resume - thawed) + (spawn - resume) + (released - ready)}


async def run(args: argparse.Namespace, hosts: Hosts, folder: Path) -> list[dict[str, float]]:
    model = write_tiny_model(folder / "tiny.gguf", TinyModelSpec())
    rows = []
    async with trio.open_nursery() as nursery:
        stack = await start(nursery, folder, hosts, model, find_llama_server(),
                            idle_timeout_s=args.idle_timeout_s, defaults=True)
        try:
            await wait_ready(stack)
            for cycle in range(1, args.cycles + 1):
                rows.append(await one_cycle(stack, cycle, args.clients))
                print(f"cycle {cycle}: heard->first byte {rows[-1]['heard->byte'] * 1000:.0f} ms, "
                      f"overhead {rows[-1]['overhead'] * 1000:.0f} ms", flush=True)
        finally:
            await stop(stack)
            nursery.cancel_scope.cancel()
    return rows


def table(rows: list[dict[str, float]]) -> str:
    out = [f"{'step (ms)':<16}{'median':>9}{'p90':>9}{'max':>9}"]
    for key in rows[0]:
        values = sorted(r[key] * 1000 for r in rows)
        p90 = values[min(len(values) - 1, round(0.9 * (len(values) - 1)))]
        out.append(f"{key:<16}{statistics.median(values):>9.1f}{p90:>9.1f}{values[-1]:>9.1f}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=10)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--idle-timeout-s", type=float, default=2.0)
    args = p.parse_args()
    problem = netns_problem()
    if problem:
        print(f"wake_timeline: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="llamanap-wake-") as tmp, two_hosts() as hosts, \
            inside(hosts.router):
        rows = trio.run(run, args, hosts, Path(tmp))
    print(f"\nwake timeline, {len(rows)} cycles, {args.clients} held clients each, tiny model on CPU")
    print(table(rows))
    worst = max(r["overhead"] for r in rows) * 1000
    median = statistics.median(r["overhead"] for r in rows) * 1000
    verdict = "met" if median <= TARGET_OVERHEAD_MS else "NOT met"
    print(f"\nour overhead per wake: median {median:.0f} ms, worst {worst:.0f} ms "
          f"(target <= {TARGET_OVERHEAD_MS:.0f} ms: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
