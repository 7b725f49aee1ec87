"""Sleep and wake end to end, across two network namespaces (see tests/support/netns.py).

The edge-proxy on the "router", the node-agent with a real llama-server on the "gpu box". When
the box "sleeps" its incoming TCP is dropped (connections time out, as to a suspended machine)
and the agent is frozen; only a correct magic packet wakes it, after which the deploy sleep
hook's ``post`` tells the agent.

This file runs as its own pytest process inside the router namespace, started by
``tests/test_e2e_netns.py`` (a whole process there, so every thread it starts is there too).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from shared.tiny_gguf import TinyModelSpec, write_tiny_model
from tests.support.netns import (
    HOSTS_ENV,
    SLOT_CTX,
    Completion,
    Hosts,
    Stack,
    complete,
    start,
    stop,
)

CYCLES = 20
CLIENTS = 16
IDLE_TIMEOUT_S = 2.0
WAIT_S = 180.0  # bounds a hang on a loaded 2-core machine; never a speed check


@pytest.fixture
def hosts() -> Hosts:
    """The namespaces ``tests/test_e2e_netns.py`` made; this process runs in the router one."""
    made = os.environ.get(HOSTS_ENV)
    if not made:
        pytest.fail(f"run through tests/test_e2e_netns.py (it sets {HOSTS_ENV})", pytrace=False)
    return Hosts(**json.loads(made))


async def until(condition: Callable[[], bool], what: str) -> None:
    with trio.fail_after(WAIT_S):
        while not condition():
            await trio.sleep(0.01)


async def clients(address: tuple[str, int], count: int, **kwargs: object) -> list[Completion]:
    results: list[Completion] = []

    async def one() -> None:
        results.append(await complete(address, **kwargs))  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return results


def slept(stack: Stack) -> int:
    return sum(1 for what, _ in stack.sleeps() if what == "asleep")


def woke(stack: Stack) -> int:
    return sum(1 for what, _ in stack.sleeps() if what == "awake")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """The default tiny llama, trained (so to speak) for a slot's whole context."""
    return write_tiny_model(tmp_path / "tiny-long.gguf", TinyModelSpec(n_ctx_train=SLOT_CTX))


@pytest.fixture
async def stacks(nursery: trio.Nursery, tmp_path: Path, hosts: Hosts, model: Path,
                 llama_server_bin: Path) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    """Start a proxy and an agent whose llama-server is READY; stop them whatever happens."""
    made: list[Stack] = []

    async def make(idle_timeout_s: float = IDLE_TIMEOUT_S, **power: Any) -> Stack:
        stack = await start(nursery, tmp_path, hosts, model, llama_server_bin,
                            idle_timeout_s=idle_timeout_s, power=power)
        made.append(stack)
        with trio.fail_after(WAIT_S):
            while not await stack.instances_ready():
                assert stack.agent.returncode is None, stack.agent_log.read_text()[-3000:]
                await trio.sleep(0.05)
        return stack

    yield make
    for stack in made:
        await stop(stack)


async def test_twenty_cycles_of_sleep_and_one_wake_for_sixteen_held_clients(
        stacks: Callable[..., Awaitable[Stack]]) -> None:
    stack = await stacks()
    address = stack.proxy.route_address()
    reference = await complete(address)
    assert reference.done and reference.text and reference.tokens > 0
    for cycle in range(1, CYCLES + 1):
        awake = await clients(address, 4)  # clients stream completions, then stop
        assert [r.text for r in awake] == [reference.text] * 4
        await until(lambda n=cycle: slept(stack) == n, f"cycle {cycle}: asleep")
        assert woke(stack) == cycle - 1
        # The proxy agreed to the suspend; it learns the host is gone from the next probe.
        assert stack.node()["state"] in ("DRAINING", "ASLEEP")
        held = await clients(address, CLIENTS)  # they connect while it sleeps
        assert all(r.done and r.tokens == reference.tokens for r in held), f"cycle {cycle}: cut"
        assert [r.text for r in held] == [reference.text] * CLIENTS, f"cycle {cycle}"
        assert (slept(stack), woke(stack)) == (cycle, cycle), "one wake per sleep"
    power = await stack.agent_get("/v1/power")
    outcomes = [h["outcome"] for h in power["history"]]  # the last five cycles
    if outcomes[-1] == "running":  # idle again: the next suspend has begun
        outcomes.pop()
    assert outcomes and set(outcomes) == {"slept and resumed"}


async def test_a_stream_longer_than_the_idle_timeout_is_never_cut(
        stacks: Callable[..., Awaitable[Stack]]) -> None:
    stack = await stacks(idle_timeout_s=1.0)
    address = stack.proxy.route_address()
    # Sized on this machine to stream for about 4 idle timeouts (the tiny model is fast),
    # from the second of two samples (the first one also warms llama-server up).
    for _ in range(2):
        started = trio.current_time()
        sample = await complete(address, n_predict=400)
        rate = sample.tokens / (trio.current_time() - started)
    tokens = min(SLOT_CTX - 200, max(400, int(rate * 4.0)))
    await until(lambda: slept(stack) == 1, "asleep after the sample")
    started = trio.current_time()
    long = await complete(address, n_predict=tokens)  # wakes the node, then streams
    took = trio.current_time() - started
    assert long.done and long.tokens == tokens  # not cut
    assert took > 2.0, f"{tokens} tokens took only {took:.2f} s; the test proves nothing"
    assert slept(stack) == 1  # not while it streamed
    await until(lambda: slept(stack) == 2, "asleep once the stream ended")


async def test_a_connection_during_the_suspend_sequence_is_served_after_the_next_wake(
        stacks: Callable[..., Awaitable[Stack]]) -> None:
    stack = await stacks()
    address = stack.proxy.route_address()
    reference = await complete(address)
    await until(lambda: stack.node()["state"] == "DRAINING", "suspend sequence begun")
    late = await complete(address)  # held while the agent stops llama-server and sleeps
    assert late.done and late.text == reference.text
    assert (slept(stack), woke(stack)) == (1, 1)


async def test_a_frozen_box_is_not_reachable_until_the_magic_packet(
        stacks: Callable[..., Awaitable[Stack]]) -> None:
    """The harness itself: while asleep, TCP to the box times out (not refused)."""
    stack = await stacks()
    await until(lambda: slept(stack) == 1, "asleep")
    with trio.move_on_after(1.0) as scope:
        await trio.open_tcp_stream("10.201.0.2", 9181)
    assert scope.cancelled_caught, "the agent API answered while the box slept"
    assert _is_stopped(stack.agent.pid)


def _is_stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "T"



async def test_a_proxy_veto_aborts_the_suspend(stacks: Callable[..., Awaitable[Stack]]) -> None:
    # The agent does not count connections itself here, so only the proxy can say no.
    stack = await stacks(watch_connections=False)
    conn = await trio.open_tcp_stream(*stack.proxy.route_address())  # open, in flight
    await conn.send_all(b"GET /health HTTP/1.1\r\nhost: gpubox\r\n\r\n")

    async def vetoes() -> list[str]:
        power = await stack.agent_get("/v1/power")
        return [h["outcome"] for h in power["history"] if h["outcome"].startswith("vetoed")]

    with trio.fail_after(WAIT_S):
        while not await vetoes():
            await trio.sleep(0.1)
    assert "proxy vetoed" in (await vetoes())[0]
    assert slept(stack) == 0 and await stack.instances_ready()
    await conn.aclose()
    await until(lambda: slept(stack) == 1, "asleep once the connection closed")


async def test_a_failed_suspend_brings_the_instances_back(
        stacks: Callable[..., Awaitable[Stack]]) -> None:
    stack = await stacks(suspend_command=["sh", "-c", "echo 'Failed to suspend: denied' >&2; exit 1"])

    async def power() -> dict[str, Any]:
        return dict(await stack.agent_get("/v1/power"))

    with trio.fail_after(WAIT_S):
        while (await power())["state"] != "FAILED":
            await trio.sleep(0.1)
    assert "exited 1: Failed to suspend: denied" in (await power())["last_error"]
    with trio.fail_after(WAIT_S):
        while not await stack.instances_ready():
            await trio.sleep(0.1)
    answer = await complete(stack.proxy.route_address())  # served, no wake needed
    assert answer.done and stack.node()["packets_sent"] == 0
