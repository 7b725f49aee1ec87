"""``node-agent power``, ``inhibit`` and ``hook`` as a person (or the sleep hook) runs them:
real command-line processes against an agent running in this process over loopback."""

from __future__ import annotations

import functools
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import tomli_w
import trio

from inference_node.agent import Agent, run_agent
from inference_node.supervisor import State
from tests.support.ports import free_port
from tests.support.supervised import toy_command, wait_state

REPO = Path(__file__).resolve().parent.parent
FAST = {"restart": {"backoff_initial_s": 0.05}, "health": {"interval_s": 0.05}, "stop_timeout_s": 5}


async def cli(*argv: str) -> tuple[int, str, str]:
    result = await trio.run_process([sys.executable, "-m", "inference_node", *argv],
                                    capture_stdout=True, capture_stderr=True, check=False, cwd=REPO)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


@pytest.fixture
async def config(nursery: trio.Nursery, tmp_path: Path) -> Path:
    token = tmp_path / "token"
    token.write_text("cli-token\n")
    token.chmod(0o600)
    path = tmp_path / "node-agent.toml"
    path.write_text(tomli_w.dumps({
        "agent": {"api_listen": f"127.0.0.1:{free_port()}", "token_file": str(token),
                  "state_file": str(tmp_path / "state.toml")},
        # Never sleeps here: the idle timeout is far away and the suspend command would fail.
        "power": {"idle_timeout_s": 3600.0, "suspend_command": ["false"],
                  "watch_foreign_gpu_processes": False},
        "pstate": {"enabled": False},
        "instances": {"web": {"command": toy_command(free_port()), **FAST}},
    }))
    agent: Agent = await nursery.start(functools.partial(run_agent, path, handle_signals=False))
    await wait_state(agent.supervisor, "web", State.READY)
    return path


async def test_inhibit_list_power_and_remove(config: Path) -> None:
    code, out, err = await cli("inhibit", "--for", "2h", "training run", "--config", str(config))
    assert code == 0, err
    assert out.strip() == "inhibit 1: staying awake for 7200 s (training run)"

    code, out, _ = await cli("inhibit", "--list", "--config", str(config))
    assert code == 0 and out.startswith("1\t7") and out.rstrip().endswith("training run")

    code, out, _ = await cli("power", "--config", str(config))
    assert code == 0
    assert out.startswith("power: AWAKE for ")
    assert "awake because: inhibited: 'training run' for 7" in out
    assert "inhibit 1: training run (7" in out

    code, out, _ = await cli("status", "--config", str(config))  # the power lines end status
    assert code == 0 and "awake because: inhibited: 'training run'" in out

    code, out, _ = await cli("inhibit", "--remove", "1", "--config", str(config))
    assert code == 0 and out.strip() == "inhibit 1 removed"
    code, out, err = await cli("inhibit", "--remove", "1", "--config", str(config))
    assert code == 1 and err.strip() == ("node-agent: error: no inhibit with id 1; "
                                         "`node-agent inhibit --list` shows them")
    code, out, _ = await cli("inhibit", "--list", "--config", str(config))
    assert code == 0 and out.strip() == "no inhibits"


async def test_bad_durations_and_a_missing_reason_are_one_line(config: Path) -> None:
    code, _, err = await cli("inhibit", "--for", "soon", "x", "--config", str(config))
    assert code == 2 and err.rstrip().splitlines()[-1].endswith(
        "argument --for: 'soon' is not a duration; use e.g. 90s, 30m, 2h, 1d")
    code, _, err = await cli("inhibit", "--config", str(config))
    assert code == 2 and 'to add one: node-agent inhibit --for 2h "reason"' in err


async def test_an_overlong_or_multiline_reason_is_refused_in_one_line(config: Path) -> None:
    api = "http://" + tomllib.loads(config.read_text())["agent"]["api_listen"]
    async with httpx.AsyncClient(base_url=api, timeout=30,
                                 headers={"Authorization": "Bearer cli-token"}) as client:
        reply = await client.post("/v1/power/inhibit",
                                  json={"reason": "x" * 900_000, "for_s": 60})
        assert reply.status_code == 400
        assert reply.json()["error"]["message"] == (
            "reason: found 900000 characters; allowed: one line of up to 200 characters")
        reply = await client.post("/v1/power/inhibit", json={"reason": "a\nb", "for_s": 60})
        assert reply.status_code == 400 and "a line break" in reply.json()["error"]["message"]
    code, _, err = await cli("inhibit", "--for", "1h", "y" * 201, "--config", str(config))
    assert code == 1 and err.strip() == ("node-agent: error: reason: found 201 characters; "
                                         "allowed: one line of up to 200 characters")
    code, out, err = await cli("inhibit", "--for", "1h", "z" * 200, "--config", str(config))
    assert code == 0 and out.strip() == f"inhibit 1: staying awake for 3600 s ({'z' * 200})", err
    code, out, _ = await cli("inhibit", "--list", "--config", str(config))
    listed = out.splitlines()  # only the one that fits: "ID<tab>LEFT<tab>REASON"
    assert code == 0 and len(listed) == 1
    assert listed[0].startswith("1\t") and listed[0].endswith("\t" + "z" * 200)


async def test_the_sleep_hook_command_reports_pre_and_post(config: Path) -> None:
    code, out, err = await cli("hook", "pre", "suspend", "--config", str(config))
    assert (code, out.strip()) == (0, "noted"), err
    code, out, err = await cli("hook", "post", "suspend", "--config", str(config))
    assert (code, out.strip()) == (0, "resume noted"), err
    code, out, err = await cli("hook", "post", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and err.startswith("node-agent: error: cannot reach node-agent at ")
    assert err.count("\n") == 1
