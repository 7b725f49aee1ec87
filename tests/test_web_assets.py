"""The pages' files ship in the packages: a build of the project (setuptools, from
pyproject.toml) holds every file the dashboard and the node page serve."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from edge_proxy.dashboard.routes import ASSETS as DASHBOARD_ASSETS
from inference_node.status_page import ASSETS as NODE_ASSETS

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 120


def test_a_build_holds_every_served_file(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy, so the build leaves no egg-info in the tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("edge_proxy", "inference_node", "shared"):
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "build"
    done = subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()",
                           "-q", "build_py", "-d", str(out)], cwd=src, capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    served = {(package, name) for package, name in
              [*DASHBOARD_ASSETS.values(), *NODE_ASSETS.values()]}
    assert len(served) == 7  # the dashboard (3 files), the node page (2), shared (2)
    for package, name in served:
        built = out.joinpath(*package.split("."), name)
        assert built.is_file(), f"{package}/{name} is not in the build"
        assert built.read_bytes() == (ROOT.joinpath(*package.split("."), name)).read_bytes()
