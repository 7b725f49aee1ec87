"""Report intake benchmark: what the proxy spends on the nodes' reports.

Run: ``.venv/bin/python benchmarks/report_intake_bench.py [--batches N] [--records R]``.
Prints one table: bytes per GPU record on the wire, and per batch of R GPU records the time to
decode it (``shared.reports.decode_batch``, every field checked) and to store it
(``ReportIntake.receive`` into a ``MemorySink``, the alert policy looking at each record), as
median and p99 over N batches, and the records per second that makes on one core. A node
with 4 GPUs sampled every 10 s sends 0.4 records/s: the numbers say how far that is from
mattering on a small always-on box.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_proxy.alerts.policy import AlertPolicy  # noqa: E402
from edge_proxy.reports.intake import ReportIntake  # noqa: E402
from edge_proxy.reports.sink import MemorySink  # noqa: E402
from shared.config.edge import AlertsConfig  # noqa: E402
from shared.reports import GpuReport, Report, ReportBatch, decode_batch  # noqa: E402


def batch(first_seq: int, records: int) -> bytes:
    t = time.time()
    return ReportBatch("gpubox", "0123456789ab", tuple(
        GpuReport(first_seq + i, t + i, f"GPU-{i % 4:08d}-0000-0000-0000-000000000000",
                  utilization_pct=97.0, memory_used_mib=20480.0, memory_total_mib=24576.0,
                  temperature_c=71.0, power_w=180.2, pstate_wanted=16, pstate_read=0)
        for i in range(records))).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--records", type=int, default=200)
    args = parser.parse_args()
    policy = AlertPolicy(AlertsConfig())

    def alerts(node: str, record: Report) -> None:  # what the alert runner does, without I/O
        policy.admit(policy.report(node, record), 0.0)

    intake = ReportIntake(MemorySink(), alerts, CollectorRegistry())
    decode_s, store_s = [], []
    size = 0
    for n in range(args.batches):
        data = batch(1 + n * args.records, args.records)
        size = len(data)
        t0 = time.perf_counter()
        decoded = decode_batch(data)
        t1 = time.perf_counter()
        intake.receive(decoded)
        t2 = time.perf_counter()
        decode_s.append(t1 - t0)
        store_s.append(t2 - t1)
    total = [d + s for d, s in zip(decode_s, store_s, strict=True)]

    def ms(values: list[float], q: float) -> str:
        return f"{sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000:.2f}"

    print(f"bytes per GPU record: {size / args.records:.0f} (batch of {args.records}: "
          f"{size} bytes)")
    print(f"{'step':<8}{'median ms':>11}{'p99 ms':>9}")
    for name, values in (("decode", decode_s), ("store", store_s), ("total", total)):
        print(f"{name:<8}{ms(values, 0.5):>11}{ms(values, 0.99):>9}")
    print(f"records/s on one core: {args.records / statistics.median(total):,.0f}")


if __name__ == "__main__":
    main()
