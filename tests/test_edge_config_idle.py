"""The routes' idle timeouts in the config: defaults, and values that are not a timeout."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config.edge import load_edge_config
from shared.errors import ConfigError
from tests.test_config import EDGE_OK

FIRST_ROUTE = 'backend_port = 8080\n'


def test_defaults_and_values(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(EDGE_OK.replace(FIRST_ROUTE, FIRST_ROUTE + "upstream_idle_timeout_s = 0.5\n"
                                    "client_idle_timeout_s = 30\n"))
    first, second = load_edge_config(path).routes
    assert (first.upstream_idle_timeout_s, first.client_idle_timeout_s) == (0.5, 30)
    assert (second.upstream_idle_timeout_s, second.client_idle_timeout_s) == (600, 600)


@pytest.mark.parametrize("key", ["upstream_idle_timeout_s", "client_idle_timeout_s"])
@pytest.mark.parametrize(("value", "found"), [("0", "0.0"), ("-1.0", "-1.0"), ("inf", "inf"),
                                              ("nan", "nan")])
def test_a_timeout_must_be_positive_and_finite(tmp_path: Path, key: str, value: str,
                                               found: str) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(EDGE_OK.replace(FIRST_ROUTE, FIRST_ROUTE + f"{key} = {value}\n"))
    with pytest.raises(ConfigError) as info:
        load_edge_config(path)
    assert info.value.key == f"routes[0].{key}"
    assert str(info.value).startswith(f"{path}: routes[0].{key}: found {found}; allowed: ")
    assert "between 0.01 and 604800" in str(info.value) and "\n" not in str(info.value)
