"""The import graph of the three packages: every module imports on its own, only the CLI
imports the agent's composition root, and no inference_node modules import each other in a
circle.

The graph is read from the source (``ast``): module-level imports, with ``if TYPE_CHECKING:``
blocks left out (they never run); the rule about ``inference_node.agent`` also counts imports
inside functions and type-checking blocks, since a component that names ``Agent`` at all
depends on the whole agent.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("inference_node", "edge_proxy", "shared")
ROOT_MODULE = "inference_node.agent"
ROOT_IMPORTERS = frozenset({"inference_node.cli"})
IMPORT_TIMEOUT_S = 120.0  # one interpreter per package; bounds a hang, not a speed check


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    module_level: set[str] = field(default_factory=set)  # runs at import time
    anywhere: set[str] = field(default_factory=set)  # also in functions and TYPE_CHECKING


def discover() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join(parts)
            modules[name] = Module(name, path, is_package)
    for module in modules.values():
        _read_imports(module, modules)
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: Module,
             known: dict[str, Module]) -> set[str]:
    """The project modules an import statement loads (``from pkg import sub`` loads pkg.sub)."""
    names: set[str] = set()
    if isinstance(node, ast.Import):
        names.update(alias.name for alias in node.names)
    else:
        base = node.module or ""
        if node.level:
            package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join([*package, *([base] if base else [])])
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            names.add(sub if sub in known else base)
    # A module's own parent packages are always imported before it: not an edge.
    return {n for n in names if n in known and n != module.name
            and not module.name.startswith(n + ".")}


def _read_imports(module: Module, known: dict[str, Module]) -> None:
    tree = ast.parse(module.path.read_text(), str(module.path))

    def walk(body: list[ast.stmt], at_import_time: bool) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets = _targets(node, module, known)
                module.anywhere |= targets
                if at_import_time:
                    module.module_level |= targets
            elif isinstance(node, ast.If) and _is_type_checking(node):
                walk(node.body, False)
                walk(node.orelse, at_import_time)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                walk(node.body, False)
            elif isinstance(node, ast.ClassDef):
                walk(node.body, at_import_time)
            else:
                for child_body in ("body", "orelse", "finalbody", "handlers", "cases"):
                    children = getattr(node, child_body, None)
                    if isinstance(children, list):
                        walk([c for c in children if isinstance(c, ast.stmt)], at_import_time)
                        for c in children:
                            if isinstance(c, ast.ExceptHandler | ast.match_case):
                                walk(c.body, at_import_time)

    walk(tree.body, True)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in ``graph`` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


MODULES = discover()


def test_only_the_cli_imports_the_agent_root() -> None:
    importers = sorted(m.name for m in MODULES.values() if ROOT_MODULE in m.anywhere)
    assert importers == sorted(ROOT_IMPORTERS), (
        f"{ROOT_MODULE} is the composition root: components get what they use in their "
        f"constructor instead; imported by {importers}")


def test_no_import_cycle_among_inference_node_modules() -> None:
    graph = {m.name: {t for t in m.module_level if t.startswith("inference_node")}
             for m in MODULES.values() if m.name.startswith("inference_node")}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """A circle is found, and imports are sorted into import-time and any-time ones."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = tmp_path / "x.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "from inference_node import api\n"
                      "if TYPE_CHECKING:\n    from inference_node.agent import Agent\n"
                      "def f():\n    from inference_node.gpu import service\n")
    known = {name: Module(name, source, False) for name in (
        "inference_node.x", "inference_node.agent", "inference_node.api",
        "inference_node.gpu.service")}
    module = known["inference_node.x"]
    _read_imports(module, known)
    assert module.module_level == {"inference_node.api"}
    assert module.anywhere == {"inference_node.api", "inference_node.agent",
                               "inference_node.gpu.service"}


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports_in_a_clean_interpreter(package: str) -> None:
    names = [m.name for m in MODULES.values()
             if (m.name == package or m.name.startswith(package + "."))
             and not m.name.endswith("__main__")]
    script = ("import importlib, sys, traceback\nbad = []\n"
              f"for name in {names!r}:\n"
              "    try:\n        importlib.import_module(name)\n"
              "    except Exception:\n        bad.append(name + ': ' + traceback.format_exc())\n"
              "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=IMPORT_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
