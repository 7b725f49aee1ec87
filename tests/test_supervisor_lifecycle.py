"""Supervisor lifecycle with real child processes (a tiny stdlib HTTP server)."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from inference_node.supervisor import LaunchOverrides, State, Supervisor
from shared.config.node import InstanceConfig
from tests.support.ports import free_port
from tests.support.supervised import (
    group_exists,
    instance,
    pid_of,
    process_alive,
    toy_command,
    wait_state,
)


@pytest.fixture
async def sup(nursery: trio.Nursery) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(ring_lines=50)
    await nursery.start(supervisor.run)
    yield supervisor


async def test_two_instances_ready_then_stopped_and_reaped(sup: Supervisor, tmp_path: Path) -> None:
    transitions: list[tuple[str, State, State]] = []
    sup.add_state_listener(lambda n, old, new, why: transitions.append((n, old, new)))
    cfgs = {n: instance(n, {"command": toy_command(free_port())}, tmp_path / "x.toml") for n in "ab"}
    await sup.apply(cfgs, {})
    await wait_state(sup, "a", State.READY)
    await wait_state(sup, "b", State.READY)
    pids = {n: pid_of(sup, n) for n in "ab"}
    assert pids["a"] != pids["b"]
    rows = {r.name: r for r in sup.snapshot()}
    assert rows["a"].state is State.READY and rows["a"].pid == pids["a"]
    await sup.stop_all("test over")
    assert all(r.state is State.STOPPED and r.pid is None for r in sup.snapshot())
    for pid in pids.values():
        assert not process_alive(pid) and not group_exists(pid)
    assert ("a", State.STOPPED, State.STARTING) in transitions
    assert ("a", State.STARTING, State.READY) in transitions
    assert ("a", State.STOPPING, State.STOPPED) in transitions


async def test_sigkill_respawns_and_leaves_the_other_alone(sup: Supervisor, tmp_path: Path) -> None:
    cfgs = {n: instance(n, {"command": toy_command(free_port())}, tmp_path / "x.toml") for n in "ab"}
    await sup.apply(cfgs, {})
    await wait_state(sup, "a", State.READY)
    await wait_state(sup, "b", State.READY)
    a_pid, b_pid = pid_of(sup, "a"), pid_of(sup, "b")
    os.kill(a_pid, signal.SIGKILL)
    await wait_state(sup, "a", State.BACKOFF, State.STARTING)
    await wait_state(sup, "a", State.READY)
    assert pid_of(sup, "a") != a_pid
    assert pid_of(sup, "b") == b_pid
    row = {r.name: r for r in sup.snapshot()}["a"]
    assert row.restarts == 1
    assert row.last_error is not None and "killed by SIGKILL" in row.last_error


async def test_crash_loop_ends_failed_with_reason(sup: Supervisor, tmp_path: Path) -> None:
    cfg = instance("c", {"command": toy_command(free_port(), "--exit-after", "0", "--exit-code", "3"),
                         "restart": {"max_restarts": 2}}, tmp_path / "x.toml")
    await sup.apply({"c": cfg}, {})
    await wait_state(sup, "c", State.FAILED)
    inst = sup.get("c")
    assert "exited with code 3" in inst.reason
    assert "crashed 3 times" in inst.reason and "max_restarts = 2" in inst.reason
    assert inst.restarts == 2 and inst.child is None
    # A person's start request gives it a fresh history.
    await sup.start_enabled("try again")
    await wait_state(sup, "c", State.STARTING, State.BACKOFF)


async def test_ignored_sigterm_is_killed_after_timeout_with_its_group(
    sup: Supervisor, tmp_path: Path
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    cmd = toy_command(free_port(), "--ignore-term", "--grandchild", "--pidfile", str(pidfile))
    cfg = instance("t", {"command": cmd, "stop_timeout_s": 0.5}, tmp_path / "x.toml")
    await sup.apply({"t": cfg}, {})
    await wait_state(sup, "t", State.READY)
    pid = pid_of(sup, "t")
    grandchild = int(pidfile.read_text().split()[0])
    assert process_alive(grandchild) and os.getpgid(grandchild) == pid
    sup.stop("t", "test")
    await wait_state(sup, "t", State.STOPPED)
    assert "killed by SIGKILL" in sup.get("t").reason
    assert not process_alive(pid) and not process_alive(grandchild)
    # The orphaned grandchild is reaped by init, not by us: give init a moment.
    with trio.fail_after(10):
        while group_exists(pid):
            await trio.sleep(0.05)


async def test_death_during_startup_is_reported_as_such(sup: Supervisor, tmp_path: Path) -> None:
    cmd = toy_command(free_port(), "--ready-after", "60", "--exit-after", "0.2", "--exit-code", "7")
    cfg = instance("d", {"command": cmd, "restart": {"policy": "never"}}, tmp_path / "x.toml")
    await sup.apply({"d": cfg}, {})
    await wait_state(sup, "d", State.FAILED)
    assert "exited with code 7 during start-up" in sup.get("d").reason
    assert any("toy server exiting with 7" in line.text for line in sup.logs("d", 50))


async def test_never_healthy_is_stopped_and_counted(sup: Supervisor, tmp_path: Path) -> None:
    cmd = toy_command(free_port(), "--ready-after", "600")
    cfg = instance("h", {"command": cmd, "health": {"timeout_s": 0.5},
                         "restart": {"max_restarts": 0}}, tmp_path / "x.toml")
    await sup.apply({"h": cfg}, {})
    await wait_state(sup, "h", State.FAILED)
    assert "not healthy within health.timeout_s = 0.5 s" in sup.get("h").reason


async def test_output_flood_is_read_and_handed_to_sinks(sup: Supervisor, tmp_path: Path) -> None:
    seen: list[tuple[str, str, float]] = []
    sup.add_line_sink(lambda name, line, t: seen.append((name, line, t)))
    sup.add_line_sink(lambda name, line, t: 1 / 0)  # a broken watcher must not stop the others
    cmd = toy_command(free_port(), "--flood-lines", "5000")  # ~500 kB: far more than a pipe holds
    await sup.apply({"f": instance("f", {"command": cmd}, tmp_path / "x.toml")}, {})
    await wait_state(sup, "f", State.READY)
    with trio.fail_after(10):
        while sum(1 for _, line, _ in seen if line.startswith("flood line")) < 5000:
            await trio.sleep(0.05)
    assert all(name == "f" for name, _, _ in seen)
    tail = sup.logs("f", 1000)
    assert len(tail) == 50  # the ring keeps only ring_lines


async def test_hooks_start_when_ready_and_stop_with_the_instance(
    sup: Supervisor, tmp_path: Path
) -> None:
    marker = tmp_path / "hook.out"
    hook = ["sh", "-c", f'echo "$LLAMANAP_INSTANCE $LLAMANAP_PORT" > {marker}; exec sleep 600']
    port = free_port()
    cfg = instance("k", {"command": toy_command(port), "post_launch_hooks": [hook]}, tmp_path / "x.toml")
    await sup.apply({"k": cfg}, {})
    await wait_state(sup, "k", State.READY)
    with trio.fail_after(10):
        while not marker.exists() or not marker.read_text():
            await trio.sleep(0.05)
    assert marker.read_text().split() == ["k", str(port)]
    started = [line.text for line in sup.logs("k", 50) if line.stream == "hook[0]"]
    hook_pid = int(started[0].split()[2].rstrip(":"))
    assert process_alive(hook_pid)
    sup.stop("k", "test")
    await wait_state(sup, "k", State.STOPPED)
    assert not process_alive(hook_pid)


async def test_wait_all_ready_and_cancelling_the_supervisor_stops_children(tmp_path: Path) -> None:
    sup = Supervisor()
    cfgs = {n: instance(n, {"command": toy_command(free_port(), "--ready-after", "0.3")},
                        tmp_path / "x.toml") for n in "xy"}
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.apply(cfgs, {"y": False})
        assert await sup.wait_all_ready(30)
        assert sup.get("x").state is State.READY and sup.get("y").state is State.STOPPED
        pid = pid_of(sup, "x")
        nursery.cancel_scope.cancel()
    assert not process_alive(pid)
    assert sup.get("x").state is State.STOPPED


async def test_stop_all_holds_until_start_enabled(sup: Supervisor, tmp_path: Path) -> None:
    """What the power manager relies on around a suspend."""
    seen: list[tuple[str, State]] = []
    sup.add_state_listener(lambda n, old, new, why: seen.append((n, new)))
    cfgs = {n: instance(n, {"command": toy_command(free_port())}, tmp_path / "x.toml") for n in "pq"}
    await sup.apply(cfgs, {"q": False})
    assert await sup.wait_all_ready(30)
    await sup.stop_all("suspending")
    assert {r.state for r in sup.snapshot()} == {State.STOPPED}
    added = instance("r", {"command": toy_command(free_port())}, tmp_path / "x.toml")
    await sup.apply({**cfgs, "r": added}, {"q": False})  # a reload while held starts nothing
    assert sup.get("r").state is State.STOPPED and not sup.get("r").wanted
    seen.clear()
    await sup.start_enabled("resumed")
    assert sorted(sup.enabled_names()) == ["p", "r"]
    assert await sup.wait_all_ready(30)
    assert sorted(n for n, s in seen if s is State.READY) == ["p", "r"]
    assert sup.get("q").state is State.STOPPED


async def test_launch_planner_adds_args_env_and_gpus(sup: Supervisor, tmp_path: Path) -> None:
    """The hook VRAM placement uses: each start may get extra args, env and a GPU list."""
    asked: list[str] = []

    async def planner(name: str, config: InstanceConfig) -> LaunchOverrides:
        asked.append(name)
        return LaunchOverrides(args=("--ready-after", "0"), env={"PLANNED": name}, gpus=(1, 3))

    sup.launch_planner = planner
    await sup.apply({"z": instance("z", {"command": toy_command(free_port())}, tmp_path / "x.toml")}, {})
    await wait_state(sup, "z", State.READY)
    pid = pid_of(sup, "z")
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"PLANNED=z" in env and b"CUDA_VISIBLE_DEVICES=1,3" in env
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-3:-1] == [b"--ready-after", b"0"]
    assert asked == ["z"]
    assert {r.name: r.gpus for r in sup.snapshot()}["z"] == [1, 3]  # what the child got


async def test_a_failing_planner_fails_only_its_instance(sup: Supervisor, tmp_path: Path) -> None:
    async def planner(name: str, config: InstanceConfig) -> LaunchOverrides | None:
        if name == "broken":
            raise ZeroDivisionError("planner bug")
        return None

    sup.launch_planner = planner
    await sup.apply({n: instance(n, {"command": toy_command(free_port())}, tmp_path / "x.toml")
                     for n in ("broken", "fine")}, {})
    await wait_state(sup, "broken", State.FAILED)
    await wait_state(sup, "fine", State.READY)
    assert sup.get("broken").reason == (
        "instances.broken: launch planning failed: ZeroDivisionError('planner bug')")


async def test_on_demand_instances_start_only_when_asked(sup: Supervisor, tmp_path: Path) -> None:
    # not at apply (agent start, reload), not on enable, not on resume (start_enabled)
    cfgs = {"always": instance("always", {"command": toy_command(free_port())}, tmp_path / "x.toml"),
            "lazy": instance("lazy", {"command": toy_command(free_port()), "load": "on-demand"},
                             tmp_path / "x.toml")}
    await sup.apply(cfgs, {})
    await wait_state(sup, "always", State.READY)
    assert sup.get("lazy").state is State.STOPPED and not sup.get("lazy").wanted
    assert sup.enabled_names() == ["always"]  # what a resume waits READY for
    sup.set_enabled("lazy", True, "test: enable")
    await sup.stop_all("test: suspend")
    assert sup.held
    await sup.start_enabled("test: resume")
    await wait_state(sup, "always", State.READY)
    assert sup.get("lazy").state is State.STOPPED and not sup.get("lazy").wanted
    sup.start("lazy", "test: the scheduler asks")
    await wait_state(sup, "lazy", State.READY)
    # a new TTL or model list restarts nothing
    changed = {**cfgs, "lazy": instance("lazy", {"command": cfgs["lazy"].command, "load": "on-demand",
                                                 "ttl_s": 5, "models": ["l"]}, tmp_path / "x.toml")}
    plan = await sup.apply(changed, {})
    assert "lazy" in plan.unchanged and sup.get("lazy").state is State.READY
