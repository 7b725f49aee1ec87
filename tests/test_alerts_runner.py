"""The alert runner (edge_proxy.alerts.runner) with real small alert commands: the alert as
JSON on stdin; a command that fails, cannot start or overruns its timeout is logged."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry

from edge_proxy.alerts.policy import Alert
from edge_proxy.alerts.runner import AlertRunner
from shared.config.edge import AlertsConfig
from shared.reports import GpuReport

WAIT_S = 30.0


def runner(argv: list[str] | None, timeout_s: float = 10.0) -> AlertRunner:
    cfg = AlertsConfig(gpu_temp_c=80.0, alert_command=argv, alert_command_timeout_s=timeout_s)
    return AlertRunner(cfg, CollectorRegistry(), wake_failures=dict)


ALERT = Alert("gpu_temperature", "box", "gpu_temperature:box:GPU-a", "hot", 1.0, {"c": 95})


async def test_the_command_gets_the_alert_as_json_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "alert.json"
    argv = [sys.executable, "-c", f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"]
    assert await runner(argv).run_command(argv, ALERT)
    assert json.loads(out.read_text()) == ALERT.to_json()


async def test_observed_alerts_run_the_command_once_per_key(tmp_path: Path) -> None:
    out = tmp_path / "alerts.jsonl"
    argv = [sys.executable, "-c",
            f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read())"]
    r = runner(argv)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        for t in range(5):
            r.observe("box", GpuReport(t + 1, float(t), "GPU-a", temperature_c=95.0))
        with trio.fail_after(WAIT_S):
            while not out.exists():
                await trio.sleep(0.02)
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    [line] = out.read_text().splitlines()
    assert json.loads(line)["key"] == "gpu_temperature:box:GPU-a"
    assert [a.key for a in r.raised] == ["gpu_temperature:box:GPU-a"]


@pytest.mark.parametrize(("argv", "timeout_s", "logged"), [
    ([sys.executable, "-c", "import sys; print('no route to pager', file=sys.stderr); "
      "sys.exit(2)"], 10.0, "exited 2: no route to pager"),
    (["/nonexistent/alert-command"], 10.0, "cannot run: No such file or directory"),
    ([sys.executable, "-c", "import time; time.sleep(60)"], 0.3,
     "did not finish within 0.3 s (alerts.alert_command_timeout_s); killed"),
])
async def test_a_failing_command_is_logged_in_one_line(
        argv: list[str], timeout_s: float, logged: str,
        caplog: pytest.LogCaptureFixture) -> None:
    r = runner(argv, timeout_s)
    with caplog.at_level(logging.ERROR, logger="edge_proxy.alerts.runner"):
        assert not await r.run_command(argv, ALERT)
    [record] = [rec for rec in caplog.records if rec.name == "edge_proxy.alerts.runner"]
    assert logged in record.getMessage()
    assert "gpu_temperature:box:GPU-a" in record.getMessage()
    assert r.command_failures == 1
