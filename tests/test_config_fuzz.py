"""Seeded mutations of the shipped example configs, loaded from real files.

Each case changes one to three things in deploy/examples (a value replaced by nan, inf, -1,
0, a huge number, a wrong type, an empty string or a bad address; a key dropped; an unknown
key added) and checks that:

(a) loading raises ``ConfigError`` with one line naming a written file, or succeeds;
(b) ``check-config`` (in-process for every case, the real CLI for a sample) accepts exactly
    what the loader that ``run`` uses accepts, with the same message;
(c) for an accepted config, what ``run`` builds from it (no-wake rules, power commands,
    launch argv) and the pure policies fed by it (wake machine, idle policy, P-state policy,
    restart backoff) take a few steps without an exception and with finite deadlines.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import random
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from edge_proxy import cli as edge_cli
from edge_proxy.http_routes.rules import WakePolicy, default_policy
from edge_proxy.wake.machine import Event, State, WakeMachine, WakeTiming
from inference_node import cli as node_cli
from inference_node.gpu.policy import PstatePolicy
from inference_node.power.policy import IdlePolicy
from inference_node.supervisor.launch import LaunchOverrides, build_launch
from inference_node.supervisor.state import RestartTracker
from shared.cli import EXIT_CONFIG, EXIT_OK
from shared.config.edge import EdgeConfig, load_edge_config
from shared.config.node import NodeAgentConfig, load_node_config
from shared.errors import ConfigError, LlamanapError

EXAMPLES = Path(__file__).parent.parent / "deploy" / "examples"
SEED = 20261202
CASES = 300
CLI_SAMPLE = 3  # real subprocesses per service; the in-process run covers every case

# Replacements by the kind of value they replace, each list with a few of another kind
NUMBERS: tuple[Any, ...] = (math.nan, math.inf, -math.inf, -1, 0, -0.5, 1e-9, 1e300, 10**18,
                            2**63 - 1, "5", True, [])
STRINGS: tuple[Any, ...] = (
    "", "x", "999.999.999.999", "256.1.1.1:80", "0.0.0.0:8080", "127.0.0.1:8080",
    "127.0.0.1:9180", "127.0.0.1:9181", "0.0.0.0:8081", "[::]:8080", "[::1]", "host:",
    "localhost:9181", "aa:bb", "GET", "http:/", "* /x*", "\u00c4B /x", "a\u0000b", "http://",
    "http://h:99999", 0, False,
)
ARRAYS: tuple[Any, ...] = ([], [""], ["x"], [math.nan], [0], "x", {})
TABLES: tuple[Any, ...] = ({}, {"x": 1}, {"A=B": "x"}, [], "x", 0)


def _read(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


EDGE_FILES = {"edge-proxy.toml": _read(EXAMPLES / "edge-proxy.toml")}
NODE_FILES = {"node-agent.toml": _read(EXAMPLES / "node-agent.toml")} | {
    f"instances.d/{p.name}": _read(p) for p in sorted((EXAMPLES / "instances.d").glob("*.toml"))}

Path_ = tuple[str | int, ...]


def _paths(node: Any, here: Path_ = ()) -> Iterator[Path_]:
    """Every key and array item below ``node``, tables included."""
    items: list[tuple[str | int, Any]] = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    for key, value in items:
        yield (*here, key)
        yield from _paths(value, (*here, key))


def _parent(table: Any, path: Path_) -> Any:
    for key in path[:-1]:
        table = table[key]
    return table


def _mutate(rng: random.Random, table: dict[str, Any]) -> str:
    paths = list(_paths(table))
    if not paths:  # earlier drops emptied the file
        table["surprise_key"] = 1
        return "unknown key in an empty file"
    path = rng.choice(paths)
    parent, last = _parent(table, path), path[-1]
    op = rng.choice(("replace", "replace", "perturb", "perturb", "perturb", "drop", "unknown"))
    if op == "perturb" and not isinstance(parent[last], dict | list | str):
        # a value of the right type but an odd size: where the policies meet extremes
        old = parent[last]
        if isinstance(old, bool):
            parent[last] = not old
        elif isinstance(old, int):
            parent[last] = rng.choice((0, 1, old + 1, old * 2, old * 1000))
        else:
            parent[last] = rng.choice((0.0, 0.01, old / 1000, old * 1000))
        return f"{path} = {parent[last]!r} (was {old!r})"
    if op == "drop" and isinstance(parent, dict):
        del parent[last]
        return f"drop {path}"
    if op == "unknown":
        target = parent[last]  # a table gets the key inside it, anything else beside it
        if not isinstance(target, dict):
            target = parent if isinstance(parent, dict) else table
        target["surprise_key"] = 1
        return f"unknown key beside {path}"
    old = parent[last]
    kinds = NUMBERS if isinstance(old, int | float) else STRINGS if isinstance(old, str) else \
        ARRAYS if isinstance(old, list) else TABLES
    value = copy.deepcopy(rng.choice(kinds))  # also when "perturb" meets a str or table
    parent[last] = value
    return f"{path} = {value!r}"


@dataclass
class Case:
    index: int
    service: str  # "edge" or "node"
    files: dict[str, dict[str, Any]]
    what: list[str]

    def write(self, folder: Path) -> Path:
        for name, table in self.files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(tomli_w.dumps(table))
        return folder / next(iter(self.files))


def make_cases() -> list[Case]:
    rng = random.Random(SEED)
    cases = []
    for index in range(CASES):
        service = "edge" if index % 2 == 0 else "node"
        files = copy.deepcopy(EDGE_FILES if service == "edge" else NODE_FILES)
        what = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            name = rng.choice(list(files))
            what.append(f"{name}: {_mutate(rng, files[name])}")
        cases.append(Case(index, service, files, what))
    return cases


CASE_LIST = make_cases()
LOADERS: dict[str, Callable[[Path], EdgeConfig | NodeAgentConfig]] = {
    "edge": load_edge_config, "node": load_node_config}
CLIS = {"edge": ("edge-proxy", edge_cli.main, "edge_proxy"),
        "node": ("node-agent", node_cli.main, "inference_node")}


def load_outcome(case: Case, path: Path) -> EdgeConfig | NodeAgentConfig | ConfigError:
    """(a): the config, or a one-line ConfigError naming a file this case wrote."""
    try:
        return LOADERS[case.service](path)
    except ConfigError as exc:
        assert type(exc) is ConfigError, case.what
        message = str(exc)
        assert "\n" not in message and "Traceback" not in message, case.what
        written = [str(path.parent / name) for name in case.files]
        assert any(message.startswith(f"{w}: ") for w in written), (message, case.what)
        return exc


def check_config_in_process(case: Case, path: Path) -> tuple[int, str, str]:
    main = CLIS[case.service][1]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["check-config", str(path)])
    return rc, out.getvalue(), err.getvalue()


def assert_agrees(case: Case, path: Path, outcome: object, rc: int, out: str, err: str) -> None:
    """(b): check-config says ok exactly when the loader accepts, and repeats its error."""
    prog = CLIS[case.service][0]
    if isinstance(outcome, ConfigError):
        assert rc == EXIT_CONFIG, (case.what, out, err)
        assert err == f"{prog}: config error: {outcome}\n", case.what
        assert out == ""
    else:
        assert rc == EXIT_OK, (case.what, err)
        assert out.startswith(f"{path}: ok ("), case.what
        assert all(line.startswith("note: ") for line in out.splitlines()[1:]), out


def step_edge(cfg: EdgeConfig) -> None:
    """(c) for the proxy: what the listeners and drivers build, stepped once through a wake."""
    for route in cfg.routes:
        policy = WakePolicy.from_texts(route.http.no_wake) if route.http else default_policy()
        policy.may_wake("GET", "/v1/models")
        assert route.listen_addr.port == int(route.listen.rpartition(":")[2])
    for name, node in cfg.nodes.items():
        timing = WakeTiming(node.wol_interval_s, node.wake_timeout_s, node.drain_timeout_s)
        machine = WakeMachine(name, timing, now=0.0)
        machine.handle(Event.PROBE_TIMEOUT, 0.0)
        actions = machine.handle(Event.DEMAND, 1.0)
        assert machine.state is State.WAKING and actions
        deadline = machine.next_deadline()
        assert deadline is not None and math.isfinite(deadline) and deadline > 1.0
        machine.handle(Event.TICK, deadline)
        machine.handle(Event.TICK, 1.0 + node.wake_timeout_s)
        assert machine.state in (State.ASLEEP,), machine  # (a tuple: mypy narrowed the state)
        machine.handle(Event.AGENT_READY, 2.0 + node.wake_timeout_s)
        assert machine.suspending(3.0 + node.wake_timeout_s, 0, 0, node.veto_suspend_when_busy).allowed
        drain_end = machine.next_deadline()
        assert drain_end is not None and math.isfinite(drain_end)
        machine.handle(Event.TICK, drain_end)
        assert machine.state is State.UNKNOWN


def step_node(cfg: NodeAgentConfig) -> None:
    """(c) for the agent: power commands, launch argv and the pure policies, stepped."""
    power = cfg.power
    assert power.suspend_argv and power.suspend_argv[0]
    assert power.busy_argv is None or power.busy_argv[0]
    idle = IdlePolicy(power.idle_timeout_s, power.min_awake_s, now=0.0)
    verdict = idle.observe(0.0, [])
    assert verdict.sleep_at is not None and math.isfinite(verdict.sleep_at)
    assert idle.observe(verdict.sleep_at, []).suspend
    verdict.describe(power.check_interval_s)
    idle.failed(verdict.sleep_at, power.failed_suspend_backoff_s)
    pstate = PstatePolicy(low=cfg.pstate.low, high=cfg.pstate.high,
                          low_delay_s=cfg.pstate.low_delay_s)
    first = pstate.decide({"GPU-0": False}, 0.0)
    at = first.wake_at if math.isfinite(first.wake_at) else 0.0
    assert pstate.decide({"GPU-0": False}, at).wanted == {"GPU-0": cfg.pstate.low}
    for name, inst in cfg.instances.items():
        decision = RestartTracker(inst.restart).on_exit(0.0, 1, "crashed")
        assert math.isfinite(decision.delay_s) and decision.delay_s >= 0
        placed = LaunchOverrides(gpus=()) if inst.gpus == "auto" else None
        try:
            spec = build_launch(name, inst, placed)
        except LlamanapError:
            continue  # no llama-server on this machine: check-config warns, run refuses
        assert spec.port == inst.effective_port and spec.argv[0]


def test_mutated_examples_load_or_fail_in_one_line(tmp_path: Path) -> None:
    accepted = rejected = 0
    for case in CASE_LIST:
        folder = tmp_path / f"case{case.index}"
        path = case.write(folder)
        outcome = load_outcome(case, path)
        assert_agrees(case, path, outcome, *check_config_in_process(case, path))
        if isinstance(outcome, ConfigError):
            rejected += 1
            continue
        accepted += 1
        try:
            (step_edge if case.service == "edge" else step_node)(outcome)  # type: ignore[arg-type]
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"case {case.index} {case.what}: {exc!r}") from exc
    # Neither outcome may be empty, or the mutations test nothing.
    assert accepted >= CASES // 10 and rejected >= CASES // 3, (accepted, rejected)


@pytest.mark.parametrize("service", ["edge", "node"])
def test_the_real_check_config_agrees_with_the_loader(tmp_path: Path, service: str) -> None:
    sample = [c for c in CASE_LIST if c.service == service]
    rejected = [c for c in sample if _rejected(c, tmp_path / "probe")]
    accepted = [c for c in sample if c not in rejected]
    for case in rejected[:CLI_SAMPLE - 1] + accepted[:1]:
        folder = tmp_path / f"case{case.index}"
        path = case.write(folder)
        outcome = load_outcome(case, path)
        module = CLIS[service][2]
        proc = subprocess.run([sys.executable, "-m", module, "check-config", str(path)],
                              capture_output=True, text=True, timeout=60, check=False)
        stderr = "".join(line + "\n" for line in proc.stderr.splitlines()
                         if not line.startswith(f"{CLIS[service][0]}: warning: "))
        assert_agrees(case, path, outcome, proc.returncode, proc.stdout, stderr)


def _rejected(case: Case, folder: Path) -> bool:
    path = case.write(folder / str(case.index))
    return isinstance(load_outcome(case, path), ConfigError)
