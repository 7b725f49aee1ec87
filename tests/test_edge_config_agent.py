"""``[nodes.NAME]`` agent_url / agent_token_file: where the proxy asks a node's agent for its
models and for loads of on-demand models."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config.edge import load_edge_config
from shared.errors import ConfigError
from tests.test_config import EDGE_OK

MAC = 'mac = "aa:bb:cc:dd:ee:ff"'


def _write(tmp_path: Path, extra: str) -> Path:
    assert MAC in EDGE_OK
    path = tmp_path / "edge.toml"
    path.write_text(EDGE_OK.replace(MAC, f"{MAC}\n{extra}"))
    return path


def test_agent_url_and_token_file_are_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "agent.token").write_text("s3cret\n")
    path = _write(tmp_path, 'agent_url = "http://127.0.0.1:9181"\nagent_token_file = "agent.token"')
    node = load_edge_config(path).nodes["gpubox"]
    assert node.agent_url == "http://127.0.0.1:9181"
    assert node.agent_token is not None and node.agent_token.reveal() == "s3cret"
    assert "s3cret" not in repr(node)


def test_without_agent_url_there_is_no_agent(tmp_path: Path) -> None:
    node = load_edge_config(_write(tmp_path, "")).nodes["gpubox"]
    assert node.agent_url is None and node.agent_token is None


@pytest.mark.parametrize(("extra", "key", "problem"), [
    ('agent_url = "127.0.0.1:9181"', "nodes.gpubox.agent_url",
     "found '127.0.0.1:9181'; expected http://HOST:PORT"),
    ('agent_url = "http://127.0.0.1:0"', "nodes.gpubox.agent_url",
     "found 'http://127.0.0.1:0'; expected http://HOST:PORT (PORT 1 to 65535)"),
    ('agent_url = "http://256.1.1.1:9181"', "nodes.gpubox.agent_url",
     "found 'http://256.1.1.1:9181'; '256.1.1.1' is not an IPv4 address"),
    ('agent_token_file = "agent.token"', "nodes.gpubox.agent_url",
     "missing; a token is set but no agent_url to send it to"),
    ('agent_url = "http://127.0.0.1:9181"\nagent_token_file = "missing.token"',
     "nodes.gpubox.agent_token_file", "cannot read"),
    ('agent_url = "http://127.0.0.1:9181"\nagent_token_file = "empty.token"',
     "nodes.gpubox.agent_token_file", "empty.token is empty; put the token in it"),
    ('agent_url = "http://127.0.0.1:9181"\nagent_token = "x"\nagent_token_file = "empty.token"',
     "nodes.gpubox.agent_token_file", "set either agent_token or agent_token_file, not both"),
])
def test_agent_keys_are_checked(tmp_path: Path, extra: str, key: str, problem: str) -> None:
    (tmp_path / "empty.token").write_text("\n")
    path = _write(tmp_path, extra)
    with pytest.raises(ConfigError) as info:
        load_edge_config(path)
    assert info.value.key == key
    assert problem in str(info.value)
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert "\n" not in str(info.value)
