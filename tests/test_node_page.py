"""The node-agent's page at ``/``, loaded in a real headless Chromium from a running agent:
its tables show the instances (loaded and unloaded), GPUs and power state the API returns."""

from __future__ import annotations

import functools
from pathlib import Path

import httpx
import pytest
import trio

from inference_node.agent import Agent, Component, build_parts, run_agent
from inference_node.supervisor import State
from tests.fakes.gpu import FakeNvml, RecordingBackend, three_gpu_rig
from tests.support.browser import load
from tests.support.devtools import open_browser
from tests.support.ports import free_port
from tests.support.supervised import toy_command, wait_state
from tests.test_api import FAST, TOKEN, write_config

pytestmark = pytest.mark.browser


async def _agent(nursery: trio.Nursery, tmp_path: Path) -> Agent:
    cfg = write_config(tmp_path / "node-agent.toml", {
        "a": {"command": toy_command(free_port()), "gpus": [0], **FAST},
        "b": {"command": toy_command(free_port()), "enabled": False, **FAST},
    })
    rig = three_gpu_rig()

    def components(agent: Agent) -> list[Component]:  # the real parts on a fake GPU rig
        return build_parts(agent, inventory=FakeNvml(rig), backend=RecordingBackend(rig),
                           watch_system=False).components()

    agent: Agent = await nursery.start(functools.partial(run_agent, cfg,
                                                         make_components=components))
    await wait_state(agent.supervisor, "a", State.READY)
    return agent


async def test_the_page_shows_instances_gpus_and_power(nursery: trio.Nursery,
                                                       tmp_path: Path) -> None:
    agent = await _agent(nursery, tmp_path)
    base = agent.api_urls[0]
    async with httpx.AsyncClient(base_url=base, headers={"authorization": f"Bearer {TOKEN}"}) \
            as api:
        held = await api.post("/v1/power/inhibit", json={"reason": "fine-tune running",
                                                         "for_s": 3600})
        assert held.status_code == 200
        power = (await api.get("/v1/power")).json()
        gpus = (await api.get("/v1/gpus")).json()
    shot = tmp_path / "node-page.png"
    page = await load(f"{base}/#token={TOKEN}", tmp_path, screenshot=shot)
    assert page.console == []
    assert 'data-loaded="true"' in page.dom  # the script ran to the end
    assert page.count(kind="instance") == 2
    assert page.count(kind="instance", instance="a", loaded="true") == 1
    assert page.count(kind="instance", instance="b", loaded="false") == 1
    assert page.count(kind="gpu") == len(gpus["gpus"]) == 3
    for gpu in gpus["gpus"]:
        assert page.count(kind="gpu", gpu=gpu["uuid"]) == 1
        # a GPU with nothing loaded says so
        assert page.count(kind="gpu", gpu=gpu["uuid"],
                          empty="true" if gpu["empty"] else "false") == 1
    assert page.count(kind="gpu", empty="true") == 2  # a runs on one of the three
    assert page.count(kind="keeping-awake") == len(power["keeping_awake"]) >= 1
    assert page.count(kind="inhibit") == 1 and "fine-tune running" in page.dom
    assert "node-agent · gpubox" in page.dom
    assert shot.stat().st_size > 10_000


async def test_without_the_token_the_page_asks_for_it(nursery: trio.Nursery,
                                                     tmp_path: Path) -> None:
    agent = await _agent(nursery, tmp_path)
    base = agent.api_urls[0]
    async with httpx.AsyncClient(base_url=base) as anonymous:
        page_file = await anonymous.get("/")
        data = await anonymous.get("/v1/status")
    assert page_file.status_code == 200 and "text/html" in page_file.headers["content-type"]
    assert "default-src 'self'" in page_file.headers["content-security-policy"]
    assert data.status_code == 401  # the page is public, what it shows is not
    page = await load(base + "/", tmp_path)
    assert 'id="login-form"' in page.dom
    assert page.count(kind="instance") == 0


async def test_the_page_follows_the_agent_without_a_reload(nursery: trio.Nursery,
                                                           tmp_path: Path) -> None:
    agent = await _agent(nursery, tmp_path)
    base = agent.api_urls[0]
    async with open_browser(tmp_path) as browser:
        page = await browser.open(f"{base}/#token={TOKEN}")
        await page.wait_for("document.body?.dataset.loaded === 'true'")
        assert await page.count('[data-kind="instance"][data-loaded="true"]') == 1
        async with httpx.AsyncClient(base_url=base,
                                     headers={"authorization": f"Bearer {TOKEN}"}) as api:
            started = await api.post("/v1/instances/b/enable", json={"wait": True})
        assert started.json()["state"] == "ready"
        # the next poll shows it: both models loaded, in the same page
        await page.wait_for("document.querySelectorAll("
                            "'[data-kind=\"instance\"][data-loaded=\"true\"]').length === 2")
        assert await page.evaluate("location.hash") == ""  # the token left the address bar
        await page.screenshot(tmp_path / "node-page-live.png")
        assert page.console == []
