"""The llama-server log parser, on captured real logs, JSON formats and garbage."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest
import trio

from inference_node.activity.parser import (
    MAX_LINE_CHARS,
    AllIdle,
    BufferSize,
    ModelLoaded,
    TaskFinished,
    TaskStarted,
    parse_line,
)
from tests.support.llama import llama_server

DATA = Path(__file__).parent / "data"


def events_of(lines: list[str]) -> list[object]:
    return [e for e in map(parse_line, lines) if e is not None]


def captured(name: str) -> list[str]:
    return (DATA / name).read_text(encoding="utf-8").splitlines()


def test_captured_cpu_log_gives_three_concurrent_tasks_and_memory() -> None:
    events = events_of(captured("llama_server_lv4.log"))
    starts = [e for e in events if isinstance(e, TaskStarted)]
    ends = [e for e in events if isinstance(e, TaskFinished)]
    assert starts == [TaskStarted(2, 1), TaskStarted(1, 0), TaskStarted(0, 2)]
    assert sorted((e.slot, e.task) for e in ends) == sorted((e.slot, e.task) for e in starts)
    assert events.count(ModelLoaded()) == 1
    # The server says "all slots are idle" once loaded and once after the last release.
    assert events.count(AllIdle()) == 2
    assert events.index(ModelLoaded()) < events.index(starts[0])
    buffers = {(e.kind, e.device): e.mib for e in events if isinstance(e, BufferSize)}
    assert buffers == {("model", "CPU_Mapped"): 0.66, ("output", "CPU"): 0.0,
                       ("kv", "CPU"): 0.38, ("compute", "CPU"): 1.90}


def test_captured_rpc_log_names_each_device_buffer() -> None:
    events = events_of(captured("llama_server_rpc_lv4.log"))
    buffers = {(e.kind, e.device): e.mib for e in events if isinstance(e, BufferSize)}
    assert buffers[("model", "RPC0[127.0.0.1:33305]")] == 0.33
    assert buffers[("model", "RPC0[127.0.0.1:45449]")] == 0.27
    assert buffers[("kv", "RPC0[127.0.0.1:45449]")] == 0.19
    assert buffers[("compute", "RPC0[127.0.0.1:33305]")] == 3.55
    assert buffers[("compute", "CPU")] == 3.33
    assert len([e for e in events if isinstance(e, TaskStarted)]) == 3


def test_every_prefix_of_a_real_line_is_silent_or_the_same_event() -> None:
    """A line cut short (a partial read, a crash) never turns into some other event."""
    for line in captured("llama_server_lv4.log"):
        full = parse_line(line)
        for cut in range(len(line)):
            got = parse_line(line[:cut])
            assert got is None or got == full, (line[:cut], got)


def test_plain_lines_without_prefix_and_older_wordings() -> None:
    assert parse_line("slot launch_slot_: id  0 | task 12 | processing task") == TaskStarted(0, 12)
    assert parse_line("slot      release: id  0 | task 12 | stop processing: n_past = 40, "
                      "truncated = 0") == TaskFinished(0, 12)
    assert parse_line("srv  update_slots: all slots are idle") == AllIdle()
    assert parse_line("main: model loaded") == ModelLoaded()
    assert parse_line("llm_load_tensors:      CUDA0 buffer size =  4403.49 MiB") == \
        BufferSize("model", "CUDA0", 4403.49)
    assert parse_line("llama_kv_cache_init:      CUDA1 KV buffer size =   256.00 MiB") == \
        BufferSize("kv", "CUDA1", 256.0)
    assert parse_line("llama_new_context_with_model:      CUDA0 compute buffer size =   164.01 "
                      "MiB") == BufferSize("compute", "CUDA0", 164.01)
    assert parse_line("\x1b[32m0.00.113.045 I slot launch_slot_: id  2 | task 1 | processing "
                      "task, is_child = 0\x1b[0m") == TaskStarted(2, 1)


def test_log_jsonl_wraps_plain_lines() -> None:
    line = json.dumps({"type": "log", "time": 3003117, "level": "info",
                       "msg": "slot launch_slot_: id  1 | task 0 | processing task, is_child = 0\n"})
    assert parse_line(line) == TaskStarted(1, 0)
    line = json.dumps({"type": "log", "time": 9154, "level": "info",
                       "msg": "sched_reserve:      CUDA0 compute buffer size =     1.39 MiB\n"})
    assert parse_line(line) == BufferSize("compute", "CUDA0", 1.39)


@pytest.mark.parametrize("slot_key,task_key", [("id_slot", "id_task"), ("slot_id", "task_id")])
def test_structured_json_of_log_format_json(slot_key: str, task_key: str) -> None:
    def line(msg: str, **fields: object) -> str:
        return json.dumps({"tid": "140221", "timestamp": 1718000000, "level": "INFO",
                           "function": "update_slots", "line": 1700, "msg": msg, **fields})

    assert parse_line(line("slot is processing task", **{slot_key: 3, task_key: 41})) == \
        TaskStarted(3, 41)
    assert parse_line(line("slot released", **{slot_key: 3, task_key: 41}, n_past=80,
                           truncated=False)) == TaskFinished(3, 41)
    assert parse_line(line("all slots are idle")) == AllIdle()
    assert parse_line(line("model loaded")) == ModelLoaded()
    assert parse_line(line("slot progression", **{slot_key: 3, task_key: 41})) is None
    # Ids must be real integers.
    assert parse_line(line("slot is processing task", **{slot_key: "3", task_key: 41})) is None
    assert parse_line(line("slot is processing task", **{slot_key: True, task_key: 41})) is None
    assert parse_line(line("slot is processing task", **{slot_key: 3})) is None


def test_key_value_text_of_the_structured_era() -> None:
    """``INFO [function] message | key=value``: 2024 builds' text format, still in forks."""
    start = ('INFO [   launch_slot_with_task] slot is processing task | tid="1404" '
             "timestamp=1718000000 id_slot=1 id_task=57")
    end = ('INFO [            update_slots] slot released | tid="1404" timestamp=1718000003 '
           "id_slot=1 id_task=57 n_ctx=4096 n_past=90 n_system_tokens=0 truncated=false")
    assert parse_line(start) == TaskStarted(1, 57)
    assert parse_line(end) == TaskFinished(1, 57)
    assert parse_line('INFO [            update_slots] all slots are idle | tid="1404" '
                      "timestamp=1718000003") == AllIdle()
    assert parse_line('INFO [                    main] model loaded | tid="1404"') == ModelLoaded()
    assert parse_line('INFO [   launch_slot_with_task] slot is processing task | tid="1404" '
                      "id_slot=1") is None
    assert parse_line('INFO [            update_slots] kv cache rm [p0, end) | tid="1" '
                      "id_slot=0 id_task=0 p0=0") is None
    assert parse_line('VERB [      get_available_slot] selected slot by lcp similarity | '
                      "id_slot=0 id_task=3") is None


GARBAGE = [
    "", " ", "\x00\x01\x02", "{", "}", "{\"msg\": ", "[1,2,3]", "null", "{\"msg\": 5}",
    "{\"type\": \"log\", \"msg\": null}", "processing task", "stop processing",
    "slot launch_slot_: id  x | task 0 | processing task",
    "slot launch_slot_: id  1 | task -1 | processing task",
    "slot launch_slot_: id  1 | task",
    "slot process_sing: id  0 | task -1 | saving idle slot to prompt cache",
    "srv  log_server_r: request: {\"prompt\": \"slot launch_slot_: id 0 | task 7 | processing task\"}",
    "srv  params_from_: prompt: 'please say all slots are idle'",
    "user text: model loaded",
    "load_tensors: CUDA0 model buffer size = lots MiB",
    "\ufffd\ufffd processing task \ufffd",
    "INFO [",
    "INFO [ x] slot is processing task | id_slot=x id_task=",
    "INFO [ x] slot is processing task | id_slot=-1 id_task=2",
    "slot launch_slot_: id  1 | task 0 | processing task" + "x" * MAX_LINE_CHARS,
]


@pytest.mark.parametrize("line", GARBAGE)
def test_garbage_and_lookalikes_are_ignored(line: str) -> None:
    assert parse_line(line) is None


def test_random_mutations_never_raise_or_invent_a_task() -> None:
    rng = random.Random(1234)
    lines = captured("llama_server_lv4.log")
    alphabet = "0123456789 |:{}\"\\,.-_abcdefghijklmnopqrstuvwxyz\x00\x1b\ufffd"
    for _ in range(3000):
        base = list(rng.choice(lines))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(base) + 1)
            if rng.random() < 0.5 and base:
                del base[min(pos, len(base) - 1)]
            else:
                base.insert(pos, rng.choice(alphabet))
        mutated = "".join(base)
        event = parse_line(mutated)
        if isinstance(event, TaskStarted | TaskFinished):
            # Only a line that still reads as a task line may give a task.
            assert "processing task" in mutated or "stop processing" in mutated
            assert f"task {event.task}" in mutated.replace("  ", " ") or \
                f"task  {event.task}" in mutated


async def test_live_log_jsonl_of_the_real_binary(llama_server_bin: Path, tiny_model: Path) -> None:
    """``--log-jsonl`` lines straight from the real server parse like the plain ones."""
    args = ["--log-jsonl", "-lv", "4", "-c", "256", "-np", "1", "-t", "1"]
    async with llama_server(llama_server_bin, tiny_model, args) as server, \
            httpx.AsyncClient(timeout=60.0) as client:
        r = await client.post(f"{server.url}/completion", json={"prompt": "x", "n_predict": 4})
        r.raise_for_status()
        with trio.fail_after(60.0):
            await server.log.wait_for("stop processing")
        lines = list(server.log.lines)
    assert all(line.startswith("{") for line in lines if "processing" in line)
    events = events_of(lines)
    assert [e for e in events if isinstance(e, TaskStarted | TaskFinished)] == \
        [TaskStarted(0, 0), TaskFinished(0, 0)]
    assert ModelLoaded() in events
    assert {e.kind for e in events if isinstance(e, BufferSize)} >= {"model", "kv", "compute"}
