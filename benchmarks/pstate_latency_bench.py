"""P-state switching benchmark on the real llama-server: latency, and time spent low.

Run: ``.venv/bin/python benchmarks/pstate_latency_bench.py [--tasks N] [--replay-s S]``.
Prints one table.

1. Latency: one llama-server (tiny model, ``-lv 4``) read line by line as the supervisor does;
   the tracker and the P-state controller run as in the agent, over a recording fake of the
   GPU (no GPU here). For each of N sequential tasks, the time from reading the
   ``processing task`` line to the P-state call reaching the GPU backend (which runs in a
   worker thread, as in the agent). ``low_delay_s = 0`` so every task starts on a low GPU.
   Target: p99 <= 20 ms.
2. Bursty replay: three llama-servers on a fake 3-GPU rig (gamma on GPU 0, alpha on GPU 1,
   delta on GPUs 1+2) get bursts of concurrent requests separated by idle gaps. Per GPU: the
   fraction of wall time its instances were busy, the fraction it spent low, and the low
   fraction the policy allows (idle time minus ``low_delay_s`` per idle gap). Low should track
   the allowed fraction within a few percent.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inference_node.activity.tracker import BusyTracker  # noqa: E402
from inference_node.gpu.controller import PstateController  # noqa: E402
from shared.llama_bin import find_llama_server  # noqa: E402
from shared.tiny_gguf import TinyModelSpec, write_tiny_model  # noqa: E402
from tests.fakes.gpu import FakeNvml, FakeRig, RecordingBackend, three_gpu_rig  # noqa: E402

LOW, HIGH = 8, 16
LOOPBACK = "127.0.0.1"
SERVER_ARGS = ["-lv", "4", "-c", "512", "-np", "2", "-t", "1", "--no-warmup"]
READY_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0
SWITCH_TIMEOUT_S = 10.0
POLL_S = 0.0005
TARGET_P99_MS = 20.0
REPLAY_LOW_DELAY_S = 0.1
READ_CHUNK = 65536
# Replay shape: bursts of BURST_S, gaps of GAP_S, CONCURRENCY requests at a time in a burst.
BURST_S = (0.3, 1.5)
GAP_S = (0.5, 3.0)
CONCURRENCY = 2
REPLAY_N_PREDICT = 48


class Server:
    """One llama-server child whose lines go to ``on_line(line, perf_time)``."""

    def __init__(self, binary: Path, model: Path, port: int) -> None:
        self.command = [str(binary), "-m", str(model), "--host", LOOPBACK, "--port", str(port),
                        *SERVER_ARGS]
        self.url = f"http://{LOOPBACK}:{port}"

    async def run(self, on_line: Callable[[str, float], None], *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        proc = await trio.lowlevel.open_process(self.command, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, proc.stdout, on_line)
                await self._wait_healthy()
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                proc.terminate()
                await proc.wait()

    async def _read(self, stream: trio.abc.ReceiveStream,
                    on_line: Callable[[str, float], None]) -> None:
        pending = b""
        while chunk := await stream.receive_some(READ_CHUNK):
            stamp = time.perf_counter()
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                on_line(raw.decode("utf-8", "replace"), stamp)

    async def _wait_healthy(self) -> None:
        async with httpx.AsyncClient(timeout=2.0) as client:
            with trio.fail_after(READY_TIMEOUT_S):
                while True:
                    try:
                        if (await client.get(f"{self.url}/health")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.05)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def latency(binary: Path, model: Path, tasks: int) -> list[float]:
    rig = FakeRig([three_gpu_rig().gpus[0]])
    tracker = BusyTracker()
    controller = PstateController(FakeNvml(rig), RecordingBackend(rig), tracker, low=LOW,
                                  high=HIGH, low_delay_s=0.0)
    gpu = rig.gpus[0]
    controller.set_instance_gpus("bench", [gpu.uuid])
    starts: list[float] = []

    def on_line(line: str, stamp: float) -> None:
        if "processing task" in line:
            starts.append(stamp)
        tracker.feed("bench", line, trio.current_time())

    server = Server(binary, model, free_port())
    samples: list[float] = []
    async with trio.open_nursery() as nursery, \
            httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        await nursery.start(server.run, on_line)
        await nursery.start(controller.run)
        record = controller.control(gpu.uuid)
        for i in range(tasks):
            # Start each task on an idle instance and a low GPU. The answer to the previous
            # request can arrive before its release line, so wait for the log as well.
            with trio.fail_after(SWITCH_TIMEOUT_S):
                while (record.applied != LOW or tracker.busy("bench")
                       or rig.switches[-1].pstate != LOW):
                    await trio.sleep(POLL_S)
            mark = len(rig.switches)
            r = await client.post(f"{server.url}/completion",
                                  json={"prompt": f"task {i}", "n_predict": 4})
            r.raise_for_status()
            with trio.move_on_after(SWITCH_TIMEOUT_S) as scope:
                while len(starts) <= i or not any(s.pstate == HIGH for s in rig.switches[mark:]):
                    await trio.sleep(POLL_S)
            if scope.cancelled_caught:
                raise RuntimeError(f"task {i}: no switch up within {SWITCH_TIMEOUT_S} s "
                                   f"({len(starts)} start lines, {record!r}, "
                                   f"{tracker.instance('bench')!r})")
            switch = next(s for s in rig.switches[mark:] if s.pstate == HIGH)
            samples.append(switch.t - starts[i])
        nursery.cancel_scope.cancel()
    return samples


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def allowed_low(intervals: list[tuple[float, float]], start: float, stop: float,
                delay: float) -> float:
    """Seconds a GPU may be low: each idle gap minus the low delay (the GPU starts low, so the
    first gap counts whole)."""
    merged: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    edges = [start, *[x for pair in merged for x in pair], stop]
    gaps = [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2)]
    return sum(max(0.0, (b - a) - (delay if i else 0.0)) for i, (a, b) in enumerate(gaps))


async def replay(binary: Path, model: Path, seconds: float, seed: int,
                 low_delay_s: float) -> list[list[str]]:
    rig = three_gpu_rig()
    cuda = sorted(rig.gpus, key=lambda g: g.pci_bus_id)
    layout = {"gamma": [cuda[0]], "alpha": [cuda[1]], "delta": [cuda[1], cuda[2]]}
    tracker = BusyTracker()
    controller = PstateController(FakeNvml(rig), RecordingBackend(rig), tracker, low=LOW,
                                  high=HIGH, low_delay_s=low_delay_s)
    busy: dict[str, list[tuple[float, float]]] = {name: [] for name in layout}
    opened: dict[str, float] = {}

    def edge(name: str, is_busy: bool, t: float) -> None:
        if is_busy:
            opened[name] = t
        else:
            busy[name].append((opened.pop(name), t))

    tracker.add_listener(edge)
    for name, gpus in layout.items():
        controller.set_instance_gpus(name, [g.uuid for g in gpus])
    servers = {name: Server(binary, model, free_port()) for name in layout}
    rng = random.Random(seed)
    async with trio.open_nursery() as nursery, \
            httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        for name, server in servers.items():
            await nursery.start(server.run, lambda line, stamp, n=name: tracker.feed(
                n, line, trio.current_time()))
        await nursery.start(controller.run)
        with trio.fail_after(SWITCH_TIMEOUT_S):
            while any(controller.control(g.uuid).applied != LOW for g in rig.gpus):
                await trio.sleep(0.01)
        start = trio.current_time()
        before = {g["uuid"]: g["seconds_low"] for g in controller.status(start)["gpus"]}
        stop = start + seconds

        async def worker(url: str, until: float) -> None:
            while trio.current_time() < until:
                r = await client.post(f"{url}/completion", json={
                    "prompt": "replay", "n_predict": REPLAY_N_PREDICT})
                r.raise_for_status()

        async def drive(name: str) -> None:
            while trio.current_time() < stop:
                await trio.sleep(rng.uniform(*GAP_S))
                until = min(stop, trio.current_time() + rng.uniform(*BURST_S))
                async with trio.open_nursery() as burst:
                    for _ in range(CONCURRENCY):
                        burst.start_soon(worker, servers[name].url, until)

        async with trio.open_nursery() as drivers:
            for name in layout:
                drivers.start_soon(drive, name)
        end = trio.current_time()
        after = {g["uuid"]: g["seconds_low"] for g in controller.status(end)["gpus"]}
        nursery.cancel_scope.cancel()
    wall = end - start
    for name, t in opened.items():  # still busy at the end
        busy[name].append((t, end))
    rows = []
    for index, gpu in enumerate(cuda):
        spans = [(max(a, start), min(b, end)) for name, gpus in layout.items() if gpu in gpus
                 for a, b in busy[name] if b > start]
        busy_frac = union_length(spans) / wall
        low_frac = (after[gpu.uuid] - before[gpu.uuid]) / wall
        allowed = allowed_low(spans, start, end, low_delay_s) / wall
        rows.append([f"GPU {index} ({gpu.pci_bus_id})", f"{wall:.1f}", f"{busy_frac:.1%}",
                     f"{1 - busy_frac:.1%}", f"{allowed:.1%}", f"{low_frac:.1%}",
                     f"{(low_frac - allowed) * 100:+.1f} pt"])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in [header, *rows])


async def main(args: argparse.Namespace) -> None:
    binary = find_llama_server()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny.gguf", TinyModelSpec())
        samples = await latency(binary, model, args.tasks)
        ms = [s * 1000 for s in samples]
        p99 = percentile(ms, 0.99)
        print(f"llama-server: {binary}")
        print(table(["measure", "tasks", "p50 ms", "p99 ms", "max ms", "mean ms", "target"], [[
            "'processing task' line -> P-state call", str(len(ms)),
            f"{percentile(ms, 0.5):.2f}", f"{p99:.2f}", f"{max(ms):.2f}",
            f"{statistics.fmean(ms):.2f}",
            f"p99 <= {TARGET_P99_MS:g} ms: {'ok' if p99 <= TARGET_P99_MS else 'MISSED'}"]]))
        print()
        rows = await replay(binary, model, args.replay_s, args.seed, args.low_delay_s)
        print(f"bursty replay, low_delay_s = {args.low_delay_s:g}")
        print(table(["gpu", "wall s", "busy", "idle", "low allowed", "low", "low - allowed"],
                    rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000, help="sequential tasks to time")
    parser.add_argument("--replay-s", type=float, default=30.0, help="length of the replay")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--low-delay-s", type=float, default=REPLAY_LOW_DELAY_S,
                        help="the policy's low delay during the replay")
    trio.run(main, parser.parse_args())
