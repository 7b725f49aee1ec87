"""Config loading: real TOML files in a temp dir, checked for the exact key each error names."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from shared.config.edge import load_edge_config
from shared.config.node import load_node_config
from shared.errors import ConfigError

EDGE_OK = """
[control]
listen = "127.0.0.1:9180"

[nodes.gpubox]
host = "10.0.0.5"
mac = "aa:bb:cc:dd:ee:ff"
wol = { broadcast = "127.0.0.1", port = 9 }

[[routes]]
listen = "127.0.0.1:8080"
node = "gpubox"
backend_port = 8080

[[routes]]
listen = "[::1]:8081"
node = "gpubox"
backend_port = 8081
ready = "http:/health"
"""

NODE_OK = """
[agent]
api_listen = "127.0.0.1:9181"
state_file = "state.toml"

[instances.small]
model = "models/small.gguf"
port = 8080
args = ["-c", "2048"]
gpus = [0]

[instances.other]
command = "/usr/bin/llama-server --model /m.gguf --port 8081"
"""


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def edge_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_edge_config(write(tmp_path, text))
    return info.value


def node_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_node_config(write(tmp_path, text))
    return info.value


def test_edge_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_edge_config(write(tmp_path, EDGE_OK))
    node = cfg.nodes["gpubox"]
    assert node.mac_bytes == bytes.fromhex("aabbccddeeff")
    assert node.wol.broadcast == "127.0.0.1"
    assert cfg.routes[1].listen_addr.host == "::1"
    assert cfg.routes[1].ready_http_path == "/health"
    assert cfg.routes[0].ready_http_path is None


def test_node_config_resolves_relative_paths_against_the_file(tmp_path: Path) -> None:
    cfg = load_node_config(write(tmp_path, NODE_OK))
    assert cfg.instances["small"].model == tmp_path / "models/small.gguf"
    assert cfg.agent.state_file == tmp_path / "state.toml"
    assert cfg.instances["other"].effective_port == 8081
    assert cfg.instances["other"].argv_list == [
        "/usr/bin/llama-server", "--model", "/m.gguf", "--port", "8081"]


def test_one_line_error_names_file_key_found_and_allowed(tmp_path: Path) -> None:
    err = edge_error(tmp_path, EDGE_OK.replace("backend_port = 8081", "backend_port = 70000"))
    assert err.key == "routes[1].backend_port"
    assert str(err) == f"{tmp_path / 'config.toml'}: routes[1].backend_port: found 70000; allowed: between 1 and 65535"
    assert "\n" not in str(err)


# Each case: (what is wrong, config text, the exact dotted key the error must name).
EDGE_BAD = [
    ("unknown key", EDGE_OK.replace('host = "10.0.0.5"', 'host = "10.0.0.5"\nhots = 1'), "nodes.gpubox.hots"),
    ("wrong type", EDGE_OK.replace("backend_port = 8080", 'backend_port = "8080"'), "routes[0].backend_port"),
    ("bad MAC", EDGE_OK.replace("aa:bb:cc:dd:ee:ff", "aa:bb:cc:dd:ee"), "nodes.gpubox.mac"),
    ("route to unknown node", EDGE_OK.replace('node = "gpubox"\nbackend_port = 8081', 'node = "gpu"\nbackend_port = 8081'), "routes[1].node"),
    ("bad listen address", EDGE_OK.replace('"127.0.0.1:8080"', '"127.0.0.1"'), "routes[0].listen"),
    ("unbracketed IPv6", EDGE_OK.replace('"[::1]:8081"', '"::1:8081"'), "routes[1].listen"),
    ("bad readiness", EDGE_OK.replace('ready = "http:/health"', 'ready = "https"'), "routes[1].ready"),
    ("negative interval", EDGE_OK.replace('host = "10.0.0.5"', 'host = "10.0.0.5"\nwol_interval_s = -1'), "nodes.gpubox.wol_interval_s"),
    ("bad literal", EDGE_OK.replace("backend_port = 8080", 'backend_port = 8080\nprotocol = "udp"'), "routes[0].protocol"),
    ("duplicate listen", EDGE_OK.replace('"[::1]:8081"', '"127.0.0.1:8080"'), "routes[1].listen"),
    ("missing required key", EDGE_OK.replace('mac = "aa:bb:cc:dd:ee:ff"\n', ""), "nodes.gpubox.mac"),
    ("token required off loopback", EDGE_OK.replace('listen = "127.0.0.1:9180"', 'listen = "0.0.0.0:9180"'), "control.token"),
    ("bad SecureOn password", EDGE_OK.replace("port = 9 }", 'port = 9, password = "xyz" }'), "nodes.gpubox.wol.password"),
    ("wol port out of range", EDGE_OK.replace("port = 9 }", "port = 0 }"), "nodes.gpubox.wol.port"),
]


@pytest.mark.parametrize(("case", "text", "key"), EDGE_BAD, ids=[c[0] for c in EDGE_BAD])
def test_edge_config_rejects(tmp_path: Path, case: str, text: str, key: str) -> None:
    err = edge_error(tmp_path, text)
    assert err.key == key, str(err)
    assert str(err).startswith(f"{tmp_path / 'config.toml'}: {key}: ")


NODE_BAD = [
    ("unknown instance key", NODE_OK.replace("port = 8080", "port = 8080\nmodle = 'x'"), "instances.small.modle"),
    ("both forms", NODE_OK.replace('command = "/usr', 'model = "x.gguf"\ncommand = "/usr'), "instances.other.command"),
    ("neither form", NODE_OK.replace('command = "/usr/bin/llama-server --model /m.gguf --port 8081"', "port = 9"), "instances.other"),
    ("port collision", NODE_OK.replace("--port 8081", "--port 8080"), "instances.other.port"),
    ("auto gpus without a model path", NODE_OK.replace("--model /m.gguf --port 8081\"", '--port 8081"\ngpus = "auto"'), "instances.other.gpus"),
    ("bad gpus type", NODE_OK.replace("gpus = [0]", "gpus = 0"), "instances.small.gpus"),
    ("bad env value", NODE_OK.replace("gpus = [0]", "env = { A = 1 }"), "instances.small.env.A"),
    ("unclosed quote in command", NODE_OK.replace("--port 8081", "--port 8081 '"), "instances.other.command"),
    ("bad restart policy", NODE_OK.replace("gpus = [0]", 'restart = { policy = "sometimes" }'), "instances.small.restart.policy"),
    ("pstate out of range", NODE_OK + "\n[pstate]\nlow = 17\n", "pstate.low"),
    ("bad hook", NODE_OK.replace("gpus = [0]", "post_launch_hooks = [[]]"), "instances.small.post_launch_hooks[0]"),
    ("bad health path", NODE_OK.replace("gpus = [0]", 'health = { path = "health" }'), "instances.small.health.path"),
    ("api off loopback without token", NODE_OK.replace('"127.0.0.1:9181"', '"0.0.0.0:9181"'), "agent.token"),
    ("proxy url", NODE_OK + '\n[proxy]\nurl = "router:9180"\n', "proxy.url"),
]


@pytest.mark.parametrize(("case", "text", "key"), NODE_BAD, ids=[c[0] for c in NODE_BAD])
def test_node_config_rejects(tmp_path: Path, case: str, text: str, key: str) -> None:
    err = node_error(tmp_path, text)
    assert err.key == key, str(err)


def test_malformed_toml_names_the_file_and_line(tmp_path: Path) -> None:
    err = edge_error(tmp_path, "[nodes\n")
    assert str(err).startswith(str(tmp_path / "config.toml"))
    assert "line 1" in str(err)


def test_token_file_is_read_and_never_shown(tmp_path: Path) -> None:
    (tmp_path / "proxy.token").write_text("s3cret-token\n")
    text = EDGE_OK.replace('listen = "127.0.0.1:9180"', 'listen = "0.0.0.0:9180"\ntoken_file = "proxy.token"')
    cfg = load_edge_config(write(tmp_path, text))
    assert cfg.control.token is not None
    assert cfg.control.token.reveal() == "s3cret-token"
    assert "s3cret" not in repr(cfg)


def test_empty_token_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "proxy.token").write_text("\n")
    text = EDGE_OK.replace('listen = "127.0.0.1:9180"', 'listen = "127.0.0.1:9180"\ntoken_file = "proxy.token"')
    err = edge_error(tmp_path, text)
    assert err.key == "control.token_file"


def test_wrong_type_for_secret_hides_the_value(tmp_path: Path) -> None:
    text = EDGE_OK.replace('listen = "127.0.0.1:9180"', 'listen = "127.0.0.1:9180"\ntoken = ""')
    err = edge_error(tmp_path, text)
    assert err.key == "control.token"


def test_instances_dir_merges_files_and_names_the_file_with_the_error(tmp_path: Path) -> None:
    folder = tmp_path / "instances.d"
    folder.mkdir()
    (folder / "a.toml").write_text('[instances.extra]\nmodel = "e.gguf"\nport = 8090\n')
    main = write(tmp_path, NODE_OK.replace("[agent]", '[agent]\ninstances_dir = "instances.d"'))
    cfg = load_node_config(main)
    assert set(cfg.instances) == {"small", "other", "extra"}
    assert cfg.instances["extra"].model == folder / "e.gguf"

    (folder / "b.toml").write_text('[instances.dup]\nmodel = "d.gguf"\nport = 8080\n')
    with pytest.raises(ConfigError) as info:
        load_node_config(main)
    assert info.value.source == str(folder / "b.toml")
    assert info.value.key == "instances.dup.port"

    (folder / "b.toml").write_text('[instances.small]\nmodel = "d.gguf"\nport = 8095\n')
    with pytest.raises(ConfigError) as info:
        load_node_config(main)
    assert info.value.key == "instances.small"
    assert "already defined" in str(info.value)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_edge_config(tmp_path / "nope.toml")
    assert "file not found" in str(info.value)


def test_on_demand_keys_and_their_defaults(tmp_path: Path) -> None:
    from shared.config.node import DEFAULT_TTL_S, load_node_config
    path = tmp_path / "node.toml"
    path.write_text('[agent]\nmemory_budget_mib = 8000\nevict_wait_s = 5\n'
                    '[instances.a]\nmodel = "/m/a.gguf"\nport = 8001\nload = "on-demand"\n'
                    'models = ["qwen2.5-7b", "qwen"]\n'
                    '[instances.b]\nmodel = "/m/b.gguf"\nport = 8002\n')
    cfg = load_node_config(path)
    assert cfg.agent.memory_budget_mib == 8000 and cfg.agent.evict_wait_s == 5
    a, b = cfg.instances["a"], cfg.instances["b"]
    assert (a.load, a.ttl_s, a.model_names("a")) == ("on-demand", DEFAULT_TTL_S,
                                                      ["qwen2.5-7b", "qwen"])
    assert (b.load, b.model_names("b")) == ("always", ["b"])


@pytest.mark.parametrize(("extra", "key", "says"), [
    ('load = "sometimes"', "instances.a.load", "on-demand"),
    ("ttl_s = -1", "instances.a.ttl_s", "between 0 and"),
    ("ttl_s = nan", "instances.a.ttl_s", "a finite number"),
    ("models = []", "instances.a.models", "at least one name"),
    ('models = ["x", "x"]', "instances.a.models[1]", "listed twice"),
])
def test_on_demand_keys_are_validated(tmp_path: Path, extra: str, key: str, says: str) -> None:
    from shared.config.node import load_node_config
    path = tmp_path / "node.toml"
    path.write_text(f'[instances.a]\nmodel = "/m/a.gguf"\nport = 8001\n{extra}\n')
    with pytest.raises(ConfigError) as exc:
        load_node_config(path)
    assert key in str(exc.value) and says in str(exc.value)


def test_a_model_name_belongs_to_one_instance(tmp_path: Path) -> None:
    from shared.config.node import load_node_config
    (tmp_path / "d").mkdir()
    path = tmp_path / "node.toml"
    path.write_text('[agent]\ninstances_dir = "d"\n'
                    '[instances.a]\nmodel = "/m/a.gguf"\nport = 8001\nmodels = ["qwen"]\n')
    (tmp_path / "d" / "b.toml").write_text(
        '[instances.b]\nmodel = "/m/b.gguf"\nport = 8002\nmodels = ["coder", "qwen"]\n')
    with pytest.raises(ConfigError) as exc:
        load_node_config(path)
    msg = str(exc.value)
    assert "b.toml" in msg and "instances.b.models[1]" in msg and "'a'" in msg
