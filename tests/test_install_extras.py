"""The edge box installs only the core dependencies: the edge-proxy never imports the `node`
extra (NVML, GGUF, numpy), and the node-agent says what to install when it is missing."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.support.edge import write_config

ROOT = Path(__file__).resolve().parent.parent
# Modules that only the `node` extra brings (and nvidia_pstate, no longer a dependency at all).
NODE_ONLY = ("numpy", "gguf", "pynvml", "nvidia_pstate", "tomli_w")
# In the child: make every NODE_ONLY import fail as on an edge box, then run the code.
BLOCK = f"import sys; sys.modules.update(dict.fromkeys({NODE_ONLY!r})); "


def python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def edge_modules() -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / "edge_proxy").rglob("*.py") if p.name != "__main__.py")


def test_every_edge_module_imports_without_the_node_extra() -> None:
    imports = "; ".join(f"import {m}" for m in edge_modules())
    check = (f"loaded = {{m.split('.')[0] for m, v in sys.modules.items() if v is not None}}; "
             f"assert not loaded & set({NODE_ONLY!r}), loaded & set({NODE_ONLY!r})")
    done = python(f"{imports}; import sys; {check}")
    assert done.returncode == 0, done.stderr
    blocked = python(BLOCK + imports)
    assert blocked.returncode == 0, blocked.stderr


def test_edge_proxy_help_and_check_config_run_without_the_node_extra(tmp_path: Path) -> None:
    config = write_config(tmp_path, backend_port=9, wol_port=9)
    helped = python(BLOCK + "from edge_proxy.cli import main; sys.exit(main(['--help']))")
    assert helped.returncode == 0, helped.stderr
    assert "check-config" in helped.stdout
    checked = python(BLOCK + f"from edge_proxy.cli import main; "
                             f"sys.exit(main(['check-config', {str(config)!r}]))")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == f"{config}: ok (1 node(s), 1 route(s))"


def test_node_agent_without_the_node_extra_names_the_install_line() -> None:
    helped = python(BLOCK + "from inference_node.cli import main; sys.exit(main(['--help']))")
    assert helped.returncode == 0, helped.stderr  # --help needs none of it
    # reading a model needs gguf (imported on first use)
    done = python(BLOCK + "from inference_node.cli import main; "
                  "sys.exit(main(['plan', '/nonexistent.gguf']))")
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().startswith("node-agent: error: Python package")
    assert "pip install 'llamanap[node]'" in done.stderr
    assert "Traceback" not in done.stderr


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def test_what_the_edge_imports_is_declared_in_the_core_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    node = {_name(r) for r in project["optional-dependencies"]["node"]}
    test = {_name(r) for r in project["optional-dependencies"]["test"]}
    assert "llamanap" in test  # the test extra pulls in `node` (llamanap[node])
    assert not {"numpy", "gguf", "nvidia-ml-py", "nvidia-pstate"} & core
    assert {"numpy", "gguf", "nvidia-ml-py"} <= node
    # Every third-party package an edge_proxy (or shared) source file imports, even lazily.
    first_party = {"edge_proxy", "inference_node", "shared"}
    files = [*(ROOT / "edge_proxy").rglob("*.py"),
             *(p for p in (ROOT / "shared").rglob("*.py") if p.name != "tiny_gguf.py")]
    tops: set[str] = set()
    for path in files:
        for node_ in ast.walk(ast.parse(path.read_text())):
            if isinstance(node_, ast.Import):
                tops.update(a.name.split(".")[0] for a in node_.names)
            elif isinstance(node_, ast.ImportFrom) and node_.level == 0 and node_.module:
                tops.add(node_.module.split(".")[0])
    third_party = tops - set(sys.stdlib_module_names) - first_party - {"__future__"}
    dists = importlib.metadata.packages_distributions()
    used = {_name(d) for top in third_party for d in dists[top]}
    assert used <= core, f"imported by the edge but not core dependencies: {used - core}"
