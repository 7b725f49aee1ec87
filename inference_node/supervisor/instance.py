"""One instance's lifecycle, owned by exactly one trio task (``Instance.run``).

Other code never touches the process: it records what it wants (``request_start``,
``request_stop``, ``request_restart``, ``retire``) and the owner task acts on it at its next
step. What each request does in each state:

- ``request_start``: STOPPED/FAILED -> STARTING; BACKOFF -> waits out the backoff;
  STARTING/READY -> nothing. Clears the crash history (a person asked for it).
- ``request_stop``: STARTING/READY -> STOPPING -> STOPPED (SIGTERM, grace, SIGKILL, reap);
  BACKOFF -> STOPPED; STOPPED/FAILED -> nothing.
- ``request_restart``: like stop then start; from STOPPED/FAILED/BACKOFF it starts at once.
- ``retire``: stop, then the owner task returns (the instance left the config).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import shlex
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from inference_node.supervisor.health import START_PROBE_TIMEOUT_S, probe, watch_liveness
from inference_node.supervisor.launch import LaunchOverrides, LaunchSpec, build_launch, preflight
from inference_node.supervisor.output import LineSink, LogRing, dispatch, pump_lines
from inference_node.supervisor.process import Child, spawn
from inference_node.supervisor.state import (
    RUNNING_STATES,
    Action,
    RestartTracker,
    State,
    check_transition,
    describe_exit,
)
from shared.config.node import InstanceConfig
from shared.errors import LlamanapError

log = logging.getLogger(__name__)
output_log = logging.getLogger("inference_node.output")

# After a child is gone its pipes normally hit EOF at once; a grandchild that escaped the
# process group could hold them open, so the readers get this long to drain, then stop.
PUMP_DRAIN_S = 1.0
# llama-server's lines at the end of a model load: seeing one probes health at once instead of
# at the next interval (a wake waits on READY). Only a hint: the 200 from health decides.
READY_HINT = re.compile(r"model loaded|listening on|all slots are idle")

StateListener = Callable[[str, State, State, str], None]
LaunchPlanner = Callable[[str, InstanceConfig], Awaitable[LaunchOverrides | None]]


class InstanceHost(Protocol):
    """What an instance needs from its supervisor (watchers, planner, port bookkeeping)."""

    line_sinks: list[LineSink]

    def state_changed(self, name: str, old: State, new: State, reason: str) -> None: ...

    async def plan_launch(self, name: str, config: InstanceConfig) -> LaunchOverrides | None: ...

    def port_user(self, port: int, asking: str) -> str | None: ...

    def child_env(self, name: str) -> dict[str, str]: ...


class Instance:
    """A supervised server: its config, state, current child, restart history and log ring."""

    def __init__(self, name: str, config: InstanceConfig, *, enabled: bool, ring_lines: int,
                 host: InstanceHost) -> None:
        self.name = name
        self.config = config
        self.enabled = enabled  # the effective setting: config, or an override from the API
        self.state = State.STOPPED
        self.reason = "not started"
        self._ready_hint = trio.Event()
        self.state_since = trio.current_time()
        self.child: Child | None = None
        self.launch: LaunchSpec | None = None  # argv and env of the current (or last) child
        self.started_at: float | None = None
        self.restarts = 0
        self.last_error: str | None = None
        self.ring = LogRing(ring_lines)
        self.done = trio.Event()  # set when the owner task has returned
        self._host = host
        self._tracker = RestartTracker(config.restart)
        self._want = False
        self._restart_pending = False
        self._retired = False
        self._stop_reason = ""
        self._poked = trio.Event()
        self._changed = trio.Event()
        self._run_scope: trio.CancelScope | None = None
        self.transitions = 0  # counts state changes, so a caller can wait for the next one

    def __repr__(self) -> str:
        pid = self.child.pid if self.child else None
        since = trio.current_time() - self.state_since
        return f"<Instance {self.name} {self.state.name} pid={pid} for {since:.1f}s ({self.reason})>"

    # ---- requests (any task; they only record intent and wake the owner) ----

    @property
    def wanted(self) -> bool:
        """True while the instance should be running (or coming back after a crash)."""
        return self._want

    def request_start(self, reason: str) -> None:
        self._tracker.reset()
        self._want = True
        self._stop_reason = reason
        self._poke()

    def request_stop(self, reason: str) -> None:
        self._want = False
        self._restart_pending = False
        self._stop_reason = reason
        self._interrupt()

    def request_restart(self, reason: str) -> None:
        self._tracker.reset()
        self._want = True
        self._restart_pending = True
        self._stop_reason = reason
        self._interrupt()

    def retire(self, reason: str) -> None:
        self._retired = True
        self.request_stop(reason)

    def replace_config(self, config: InstanceConfig) -> None:
        """Use ``config`` from the next start on (the caller restarts it if it runs)."""
        self.config = config
        self._tracker = RestartTracker(config.restart)

    async def wait_for(self, states: frozenset[State]) -> None:
        """Return once the state is one of ``states``."""
        while self.state not in states:
            await self._changed.wait()

    async def wait_transition(self, after: int) -> None:
        """Return once a transition happened since ``transitions`` was ``after``."""
        while self.transitions == after:
            await self._changed.wait()

    # ---- the owner task ----

    async def run(self) -> None:
        """Own the lifecycle until retired; cancelling it stops the child (shielded) first."""
        try:
            while True:
                if not self._want:
                    if self.state is State.BACKOFF:
                        self._set(State.STOPPED, self._stop_reason)
                    if self._retired:
                        return
                    await self._wait_poke()
                    continue
                self._restart_pending = False
                try:
                    delay = await self._run_once()
                except Exception as exc:  # a bug here must not take the other instances down
                    log.exception("instance %s: supervision failed", self.name)
                    if self.state is not State.STOPPED:
                        self._set(State.STOPPED, "supervision failed")
                    self._fail(f"instances.{self.name}: internal error while supervising: {exc!r}")
                    continue
                if delay is not None:
                    await self._backoff(delay)
        finally:
            self.done.set()

    async def _backoff(self, delay_s: float) -> None:
        deadline = trio.current_time() + delay_s
        while self._want and not self._restart_pending and trio.current_time() < deadline:
            with trio.move_on_at(deadline):
                await self._wait_poke()

    async def _run_once(self) -> float | None:
        """Start, supervise and stop one child; return a backoff delay if it should come back."""
        config = self.config
        try:
            spec = build_launch(self.name, config, await self._host.plan_launch(self.name, config))
        except LlamanapError as exc:
            self._fail(str(exc))
            return None
        except Exception as exc:  # the planner is another component: contain its bugs here
            log.exception("instance %s: launch planner failed", self.name)
            self._fail(f"instances.{self.name}: launch planning failed: {exc!r}")
            return None
        problems = preflight(spec, check_port=True)
        other = self._host.port_user(spec.port, self.name)
        if other:
            problems.insert(0, f"instances.{self.name}: port {spec.port} is in use by {other}; "
                               "stop it or pick another port")
        if problems:
            self._fail(problems[0])
            return None
        # The owner marker goes in last: what finds the child again after an agent crash.
        spec = dataclasses.replace(spec, env={**spec.env, **self._host.child_env(self.name)})
        self.launch = spec  # listeners of STARTING read the child's env (its GPUs) here
        try:
            child = await spawn(spec.argv, spec.env)
        except OSError as exc:
            self._fail(f"instances.{self.name}: cannot run {spec.argv[0]}: {exc.strerror or exc}")
            return None
        self.child, self.started_at = child, trio.current_time()
        self._set(State.STARTING, f"spawned pid {child.pid}")
        ended: str | None = None  # why it ended by itself; None: it was asked to stop
        returncode: int | None = None
        async with trio.open_nursery() as pumps:
            assert child.proc.stdout is not None and child.proc.stderr is not None
            pumps.start_soon(pump_lines, child.proc.stdout, functools.partial(self._line, "stdout"))
            pumps.start_soon(pump_lines, child.proc.stderr, functools.partial(self._line, "stderr"))
            try:
                async with trio.open_nursery() as hooks:
                    with trio.CancelScope() as self._run_scope:
                        if not self._want or self._restart_pending:
                            self._run_scope.cancel()  # asked to stop while it was spawning
                        ended = await self._supervise(child, spec, hooks)
                    self._run_scope = None
                    if ended is None:
                        self._set(State.STOPPING, self._stop_reason)
                    hooks.cancel_scope.cancel()
            finally:
                self._run_scope = None
                with trio.CancelScope(shield=True):
                    if ended is None and self.state is not State.STOPPING:
                        self._set(State.STOPPING, "supervisor shutting down")
                    returncode = await child.stop(config.stop_timeout_s)
                    self.child, self.started_at = None, None
                    if ended is None:
                        self._set(State.STOPPED, f"{self._stop_reason}; {describe_exit(returncode)}")
                pumps.cancel_scope.deadline = trio.current_time() + PUMP_DRAIN_S
        if ended is None:
            return None
        return self._after_exit(ended, returncode)

    def _after_exit(self, ended: str, returncode: int | None) -> float | None:
        what = ended or describe_exit(returncode if returncode is not None else 0)
        if not ended and self.state is State.STARTING:
            what += " during start-up"
        tail = [line.text for line in self.ring.tail(1)]
        self.last_error = what + (f" (last line: {tail[0][:200]})" if tail else "")
        decision = self._tracker.on_exit(trio.current_time(), None if ended else returncode, what)
        if decision.action is Action.RESTART:
            self.restarts += 1
            self._set(State.BACKOFF, decision.reason)
            return decision.delay_s
        if decision.action is Action.STOP:
            self._want = False
            self._set(State.STOPPED, decision.reason)
        else:
            self._fail(decision.reason)
        return None

    async def _supervise(self, child: Child, spec: LaunchSpec, hooks: trio.Nursery) -> str:
        """Wait for health, go READY, start hooks, probe liveness until the child exits.

        Returns "" when the child exited (the caller describes the exit once it has the
        code) or a reason when it must be stopped: it never became healthy, or it stopped
        answering its health probes while READY (then the state is already STOPPING).
        """
        unhealthy = await self._wait_healthy(child, spec)
        if unhealthy is not None:
            return unhealthy
        took = trio.current_time() - (self.started_at or trio.current_time())
        self._set(State.READY, f"GET {self.config.health.path} answered 200 after {took:.1f} s")
        for i, hook in enumerate(self.config.post_launch_hooks):
            hooks.start_soon(self._run_hook, i, hook, spec)
        wedged = ""
        async with trio.open_nursery() as race:

            async def liveness() -> None:
                nonlocal wedged
                wedged = await watch_liveness(self.name, spec.probe_host, spec.port,
                                              self.config.health)
                race.cancel_scope.cancel()

            race.start_soon(liveness)
            await child.wait_exited()
            race.cancel_scope.cancel()
        if wedged:
            self._set(State.STOPPING, f"{wedged}; stopping pid {child.pid}")
        return wedged

    async def _wait_healthy(self, child: Child, spec: LaunchSpec) -> str | None:
        """None once health answers 200; "" if the child died first; a reason on timeout."""
        health = self.config.health
        result: str | None = ""
        async with trio.open_nursery() as race:

            async def watch_exit() -> None:
                await child.wait_exited()
                race.cancel_scope.cancel()

            race.start_soon(watch_exit)
            with trio.move_on_after(health.timeout_s):
                while True:
                    hint = self._ready_hint = trio.Event()  # before the probe: none is missed
                    if await probe(spec.probe_host, spec.port, health.path,
                                   START_PROBE_TIMEOUT_S) is None:
                        break
                    with trio.move_on_after(health.interval_s):
                        await hint.wait()
                result = None
            if result == "":
                result = (f"not healthy within health.timeout_s = {health.timeout_s:g} s "
                          f"(GET {health.path} on {spec.probe_host}:{spec.port})")
            race.cancel_scope.cancel()
        return result

    async def _run_hook(self, index: int, command: Sequence[str] | str, spec: LaunchSpec) -> None:
        """Run one post-launch hook until it exits or the instance stops (then stop it too)."""
        label = f"hook[{index}]"
        argv = list(command) if not isinstance(command, str) else shlex.split(command)
        env = dict(spec.env, LLAMANAP_INSTANCE=self.name, LLAMANAP_HOST=spec.probe_host,
                   LLAMANAP_PORT=str(spec.port))
        try:
            child = await spawn(argv, env)
        except OSError as exc:
            self._note(label, f"cannot run {argv[0]}: {exc.strerror or exc}")
            return
        self._note(label, f"started pid {child.pid}: {shlex.join(argv)}")
        try:
            async with trio.open_nursery() as pumps:
                assert child.proc.stdout is not None and child.proc.stderr is not None
                pumps.start_soon(pump_lines, child.proc.stdout, functools.partial(self.ring.append, label))
                pumps.start_soon(pump_lines, child.proc.stderr, functools.partial(self.ring.append, label))
                await child.wait_exited()
                pumps.cancel_scope.deadline = trio.current_time() + PUMP_DRAIN_S
        finally:
            with trio.CancelScope(shield=True):
                code = await child.stop(self.config.stop_timeout_s)
            self._note(label, describe_exit(code))

    # ---- internals ----

    def _line(self, stream: str, text: str) -> None:
        self.ring.append(stream, text)
        if self.state is State.STARTING and READY_HINT.search(text):
            self._ready_hint.set()
        if output_log.isEnabledFor(logging.DEBUG):  # log_level = "debug" copies it to the journal
            output_log.debug("%s: %s", self.name, text)
        dispatch(self._host.line_sinks, self.name, text, trio.current_time())

    def _note(self, label: str, text: str) -> None:
        log.info("instance %s %s: %s", self.name, label, text)
        self.ring.append(label, text)

    def _fail(self, reason: str) -> None:
        self._want = False
        self.last_error = reason
        self._set(State.FAILED, reason)

    def _set(self, new: State, reason: str) -> None:
        old = self.state
        check_transition(old, new)
        self.state, self.reason, self.state_since = new, reason, trio.current_time()
        self.transitions += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        self._host.state_changed(self.name, old, new, reason)

    def _poke(self) -> None:
        self._poked.set()

    def _interrupt(self) -> None:
        if self._run_scope is not None:
            self._run_scope.cancel()
        self._poke()

    async def _wait_poke(self) -> None:
        await self._poked.wait()
        self._poked = trio.Event()

    @property
    def is_running(self) -> bool:
        return self.state in RUNNING_STATES
