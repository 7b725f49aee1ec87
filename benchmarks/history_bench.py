"""History store throughput: sustained request rows per second, and what a record call costs
the caller (the event loop's side).

For each batch size, records ``--rows`` request rows as fast as one caller thread can, with the
writer thread draining the queue into a fresh SQLite file (WAL) in a temporary folder, and
measures the time until every row is on disk (``close()`` returned). A row dropped because the
queue was full counts against the rate. Then it reads the newest 100 rows back as the CLI does.

Target: >= 2,000 requests/s sustained with nothing dropped; record calls of a few
microseconds.

    .venv/bin/python benchmarks/history_bench.py [--rows 200000] [--batch 100 500 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from edge_proxy.history import query
from edge_proxy.history.hooks import RequestLog
from edge_proxy.history.records import RequestRecord
from edge_proxy.history.store import QUEUE_ROWS, HistoryRecorder, NullRecorder, StoreLimits

TARGET_ROWS_PER_S = 2000
# Pace the caller in slices so the queue never fills: the sustained rate, not a burst
PACE_SLICE_ROWS = 1000


def _row(i: int, now: float) -> RequestRecord:
    return RequestRecord(
        t=now + i * 1e-4, route="0.0.0.0:8000", node="gpubox", model="qwen2.5-7b-instruct",
        method="POST", path="/v1/chat/completions", status=200, outcome="relayed", held_ms=0.0,
        ttfb_ms=180.5, total_ms=2400.0, prompt_tokens=512, predicted_tokens=256,
        prompt_per_s=1800.0, predicted_per_s=45.2)


def run(folder: Path, rows: int, batch: int) -> dict[str, float]:
    path = folder / f"bench-{batch}.sqlite3"
    recorder = HistoryRecorder(path, StoreLimits(retention_days=3650, max_bytes=1 << 40),
                               batch_rows=batch)
    recorder.start()
    now = time.time()
    records = [_row(i, now) for i in range(rows)]
    call_s = 0.0
    started = time.perf_counter()
    for first in range(0, rows, PACE_SLICE_ROWS):
        # wait for room instead of dropping: this measures what the writer sustains
        while recorder.counts.written + QUEUE_ROWS - PACE_SLICE_ROWS < first:
            time.sleep(0.001)
        t0 = time.perf_counter()
        for record in records[first:first + PACE_SLICE_ROWS]:
            recorder.record_request(record)
        call_s += time.perf_counter() - t0
    recorder.close()
    elapsed = time.perf_counter() - started
    t0 = time.perf_counter()
    with query.open_readonly(path) as conn:
        newest = query.requests(conn, query.Filter(limit=100))
    read_ms = (time.perf_counter() - t0) * 1000
    assert len(newest) == 100
    c = recorder.counts
    return {"batch": batch, "rows_per_s": c.written / elapsed, "written": c.written,
            "dropped": c.dropped_full + c.dropped_error, "call_us": call_s / rows * 1e6,
            "read_ms": read_ms, "mib": path.stat().st_size / (1 << 20)}


def request_path_us(requests: int = 20_000) -> tuple[float, float]:
    """Microseconds one request spends in ``RequestLog`` (hold, first byte, body, finish)
    with a realistic answer: a JSON body, and a 256-event SSE stream."""
    body = (b'{"choices":[{"message":{"content":"' + b"x" * 2000 + b'"}}],"usage":'
            b'{"prompt_tokens":22,"completion_tokens":8},"timings":{"prompt_n":22,'
            b'"predicted_n":8,"prompt_per_second":900.1,"predicted_per_second":61.2}}')
    events = [b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'] * 255 + [
        b'data: {"choices":[],"timings":{"predicted_n":256}}\n\ndata: [DONE]\n\n']
    out = []
    for content_type, chunks in (("application/json", [body]), ("text/event-stream", events)):
        n = requests if len(chunks) == 1 else requests // 20
        t0 = time.perf_counter()
        for _ in range(n):
            log = RequestLog(NullRecorder(), "r", "POST", "/v1/chat/completions",
                             clock=time.monotonic, wall=time.time)
            log.routed("gpubox", "m")
            log.response_started(200, content_type)
            for chunk in chunks:
                log.body(chunk)
            log.finish()
        out.append((time.perf_counter() - t0) / n * 1e6)
    return out[0], out[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 500, 2000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="history-bench-") as tmp:
        results = [run(Path(tmp), args.rows, b) for b in args.batch]
    print(f"{'batch rows':>10}  {'rows/s':>9}  {'written':>8}  {'dropped':>7}  "
          f"{'call us':>7}  {'read 100 ms':>11}  {'file MiB':>8}")
    for r in results:
        print(f"{r['batch']:>10.0f}  {r['rows_per_s']:>9.0f}  {r['written']:>8.0f}  "
              f"{r['dropped']:>7.0f}  {r['call_us']:>7.2f}  {r['read_ms']:>11.2f}  "
              f"{r['mib']:>8.1f}")
    json_us, sse_us = request_path_us()
    print(f"request path: {json_us:.1f} us per JSON answer, {sse_us:.1f} us per 256-event "
          "stream (RequestLog and the timings parser)")
    ok = all(r["rows_per_s"] >= TARGET_ROWS_PER_S and r["dropped"] == 0 for r in results)
    print(f"target >= {TARGET_ROWS_PER_S} rows/s sustained, none dropped: "
          f"{'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
