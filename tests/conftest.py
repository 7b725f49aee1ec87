"""Session-wide fixtures: the real llama-server binary and a tiny model it serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import BinaryNotFound
from shared.llama_bin import find_llama_server
from shared.tiny_gguf import TinyModelSpec, write_tiny_model


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The llama-server every test runs. Missing is a failure, never a skip: these tests
    are the proof that llamanap works with the real server."""
    try:
        return find_llama_server()
    except BinaryNotFound as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A default 2-layer llama with a byte-level vocab and a ChatML template (~0.5 MB)."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama.gguf", TinyModelSpec())
