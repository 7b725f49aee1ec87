"""The report wire schema (shared.reports): every field validated, round trips, and the
agent's numbered ring (inference_node.report.buffer)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from inference_node.report.buffer import ReportBuffer
from shared.reports import (
    BusyReport,
    CycleReport,
    GpuReport,
    InstanceReport,
    ReportBatch,
    ReportError,
    ReportReply,
    decode_batch,
    decode_reply,
    encode_record,
)

GPU = GpuReport(1, 1764650000.5, "GPU-1", utilization_pct=97.0, memory_used_mib=20480.0,
                memory_total_mib=24576.0, temperature_c=71.0, power_w=180.2, pstate_wanted=16,
                pstate_read=0)
INSTANCE = InstanceReport(2, 1764650001.0, "qwen", "crashed", "BACKOFF", "exited with code 1")
CYCLE = CycleReport(3, 1764650900.0, "slept", "slept and resumed",
                    (("stopping instances", 0.01), ("suspend command", 0.5)),
                    idle_to_suspend_s=0.5, suspend_to_resume_s=2.0, resume_to_ready_s=4.1)

BUSY = BusyReport(4, 1764650960.0, "GPU-1", 1764650950.25, 1764650960.0)


def batch_json(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(ReportBatch("box", "abc123", (GPU, INSTANCE, CYCLE)).encode())
    obj.update(changes)
    return obj


def test_a_batch_round_trips_every_kind() -> None:
    batch = ReportBatch("box", "abc123", (GPU, INSTANCE, CYCLE, BUSY), dropped=4)
    assert decode_batch(batch.encode()) == batch
    assert GPU.memory_pct == pytest.approx(83.33, abs=0.01)
    reply = ReportReply("box", "abc123", 3, 1)
    assert decode_reply(reply.encode()) == reply


@pytest.mark.parametrize(("record", "message"), [
    ({"kind": "disk"}, "records[0].kind: found 'disk'; allowed: gpu, instance, cycle"),
    ({**encode_record(GPU), "fan": 1}, "records[0].fan: unknown field"),
    ({**encode_record(BUSY), "end": 1.0}, "records[0].end: found 1.0 before start"),
    ({**encode_record(BUSY), "start": None}, "records[0].start: found None; expected a finite"),
    ({**encode_record(GPU), "seq": 0}, "records[0].seq: found 0; sequence numbers start at 1"),
    ({**encode_record(GPU), "seq": True}, "records[0].seq: found True; expected a count"),
    ({**encode_record(GPU), "t": "now"}, "records[0].t: found 'now'; expected a finite number"),
    ({**encode_record(GPU), "temperature_c": float("nan")}, "records[0].temperature_c: found nan"),
    ({**encode_record(GPU), "pstate_read": 17}, "records[0].pstate_read: found 17; expected 0..16"),
    ({**encode_record(GPU), "gpu_uuid": ""}, "records[0].gpu_uuid: found ''"),
    ({**encode_record(INSTANCE), "change": "exploded"},
     "records[0].change: found 'exploded'; allowed: loaded, unloaded, crashed"),
    ({**encode_record(CYCLE), "outcome": "napped"}, "records[0].outcome: found 'napped'"),
    ({**encode_record(CYCLE), "steps": [["x", -1]]}, "records[0].steps[0]: found ['x', -1]"),
    ({**encode_record(CYCLE), "resume_to_ready_s": -2},
     "records[0].resume_to_ready_s: found -2; expected a finite number >= 0"),
])
def test_a_bad_record_is_refused_naming_its_field(record: dict[str, Any], message: str) -> None:
    with pytest.raises(ReportError) as caught:
        decode_batch(batch_json(records=[record]))
    assert str(caught.value).startswith(message)


def test_a_batch_out_of_order_or_malformed_is_refused() -> None:
    records = [encode_record(GPU), encode_record(GPU)]
    with pytest.raises(ReportError, match=r"records\[1\].seq: 1 after 1; expected rising"):
        decode_batch(batch_json(records=records))
    for bad, message in [(b"{", "not valid JSON"), (b"[]", "found list; expected a JSON object"),
                         (json.dumps(batch_json(node="")), "node: found ''"),
                         (json.dumps(batch_json(records={})), "records: found dict"),
                         (json.dumps(batch_json(extra=1)), "extra: unknown field"),
                         (json.dumps(batch_json(dropped=-1)), "dropped: found -1")]:
        with pytest.raises(ReportError, match=message):
            decode_batch(bad)


def test_the_buffer_numbers_records_keeps_them_until_stored_and_drops_the_oldest() -> None:
    buffer = ReportBuffer(capacity=3)
    seqs = [buffer.add(GPU).seq for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert [r.seq for r in buffer.oldest(10)] == [3, 4, 5]  # 1 and 2 were pushed out
    assert buffer.dropped == 2
    assert [r.seq for r in buffer.oldest(2)] == [3, 4]
    assert [r.seq for r in buffer.oldest(2)] == [3, 4]  # taking a batch does not remove it
    assert buffer.stored_through(4) == 2
    assert [r.seq for r in buffer.oldest(10)] == [5]
    assert buffer.stored_through(4) == 0  # a repeated acknowledgement changes nothing
    assert (buffer.stored, buffer.last_seq, len(buffer)) == (2, 5, 1)


def test_records_pushed_out_of_a_batch_on_its_way_count_as_dropped_only_if_not_stored() -> None:
    buffer = ReportBuffer(capacity=3)
    for _ in range(3):
        buffer.add(GPU)
    buffer.sending(buffer.oldest(3))  # 1..3 on their way
    buffer.add(GPU)
    buffer.add(GPU)  # 1 and 2 pushed out meanwhile
    assert buffer.dropped == 0
    assert buffer.stored_through(3) == 1  # the answer covers them: stored, not lost
    assert (buffer.dropped, buffer.stored) == (0, 3)
    buffer.sending(buffer.oldest(2))  # 4, 5
    for _ in range(3):
        buffer.add(GPU)  # 6, 7, 8: 4 and 5 pushed out; then no answer
    buffer.send_failed()
    assert (buffer.dropped, buffer.stored) == (2, 3)
    assert [r.seq for r in buffer.oldest(5)] == [6, 7, 8]
    buffer.add(GPU)  # 6 pushed out with nothing on its way: dropped at once
    assert buffer.dropped == 3
