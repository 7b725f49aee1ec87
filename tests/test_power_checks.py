"""Activity checks against real sockets, real commands and real process tables."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import trio

from inference_node.power.checks import (
    ApiInhibitCheck,
    CommandCheck,
    ConnectionsCheck,
    ForeignGpuProcessCheck,
    InhibitRegistry,
    InstanceBusyCheck,
    InstanceStartingCheck,
    gather_reasons,
    inhibitor_reason,
)


async def test_instance_busy_names_the_instances() -> None:
    tasks = {"qwen": 2, "llama": 0}
    check = InstanceBusyCheck(lambda: tasks)
    assert await check.check() == "busy instance: qwen (2 tasks)"
    tasks["qwen"] = 0
    assert await check.check() is None


async def test_connections_check_counts_foreign_clients_but_not_our_own() -> None:
    server = ("import socket,time; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); "
              "print(s.getsockname()[1],flush=True); conns=[]\n"
              "while True: conns.append(s.accept())")
    async with trio.open_nursery() as nursery:
        srv, port_text = await nursery.start(_child, [sys.executable, "-c", server])
        port = int(port_text)
        check = ConnectionsCheck(lambda: [port])
        assert await check.check() is None

        # A connection this process opens is the agent's own (a health check): not activity.
        ours = await trio.open_tcp_stream("127.0.0.1", port)
        await trio.sleep(0.2)
        assert await check.check() is None
        await ours.aclose()

        # A client in another process is activity.
        client = (f"import socket,time; s=socket.create_connection(('127.0.0.1',{port})); "
                  "print('up',flush=True); time.sleep(30)")
        cli, _ = await nursery.start(_child, [sys.executable, "-c", client])
        await trio.sleep(0.2)
        reason = await check.check()
        assert reason is not None and f"port {port}: 1 from 127.0.0.1" in reason
        cli.kill()
        srv.kill()


async def test_connections_check_reads_ipv6_connections_too() -> None:
    # The kernel's tcp6 table writes each address as four words in host byte order.
    server = ("import socket,time; s=socket.socket(socket.AF_INET6); s.bind(('::1',0)); "
              "s.listen(); print(s.getsockname()[1],flush=True); conns=[]\n"
              "while True: conns.append(s.accept())")
    async with trio.open_nursery() as nursery:
        srv, port_text = await nursery.start(_child, [sys.executable, "-c", server])
        port = int(port_text)
        check = ConnectionsCheck(lambda: [port])
        ours = await trio.open_tcp_stream("::1", port)
        await trio.sleep(0.2)
        assert await check.check() is None
        await ours.aclose()
        client = ("import socket,time; s=socket.create_connection(('::1'," + str(port) + ")); "
                  "print('up',flush=True); time.sleep(30)")
        cli, _ = await nursery.start(_child, [sys.executable, "-c", client])
        await trio.sleep(0.2)
        assert await check.check() == f"client connections open: port {port}: 1 from ::1"
        cli.kill()
        srv.kill()


async def _child(argv: list[str], task_status: trio.TaskStatus[tuple[trio.Process, str]]) -> None:
    """Run ``argv`` until it prints its first line; hand back the process and that line."""
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            lambda task_status: trio.run_process(argv, stdout=-1, check=False, task_status=task_status))
        assert proc.stdout is not None
        line = (await proc.stdout.receive_some(64)).decode().strip()
        task_status.started((proc, line))


async def test_command_check_uses_exit_status_and_first_line() -> None:
    assert await CommandCheck(["sh", "-c", "echo 'backup running'; exit 0"]).check() == "backup running"
    assert await CommandCheck(["sh", "-c", "exit 1"]).check() is None
    reason = await CommandCheck(["/nonexistent/program"]).check()
    assert reason is not None and "cannot run" in reason


async def test_api_inhibit_expires(autojump_clock: trio.abc.Clock) -> None:
    registry = InhibitRegistry()
    check = ApiInhibitCheck(registry)
    registry.add("backup", 3600, trio.current_time())
    reason = await check.check()
    assert reason is not None and "'backup' for 3600 s more" in reason
    await trio.sleep(3600)
    assert await check.check() is None


async def test_foreign_gpu_processes() -> None:
    check = ForeignGpuProcessCheck(lambda: [(1, "GPU-aaaa"), (4242, "GPU-bbbb")], lambda: {4242})
    reason = await check.check()
    assert reason is not None and reason.startswith("GPU in use by another program: pid 1 (")
    assert "4242" not in reason


async def test_a_grandchild_of_an_instance_is_ours_not_foreign() -> None:
    """A wrapper's child (the process CUDA sees) counts as the instance's, found by walking
    the real process tree (in a worker thread)."""
    wrapper = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import subprocess, sys, time; "
         "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
         "print(p.pid, flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    grandchild: int | None = None
    try:
        assert wrapper.stdout is not None
        grandchild = int((await wrapper.stdout.receive_some(64)).split()[0])
        gpu = [(grandchild, "GPU-aaaa")]
        assert await ForeignGpuProcessCheck(lambda: gpu, lambda: [wrapper.pid]).check() is None
        reason = await ForeignGpuProcessCheck(lambda: gpu, lambda: []).check()
        assert reason is not None and f"pid {grandchild} (" in reason
    finally:
        for pid in (grandchild, wrapper.pid):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        await wrapper.wait()


def test_inhibitor_listing_parser() -> None:
    listing = (
        "gnome-shell 1000 ann 2012 gnome-shell sleep Lock screen delay\n"
        "NetworkManager 0 root 901 NetworkManager sleep NetworkManager needs to turn off networks delay\n"
        "backup 0 root 5000 restic sleep:shutdown Nightly backup block\n"
        "garbage\n"
    )
    assert inhibitor_reason(listing) == "inhibitor lock: backup (Nightly backup)"
    assert inhibitor_reason("") is None


async def test_a_crashing_check_keeps_the_node_awake() -> None:
    class Broken:
        name = "broken"

        async def check(self) -> str | None:
            raise RuntimeError("boom")

    assert await gather_reasons([Broken()]) == ["check broken failed: boom"]


async def test_a_starting_instance_keeps_the_node_awake() -> None:
    starting: list[str] = []
    check = InstanceStartingCheck(lambda: starting)
    assert await check.check() is None
    starting.append("qwen")
    assert await check.check() == "instance qwen is starting (loading its model)"
    starting.append("llama")
    assert await check.check() == "instances llama, qwen are starting (loading their models)"
