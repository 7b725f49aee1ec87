"""How close the VRAM estimate is to what llama-server really allocates.

Writes tiny models of several shapes (plain llama, GQA, tied embeddings, sliding-window
attention, attention biases, experts, and a few layers as wide as a 7B model's), loads each in the real llama-server (``-lv 4``) at
several context / slot / KV-cache settings, reads the ``model``, ``KV`` and ``compute``
buffer sizes it reports per device, and prints them beside the estimate. Multi-device runs
use two ggml RPC servers on 127.0.0.1 as devices (``--rpc``), so the per-device layer split
is checked against a real split.

The cases cover every setting an instance may use: quantized weights the CPU backend
repacks (Q4_0: a ``CPU_REPACK`` buffer beside ``CPU_Mapped``, on the host and on the host
share of a partial offload), several devices with several slots and flash attention off
(pipeline parallelism's compute buffers), partial offload (``-ngl`` below the layer count)
on one and two devices, a unified KV cache with slots, and smaller batches.

Targets: weights and KV within 1% of the reported MiB; compute within 15%; total within
3% (a gap below llama-server's printing resolution passes). Exit status 1 when any row
misses a target; the misses are listed after the table.

Usage: ``python benchmarks/placement_accuracy.py [--quick] [--shapes A,B] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from inference_node.placement.args import settings_from_args
from inference_node.placement.estimate import DeviceEstimate, DeviceSpec, estimate
from inference_node.placement.ggml_sizes import mib
from inference_node.placement.gguf_info import read_model
from inference_node.placement.measured import MeasuredDevice, parse_memory
from shared.llama_bin import find_llama_server, find_rpc_server
from shared.tiny_gguf import TinyModelSpec, write_tiny_model

LOOPBACK: Final = "127.0.0.1"
LOAD_TIMEOUT_S: Final = 120.0
RPC_READY_TIMEOUT_S: Final = 30.0
RPC_POLL_S: Final = 0.05
TERM_GRACE_S: Final = 5.0
# llama-server has allocated everything once it sets up its slots.
LOADED_MARKERS: Final = ("load_model: initializing", "server is listening", "main: model loaded")

WEIGHTS_KV_TOLERANCE: Final = 0.01
COMPUTE_TOLERANCE: Final = 0.15
# llama-server prints two decimals: below this a difference is the printing, not the estimate
PRINT_RESOLUTION_MIB: Final = 0.01
TOTAL_TOLERANCE: Final = 0.03

SHAPES: Final[dict[str, TinyModelSpec]] = {
    "llama": TinyModelSpec(n_layer=8, n_embd=512, n_ff=1536, n_head=8, n_ctx_train=32768,
                           tensor_type="F16"),
    "llama-gqa": TinyModelSpec(n_layer=12, n_embd=512, n_ff=1408, n_head=16, n_head_kv=4,
                               n_ctx_train=32768, tensor_type="F16"),
    "llama-tied-q8": TinyModelSpec(n_layer=8, n_embd=384, n_ff=1024, n_head=6, n_head_kv=2,
                                   n_ctx_train=32768, tied_embeddings=True, tensor_type="Q8_0"),
    "gemma2-swa": TinyModelSpec(family="gemma2", n_layer=8, n_embd=512, n_ff=1024, n_head=8,
                                n_head_kv=4, sliding_window=256, tied_embeddings=True,
                                n_ctx_train=32768, tensor_type="F16"),
    "qwen2-bias": TinyModelSpec(family="qwen2", n_layer=8, n_embd=448, n_ff=1216, n_head=7,
                                n_head_kv=1, n_ctx_train=32768, tensor_type="F16"),
    "llama-moe": TinyModelSpec(n_layer=6, n_embd=256, n_ff=512, n_head=8, n_head_kv=2,
                               n_expert=8, n_expert_used=2, n_ctx_train=32768, tensor_type="F16"),
    # a 7B-wide layer (few of them, ~140 MiB): the activation terms at real widths
    "wide-q8": TinyModelSpec(n_layer=3, n_embd=2048, n_ff=5632, n_head=16, n_head_kv=4,
                             n_ctx_train=32768, tensor_type="Q8_0"),
    # Q4_0 matrices are repacked on an AVX2 / Arm dot-product CPU (CPU_REPACK); the output
    # matrix (262 vocab rows, not a multiple of 8) stays mapped
    "llama-q4": TinyModelSpec(n_layer=8, n_embd=512, n_ff=1536, n_head=8, n_head_kv=4,
                              n_ctx_train=32768, tensor_type="Q4_0"),
}

# llama-server flags per run (memory-relevant ones; the estimate reads the same list)
SINGLE_RUNS: Final = (
    ("-c", "4096"),
    ("-c", "8192", "-np", "2", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"),
    ("-c", "16384", "-np", "1", "-fa", "off", "-ub", "256"),
    ("-c", "8192", "-np", "2", "-kvu", "-b", "512", "-ub", "128"),
    ("-c", "4096", "--no-repack"),
)
# (RPC devices, flags)
RPC_RUNS: Final = (
    (1, ("-c", "8192", "-ngl", "99")),
    (1, ("-c", "4096", "-ngl", "99", "-fa", "off")),
    (2, ("-c", "8192", "-ngl", "99", "-ts", "1,3")),
    (2, ("-c", "4096", "-np", "3", "-ngl", "99", "-ts", "2,1", "-fa", "off")),
    (2, ("-c", "8192", "-ngl", "5", "-ts", "1,1", "-ctk", "q8_0")),
    # pipeline parallelism with slots and no flash attention
    (2, ("-c", "8192", "-np", "2", "-ngl", "99", "-ts", "1,1", "-fa", "off")),
    (2, ("-c", "4096", "-np", "4", "-kvu", "-ngl", "99", "-ts", "3,1", "-fa", "off")),
    # partial offload on one device: the rest (and its repacked weights) on the host
    (1, ("-c", "4096", "-ngl", "3")),
    (1, ("-c", "4096", "-np", "2", "-ngl", "2", "-fa", "off")),
)
QUICK_SHAPES: Final = ("llama-gqa", "gemma2-swa", "llama-q4")


@dataclass
class Row:
    shape: str
    flags: str
    device: str
    est: DeviceEstimate
    got: MeasuredDevice

    def errors(self) -> dict[str, float]:
        """Relative error per component (estimate / measured - 1); 0 when both are 0."""
        pairs = {"weights": (mib(self.est.weights), self.got.model),
                 "kv": (mib(self.est.kv), self.got.kv),
                 "compute": (mib(self.est.compute), self.got.compute),
                 "total": (mib(self.est.total), self.got.total)}
        return {k: (e / g - 1 if g else (0.0 if abs(e) < 0.01 else float("inf")))
                for k, (e, g) in pairs.items()}

    def gaps(self) -> dict[str, float]:
        """Absolute difference per component in MiB."""
        return {"weights": abs(mib(self.est.weights) - self.got.model),
                "kv": abs(mib(self.est.kv) - self.got.kv),
                "compute": abs(mib(self.est.compute) - self.got.compute),
                "total": abs(mib(self.est.total) - self.got.total)}

    def ok(self) -> bool:
        err, gap = self.errors(), self.gaps()

        def within(key: str, tolerance: float, slack: float = PRINT_RESOLUTION_MIB) -> bool:
            return abs(err[key]) <= tolerance or gap[key] <= slack

        return (within("weights", WEIGHTS_KV_TOLERANCE) and within("kv", WEIGHTS_KV_TOLERANCE)
                and within("compute", COMPUTE_TOLERANCE)
                and within("total", TOTAL_TOLERANCE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(TERM_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load_and_measure(server: Path, model: Path, flags: Sequence[str]) -> list[str]:
    """Start llama-server, collect its log until the model is loaded, stop it."""
    argv = [str(server), "-m", str(model), "--host", LOOPBACK, "--port", str(free_port()),
            "-lv", "4", "-fit", "off", "--no-warmup", "-t", "1", *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if any(m in line for m in LOADED_MARKERS) or time.monotonic() > deadline:
                break
    finally:
        stop(proc)
    if not any(any(m in line for m in LOADED_MARKERS) for line in lines):
        tail = "\n".join(lines[-15:])
        raise RuntimeError(f"llama-server did not load {model.name} with {' '.join(flags)}:\n{tail}")
    return lines


class RpcDevices:
    """Two ggml RPC servers on loopback, started fresh for each load (they serve one client)."""

    def __init__(self, binary: Path, count: int = 2) -> None:
        self.binary = binary
        self.count = count
        self.procs: list[subprocess.Popen[str]] = []
        self.endpoints: list[str] = []

    def __enter__(self) -> list[str]:
        for _ in range(self.count):
            port = free_port()
            proc = subprocess.Popen([str(self.binary), "-H", LOOPBACK, "-p", str(port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
            self.procs.append(proc)
            self.endpoints.append(f"{LOOPBACK}:{port}")
            wait_accepting(port)
        return self.endpoints

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            stop(proc)


def wait_accepting(port: int) -> None:
    deadline = time.monotonic() + RPC_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=RPC_POLL_S):
                return
        except OSError:
            time.sleep(RPC_POLL_S)
    raise RuntimeError(f"RPC server on port {port} did not accept within {RPC_READY_TIMEOUT_S} s")


def run_single(server: Path, shape: str, path: Path, flags: Sequence[str]) -> list[Row]:
    model = read_model(path)
    got = parse_memory(load_and_measure(server, path, flags))
    est = estimate(model, settings_from_args(flags), [])
    return [Row(shape, " ".join(flags), "CPU", est.host, got.host)]


def run_rpc(server: Path, rpc_bin: Path, shape: str, path: Path, n_devices: int,
            flags: Sequence[str]) -> list[Row]:
    model = read_model(path)
    with RpcDevices(rpc_bin, n_devices) as endpoints:
        lines = load_and_measure(server, path, [*flags, "--rpc", ",".join(endpoints)])
    got = parse_memory(lines)
    devices = [DeviceSpec(f"RPC{i}", "rpc") for i in range(len(endpoints))]
    est = estimate(model, settings_from_args(flags), devices)
    rows = []
    for ep, dev in zip(endpoints, est.devices, strict=True):
        measured = next((m for name, m in got.devices.items() if name.endswith(f"[{ep}]")),
                        MeasuredDevice())
        rows.append(Row(shape, " ".join(flags), f"{dev.name}/{n_devices}", dev, measured))
    rows.append(Row(shape, " ".join(flags), f"host/{n_devices}", est.host, got.host))
    return rows


def print_table(rows: Sequence[Row]) -> None:
    head = (f"{'shape':<14} {'flags':<46} {'device':<12} {'weights est/got':>17} "
            f"{'KV est/got':>15} {'compute est/got':>17} {'total est/got':>17} {'err%':>6} ok")
    print(head)
    print("-" * len(head))
    for r in rows:
        e, g = r.est, r.got
        print(f"{r.shape:<14} {r.flags[:46]:<46} {r.device:<12} "
              f"{mib(e.weights):>8.2f}/{g.model:<8.2f} {mib(e.kv):>7.2f}/{g.kv:<7.2f} "
              f"{mib(e.compute):>8.2f}/{g.compute:<8.2f} {mib(e.total):>8.2f}/{g.total:<8.2f} "
              f"{100 * r.errors()['total']:>+6.1f} {'yes' if r.ok() else 'NO'}")


def print_misses(rows: Sequence[Row]) -> None:
    """Each row that misses a target, with the components that miss and by how much."""
    misses = [r for r in rows if not r.ok()]
    if not misses:
        return
    limits = {"weights": WEIGHTS_KV_TOLERANCE, "kv": WEIGHTS_KV_TOLERANCE,
              "compute": COMPUTE_TOLERANCE, "total": TOTAL_TOLERANCE}
    print()
    print("misses:")
    for r in misses:
        err, gap = r.errors(), r.gaps()
        parts = [f"{k} {100 * err[k]:+.1f}% ({gap[k]:.2f} MiB)" for k, lim in limits.items()
                 if abs(err[k]) > lim and gap[k] > PRINT_RESOLUTION_MIB]
        print(f"  {r.shape} [{r.flags}] {r.device}: {', '.join(parts)}")


def summary(rows: Sequence[Row]) -> None:
    worst = {k: max(abs(r.errors()[k]) for r in rows) for k in ("weights", "kv", "compute", "total")}
    gap = max(abs(mib(r.est.compute) - r.got.compute) for r in rows)
    print()
    print(f"rows: {len(rows)}, within targets: {sum(r.ok() for r in rows)}")
    print(f"worst |error|: weights {100 * worst['weights']:.2f}%  KV {100 * worst['kv']:.2f}%  "
          f"compute {100 * worst['compute']:.1f}% (largest gap {gap:.2f} MiB)  "
          f"total {100 * worst['total']:.2f}%")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--keep", type=Path, help="write the models here instead of a temp dir")
    args = parser.parse_args(argv)
    server, rpc_bin = find_llama_server(), find_rpc_server()
    wanted = set(args.shapes.split(",")) if args.shapes else set(QUICK_SHAPES)
    unknown = wanted - set(SHAPES)
    if unknown:
        parser.error(f"--shapes: unknown {', '.join(sorted(unknown))}; expected {', '.join(SHAPES)}")
    shapes = {k: v for k, v in SHAPES.items()
              if (not args.quick and not args.shapes) or k in wanted}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for shape, spec in shapes.items():
            path = write_tiny_model(folder / f"{shape}.gguf", spec)
            for flags in SINGLE_RUNS:
                rows += run_single(server, shape, path, flags)
            for n_devices, flags in RPC_RUNS:
                rows += run_rpc(server, rpc_bin, shape, path, n_devices, flags)
    print_table(rows)
    print_misses(rows)
    summary(rows)
    return 0 if all(r.ok() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
