"""Edge-proxy config rules added with the proxy itself (the base rules live in test_config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config.edge import load_edge_config
from shared.errors import ConfigError
from tests.test_config import EDGE_OK


@pytest.mark.parametrize(("old", "new", "key", "problem"), [
    ('broadcast = "127.0.0.1"', 'broadcast = "lan.example"', "nodes.gpubox.wol.broadcast",
     "found 'lan.example'; expected an IP address"),
    ('port = 9 }', 'port = 9, source = "eth0" }', "nodes.gpubox.wol.source",
     "found 'eth0'; expected an IP address"),
    ('mac = "aa:bb:cc:dd:ee:ff"', 'mac = "aa:bb:cc:dd:ee:ff"\nwake_timeout_s = 0.5',
     "nodes.gpubox.probe_timeout_s", "found 0.5; expected less than wake_timeout_s (0.5)"),
    ('mac = "aa:bb:cc:dd:ee:ff"', 'mac = "aa:bb:cc:dd:ee:ff"\ndrain_timeout_s = 0',
     "nodes.gpubox.drain_timeout_s", "found 0.0; allowed: between 0.1 and 86400"),
    ('mac = "aa:bb:cc:dd:ee:ff"', 'mac = "aa:bb:cc:dd:ee:ff"\nwake_cooldown_s = -1',
     "nodes.gpubox.wake_cooldown_s", "found -1.0; allowed: between 0 and 86400"),
    ('mac = "aa:bb:cc:dd:ee:ff"', 'mac = "aa:bb:cc:dd:ee:ff"\nwake_cooldown_s = inf',
     "nodes.gpubox.wake_cooldown_s", "found inf; allowed: a finite number of seconds between 0 and 86400"),
    ('mac = "aa:bb:cc:dd:ee:ff"', 'mac = "aa:bb:cc:dd:ee:ff"\nwake_cooldown_s = nan',
     "nodes.gpubox.wake_cooldown_s", "found nan; allowed: a finite number of seconds between 0 and 86400"),
])
def test_edge_config_rejects(tmp_path: Path, old: str, new: str, key: str, problem: str) -> None:
    path = tmp_path / "edge.toml"
    assert old in EDGE_OK
    path.write_text(EDGE_OK.replace(old, new))
    with pytest.raises(ConfigError) as info:
        load_edge_config(path)
    assert info.value.key == key
    assert str(info.value).startswith(f"{path}: {key}: {problem}")
    assert "\n" not in str(info.value)


def test_wake_cooldown_defaults_to_30_s_and_may_be_off(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(EDGE_OK)
    assert load_edge_config(path).nodes["gpubox"].wake_cooldown_s == 30.0
    path.write_text(EDGE_OK.replace('mac = "aa:bb:cc:dd:ee:ff"',
                                    'mac = "aa:bb:cc:dd:ee:ff"\nwake_cooldown_s = 0'))
    assert load_edge_config(path).nodes["gpubox"].wake_cooldown_s == 0.0
