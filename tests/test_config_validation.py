"""Config values that used to pass the check and break the run: real TOML files, exact keys."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, get_type_hints

import pytest
import tomli_w

from edge_proxy.http_routes.rules import WakePolicy
from inference_node.power.service import command_suspend
from shared.config.edge import (
    AlertsConfig,
    EdgeConfig,
    HistoryConfig,
    HttpOptions,
    LimitsConfig,
    NodeConfig,
    load_edge_config,
)
from shared.config.node import (
    HealthConfig,
    InstanceConfig,
    NodeAgentConfig,
    PowerSection,
    ProxySection,
    PstateSection,
    ReportSection,
    RestartConfig,
    load_node_config,
)
from shared.errors import ConfigError


def edge_table() -> dict[str, Any]:
    return {
        "control": {"listen": "127.0.0.1:9180"},
        "nodes": {"gpubox": {"host": "10.0.0.5", "mac": "aa:bb:cc:dd:ee:ff",
                             "wol": {"broadcast": "127.0.0.1"}}},
        "routes": [
            {"listen": "127.0.0.1:8080", "node": "gpubox", "backend_port": 8080},
            {"listen": "127.0.0.1:8000", "node": "gpubox", "backend_port": 8080,
             "protocol": "http", "http": {}},
        ],
    }


def node_table() -> dict[str, Any]:
    return {
        "agent": {"api_listen": "127.0.0.1:9181", "state_file": "state.toml"},
        "proxy": {"url": "http://127.0.0.1:9180"},
        "instances": {"small": {"model": "small.gguf", "port": 8080, "health": {},
                                "restart": {}}},
    }


def at(table: dict[str, Any], dotted: str) -> dict[str, Any]:
    """The sub-table at ``nodes.gpubox`` or ``routes[1].http``."""
    for part in dotted.split("."):
        name, _, index = part.partition("[")
        table = table.setdefault(name, {})
        if index:
            table = table[int(index.rstrip("]"))]  # type: ignore[index]
    return table


def write(tmp_path: Path, table: dict[str, Any], name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(tomli_w.dumps(table))
    return path


def load_error(tmp_path: Path, table: dict[str, Any], *, edge: bool) -> ConfigError:
    path = write(tmp_path, table)
    with pytest.raises(ConfigError) as info:
        (load_edge_config if edge else load_node_config)(path)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"{path}: ")
    return info.value


EDGE_SECTIONS = {"nodes.gpubox": NodeConfig, "routes[1].http": HttpOptions,
                 "limits": LimitsConfig, "alerts": AlertsConfig,
                 "history": HistoryConfig}
NODE_SECTIONS = {"power": PowerSection, "pstate": PstateSection, "proxy": ProxySection,
                 "instances.small": InstanceConfig, "instances.small.health": HealthConfig,
                 "instances.small.restart": RestartConfig, "report": ReportSection}


def float_keys(sections: dict[str, type]) -> list[str]:
    return [f"{where}.{f.name}" for where, cls in sections.items()
            for f in dataclasses.fields(cls) if get_type_hints(cls)[f.name] is float]


EDGE_FLOATS = float_keys(EDGE_SECTIONS)
NODE_FLOATS = float_keys(NODE_SECTIONS)
# The float keys that are not durations, each with its unit in its name
QUANTITIES = {"nodes.gpubox.host_idle_watts", "nodes.gpubox.host_sleep_watts",
              "history.retention_days", "history.max_mib"}


def test_every_duration_is_covered() -> None:
    assert len(EDGE_FLOATS) + len(NODE_FLOATS) >= 18
    assert all(key.endswith("_s") for key in EDGE_FLOATS + NODE_FLOATS if key not in QUANTITIES)
    assert set(EDGE_FLOATS) >= QUANTITIES


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", EDGE_FLOATS + NODE_FLOATS)
def test_non_finite_durations_are_refused(tmp_path: Path, key: str, value: float) -> None:
    edge = key in EDGE_FLOATS
    table = edge_table() if edge else node_table()
    section, _, name = key.rpartition(".")
    at(table, section)[name] = value
    err = load_error(tmp_path, table, edge=edge)
    assert err.key == key
    unit = "" if key in QUANTITIES else " of seconds"
    assert err.problem.startswith(f"found {value!r}; allowed: a finite number{unit}")


@pytest.mark.parametrize(("edge", "section", "value", "problem"), [
    (True, {"alerts": {"gpu_temp_c": -5}}, "alerts.gpu_temp_c", "found -5.0; allowed: between"),
    (True, {"alerts": {"gpu_memory_pct": 101}}, "alerts.gpu_memory_pct", "found 101.0; allowed"),
    (True, {"alerts": {"alert_command": []}}, "alerts.alert_command", "empty; expected an argv"),
    (True, {"alerts": {"gpu_temp": 80}}, "alerts.gpu_temp", "unknown key"),
    (False, {"report": {"sample_interval_s": 0}}, "report.sample_interval_s", "found 0.0; allowed"),
    (False, {"report": {"batch_records": 5000}}, "report.batch_records", "found 5000; allowed"),
])
def test_alerts_and_report_settings_are_checked(tmp_path: Path, edge: bool,
                                                section: dict[str, Any], value: str,
                                                problem: str) -> None:
    table = {**(edge_table() if edge else node_table()), **section}
    err = load_error(tmp_path, table, edge=edge)
    assert (err.key, err.problem[:len(problem)]) == (value, problem)


def test_non_finite_message_names_the_bounds(tmp_path: Path) -> None:
    table = node_table()
    table["power"] = {"idle_timeout_s": math.nan}
    err = load_error(tmp_path, table, edge=False)
    assert str(err).endswith("power.idle_timeout_s: found nan; allowed: a finite number of "
                             "seconds between 1 and 604800")


@pytest.mark.parametrize("section, key, value", [
    ("nodes.gpubox", "host", "999.999.999.999"),
    ("nodes.gpubox", "host", "256.1.1.1"),
    ("nodes.gpubox", "host", "gpu box"),
    ("nodes.gpubox", "host", "-gpubox"),
    ("routes[0]", "listen", "256.1.1.1:80"),
    ("routes[0]", "listen", "999.999.999.999:8080"),
    ("routes[0]", "listen", "[1.2.3.4]:8080"),
    ("routes[0]", "listen", "127.0.0.1:\u00b2"),
    ("control", "listen", "300.0.0.1:9180"),
])
def test_unparseable_edge_addresses_are_refused(tmp_path: Path, section: str, key: str,
                                                value: str) -> None:
    table = edge_table()
    at(table, section)[key] = value
    err = load_error(tmp_path, table, edge=True)
    assert err.key == f"{section}.{key}"
    assert repr(value) in err.problem or value in err.problem


@pytest.mark.parametrize("where, value", [
    ({"host": "999.999.999.999"}, "instances.small.host"),
    ({"command": "llama-server --model /m.gguf --host 256.1.1.1 --port 8081", "model": None},
     "instances.small.command"),
    ({"command": ["llama-server", "-m", "/m.gguf", "--port", "99999"], "model": None},
     "instances.small.command"),
])
def test_unparseable_instance_addresses_are_refused(tmp_path: Path, where: dict[str, Any],
                                                    value: str) -> None:
    table = node_table()
    inst = table["instances"]["small"]
    for k, v in where.items():
        if v is None:
            inst.pop(k)
            inst.pop("port")
        else:
            inst[k] = v
    assert load_error(tmp_path, table, edge=False).key == value


def test_agent_api_listen_must_parse(tmp_path: Path) -> None:
    table = node_table()
    table["agent"]["api_listen"] = "256.1.1.1:9181"
    assert load_error(tmp_path, table, edge=False).key == "agent.api_listen"


@pytest.mark.parametrize("first, second", [
    ("0.0.0.0:8080", "127.0.0.1:8080"),
    ("127.0.0.1:8080", "0.0.0.0:8080"),
    ("[::]:8080", "[::1]:8080"),
    ("localhost:8080", "127.0.0.1:8080"),
    ("127.0.0.1:8080", "127.0.0.1:08080"),  # one address written two ways: two listeners
])
def test_a_wildcard_listener_collides_with_a_specific_one(tmp_path: Path, first: str,
                                                          second: str) -> None:
    table = edge_table()
    table["routes"][0]["listen"] = first
    table["routes"].append({"listen": second, "node": "gpubox", "backend_port": 8081})
    err = load_error(tmp_path, table, edge=True)
    assert err.key == "routes[2].listen"
    assert "routes[0].listen" in err.problem


@pytest.mark.parametrize("first, second", [
    ("0.0.0.0:8080", "[::]:8080"),  # IPV6_V6ONLY listeners: the families do not collide
    ("127.0.0.1:8080", "127.0.0.2:8080"),
    ("0.0.0.0:8080", "0.0.0.0:8081"),
])
def test_listeners_that_can_coexist_are_accepted(tmp_path: Path, first: str, second: str) -> None:
    table = edge_table()
    table["routes"][0]["listen"] = first
    table["routes"].append({"listen": second, "node": "gpubox", "backend_port": 8081})
    assert len(load_edge_config(write(tmp_path, table)).routes) == 3


@pytest.mark.parametrize("route_listen", ["127.0.0.1:9180", "0.0.0.0:9180", "localhost:9180"])
def test_the_control_listener_may_not_take_a_route_address(tmp_path: Path,
                                                           route_listen: str) -> None:
    table = edge_table()
    table["routes"][0]["listen"] = route_listen
    err = load_error(tmp_path, table, edge=True)
    assert err.key == "routes[0].listen"
    assert "control.listen" in err.problem


@pytest.mark.parametrize("api, instance", [
    ("127.0.0.1:8080", {}),
    ("0.0.0.0:8080", {"host": "127.0.0.1"}),
    ("127.0.0.1:8080", {"enabled": False}),  # `node-agent enable` would start it there
])
def test_the_agent_api_may_not_take_an_instance_port(tmp_path: Path, api: str,
                                                     instance: dict[str, Any]) -> None:
    table = node_table()
    table["agent"]["api_listen"] = api
    table["agent"]["token"] = "t0ken"
    table["instances"]["small"].update(instance)
    err = load_error(tmp_path, table, edge=False)
    assert err.key == "instances.small.port"
    assert "agent.api_listen" in err.problem


def test_the_agent_api_is_checked_against_instance_files(tmp_path: Path) -> None:
    table = node_table()
    table["agent"]["instances_dir"] = "instances.d"
    (tmp_path / "instances.d").mkdir()
    extra = write(tmp_path / "instances.d", {"instances": {"late": {
        "command": ["llama-server", "-m", "/m.gguf", "--port", "9181"]}}}, "late.toml")
    path = write(tmp_path, table)
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    assert (info.value.source, info.value.key) == (str(extra), "instances.late.port")


@pytest.mark.parametrize("pstate", [
    {"low": 16},  # "driver decides" is no low state
    {"low": 0, "high": 8},  # the low state would be the fastest one
    {"low": 8, "high": 8},
    {"low": 16, "high": 8},
])
def test_pstate_low_must_be_slower_than_high(tmp_path: Path, pstate: dict[str, int]) -> None:
    table = node_table()
    table["pstate"] = pstate
    assert load_error(tmp_path, table, edge=False).key == "pstate.low"


def test_pstate_low_below_a_forced_high_state_is_fine(tmp_path: Path) -> None:
    table = node_table()
    table["pstate"] = {"low": 8, "high": 0}
    assert load_node_config(write(tmp_path, table)).pstate.high == 0


def test_backoff_initial_above_max_is_refused(tmp_path: Path) -> None:
    table = node_table()
    table["instances"]["small"]["restart"] = {"backoff_initial_s": 120.0, "backoff_max_s": 60.0}
    assert load_error(tmp_path, table, edge=False).key == "instances.small.restart.backoff_initial_s"


def test_wol_interval_above_wake_timeout_is_refused(tmp_path: Path) -> None:
    table = edge_table()
    at(table, "nodes.gpubox").update(wol_interval_s=120.0, wake_timeout_s=60.0)
    assert load_error(tmp_path, table, edge=True).key == "nodes.gpubox.wol_interval_s"


@pytest.mark.parametrize("key, value", [
    ("suspend_command", []), ("suspend_command", ""), ("suspend_command", [""]),
    ("busy_command", []), ("busy_command", "'unclosed"),
])
def test_commands_power_runs_are_checked_at_load(tmp_path: Path, key: str, value: Any) -> None:
    # These passed the loader and failed in PowerService at start, or in the middle of a reload.
    table = node_table()
    table["power"] = {key: value}
    assert load_error(tmp_path, table, edge=False).key == f"power.{key}"


def test_the_power_commands_run_are_the_ones_loaded(tmp_path: Path) -> None:
    table = node_table()
    table["power"] = {"suspend_command": "/usr/bin/loginctl suspend --ignore-inhibitors",
                      "busy_command": ["/bin/true"]}
    cfg = load_node_config(write(tmp_path, table))
    assert cfg.power.suspend_argv == ["/usr/bin/loginctl", "suspend", "--ignore-inhibitors"]
    assert cfg.power.busy_argv == ["/bin/true"]
    assert command_suspend(cfg.power).argv == cfg.power.suspend_argv


@pytest.mark.parametrize("rule", ["\u00c4B /x", "GET /x y", "GET\t/x\t/y", "get /x"])
def test_no_wake_rules_the_listener_refuses_are_refused_at_load(tmp_path: Path, rule: str) -> None:
    table = edge_table()
    table["routes"][1]["http"] = {"no_wake": [rule]}
    assert load_error(tmp_path, table, edge=True).key == "routes[1].http.no_wake[0]"


def test_every_no_wake_rule_the_loader_accepts_the_listener_builds(tmp_path: Path) -> None:
    table = edge_table()
    rules = ["GET /v1/models", "* /health*", "POST\t/x"]
    table["routes"][1]["http"] = {"no_wake": rules}
    cfg: EdgeConfig = load_edge_config(write(tmp_path, table))
    options = cfg.routes[1].http
    assert options is not None
    assert [str(r) for r in WakePolicy.from_texts(options.no_wake).no_wake] == [
        "GET /v1/models", "* /health*", "POST /x"]


def test_examples_still_load() -> None:
    examples = Path(__file__).parent.parent / "deploy" / "examples"
    assert isinstance(load_node_config(examples / "node-agent.toml"), NodeAgentConfig)
    assert isinstance(load_edge_config(examples / "edge-proxy.toml"), EdgeConfig)


@pytest.mark.parametrize("url", ["http://", "http://:9180", "http://router:0",
                                 "http://router:99999", "http://256.1.1.1:9180",
                                 "http://[::1:9180", "http://a b:9180"])
def test_a_proxy_url_without_a_usable_host_or_port_is_refused(tmp_path: Path, url: str) -> None:
    table = node_table()
    table["proxy"]["url"] = url
    assert load_error(tmp_path, table, edge=False).key == "proxy.url"


@pytest.mark.parametrize("where, value", [
    ("args", ["-c", "2048\u0000"]), ("model", "small\u0000.gguf"), ("env", {"A": "x\u0000"}),
    ("env", {"A=B": "x"}), ("env", {"": "x"}),
])
def test_what_a_spawn_refuses_is_refused_at_load(tmp_path: Path, where: str, value: Any) -> None:
    # exec raises ValueError (not OSError) for these, which the supervisor did not expect
    table = node_table()
    table["instances"]["small"][where] = value
    assert load_error(tmp_path, table, edge=False).key.startswith(f"instances.small.{where}")
