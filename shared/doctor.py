"""What both ``doctor`` commands share: check results, the host they read, the report.

A check is a small function that looks at one thing and returns ``CheckResult`` objects: a
status (ok, warn, fail, skip), a detail a person can read, and for anything not ok the fix.
Checks read the machine only through ``Host``: files under /sys and /proc, programs, shared
libraries, the user id. ``RealHost`` reads the real machine; its ``root`` and ``path`` let the
same code read a copy of /sys and /proc made of real files and run programs from another
folder, which is how the pass and fail branches are tested.

The report is a table (one line per check, an indented ``fix:`` line under each failure or
warning) or JSON; the exit code is 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import enum
import json
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TextIO

from shared.cli import EXIT_FAILURE, EXIT_OK

# Programs the doctor runs (ethtool, systemctl, busctl) answer at once; the bound only keeps
# a hung D-Bus or driver from hanging the doctor.
COMMAND_TIMEOUT_S: Final = 10.0
# Longest detail kept from a program's output, so one chatty tool cannot flood the table.
MAX_OUTPUT_CHARS: Final = 300


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class CheckResult:
    """One line of the report. ``fix`` says what to do; it is empty when nothing is to be done."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail,
                "fix": self.fix}


def ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.OK, detail)


def warn(name: str, detail: str, fix: str = "") -> CheckResult:
    return CheckResult(name, Status.WARN, detail, fix)


def fail(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, Status.FAIL, detail, fix)


def skip(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.SKIP, detail)


@dataclass(frozen=True)
class Completed:
    """What a program printed and how it exited."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """stdout and stderr together, cut to ``MAX_OUTPUT_CHARS``, for a detail line."""
        text = " ".join((self.stdout.strip() + " " + self.stderr.strip()).split())
        return text[:MAX_OUTPUT_CHARS]


class Host(Protocol):
    """The facts of the machine a check may read. Paths are absolute, as on the real system."""

    def read_text(self, path: str) -> str | None:
        """The file's text, or None when it does not exist or cannot be read."""
        ...

    def exists(self, path: str) -> bool: ...

    def list_dir(self, path: str) -> list[str]:
        """Sorted names in a folder; [] when it does not exist."""
        ...

    def run(self, argv: Sequence[str]) -> Completed | None:
        """Run a program (bounded by ``COMMAND_TIMEOUT_S``); None when it is not installed.

        A program that hangs past the bound comes back with returncode -1 and says so.
        """
        ...

    def load_library(self, name: str) -> str | None:
        """Load a shared library by soname; None when it loads, else why not (one line)."""
        ...

    def euid(self) -> int: ...


class RealHost:
    """The machine itself, or a copy of its /sys and /proc under ``root`` for tests.

    ``path`` (a PATH string) is where programs are looked up; None means the process's PATH.
    """

    def __init__(self, root: Path = Path("/"), path: str | None = None) -> None:
        self.root = root
        self.path = path

    def _at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def read_text(self, path: str) -> str | None:
        try:
            return self._at(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None

    def exists(self, path: str) -> bool:
        return self._at(path).exists()

    def list_dir(self, path: str) -> list[str]:
        try:
            return sorted(p.name for p in self._at(path).iterdir())
        except OSError:
            return []

    def run(self, argv: Sequence[str]) -> Completed | None:
        program = shutil.which(argv[0], path=self.path)
        if program is None:
            return None
        env = dict(os.environ, LC_ALL="C")  # parse English output whatever the user's locale
        if self.path is not None:
            env["PATH"] = self.path
        try:
            done = subprocess.run([program, *argv[1:]], capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S, env=env, check=False,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return Completed(-1, "", f"{argv[0]} did not answer within {COMMAND_TIMEOUT_S:g} s")
        except OSError as exc:
            return Completed(-1, "", f"{argv[0]} does not run: {exc.strerror}")
        return Completed(done.returncode, done.stdout, done.stderr)

    def load_library(self, name: str) -> str | None:
        try:
            ctypes.CDLL(name)
        except OSError as exc:
            return str(exc).splitlines()[0] if str(exc) else f"{name} cannot be loaded"
        return None

    def euid(self) -> int:
        return os.geteuid()

    def __repr__(self) -> str:
        return f"<RealHost root={str(self.root)!r} path={self.path!r}>"


def exit_code(results: Iterable[CheckResult]) -> int:
    """0 when no check failed (warnings and skips do not fail the doctor), else 1."""
    return EXIT_FAILURE if any(r.status is Status.FAIL for r in results) else EXIT_OK


def summary(results: Sequence[CheckResult]) -> str:
    counts = Counter(r.status for r in results)
    parts = [f"{counts[s]} {label}" for s, label in (
        (Status.FAIL, "failed"), (Status.WARN, "warning(s)"), (Status.OK, "ok"),
        (Status.SKIP, "skipped")) if counts[s]]
    return ", ".join(parts) if parts else "no checks ran"


def render_table(results: Sequence[CheckResult]) -> str:
    """One line per check (status, name, detail), a ``fix:`` line under each non-ok one."""
    width = max((len(r.name) for r in results), default=0)
    lines = []
    for r in results:
        label = r.status.value.upper() if r.status is Status.FAIL else r.status.value
        lines.append(f"{label:<5} {r.name:<{width}}  {r.detail}")
        if r.fix and r.status in (Status.FAIL, Status.WARN):
            lines.append(f"{'':<5} {'':<{width}}  fix: {r.fix}")
    lines.append(summary(results))
    return "\n".join(lines)


def render_json(results: Sequence[CheckResult]) -> str:
    data: dict[str, Any] = {
        "ok": exit_code(results) == EXIT_OK,
        "summary": summary(results),
        "checks": [r.as_dict() for r in results],
    }
    return json.dumps(data, indent=2)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def report(results: Sequence[CheckResult], *, as_json: bool, out: TextIO) -> int:
    """Print the results; return the exit code."""
    print(render_json(results) if as_json else render_table(results), file=out)
    return exit_code(results)
