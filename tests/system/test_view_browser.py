"""The live page in a real browser (issue 22): Debian's headless chromium driven by Selenium
through Debian's chromedriver (``make browser`` installs both; nothing is downloaded here).

Against a twin run on the agent's own loop: the page loads, its canvas is not blank, it updates
as frames arrive, a click on Pause pauses the agent (in its state and in its log), a request
without the token is refused, and a screenshot is saved as an artifact
(``runs/artifacts/view_browser.png``, or under ``$STEMAGENT_ARTIFACTS``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from stemagent.agent.app.factory import build_agent, build_clock
from stemagent.agent.view.live import LiveSource
from stemagent.agent.view.server import ViewServer
from stemagent.config import config_from_dict
from stemagent.runlog import RunLog
from stemagent.simulators.minimal import MinimalTwinDriver

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (("/usr/bin/chromedriver") if Path("/usr/bin/chromedriver").exists() else None)

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="Debian's chromium and chromium-driver are not installed (`make browser` installs them)"),
]

CFG = {
    "name": "view-browser", "seed": 5, "max_frames": 100000,
    "driver": {"kind": "minimal-twin", "pace": "realtime"},
    "scan": {"fov_A": 25.6, "shape_px": 128, "dwell_s": 2e-6},  # 33 ms a frame at the twin's real pace
    "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0, "dose_budget_e_per_A2": 1e12},
    "log": {"fsync": False},
}


def artifacts_dir() -> Path:
    where = Path(os.environ.get("STEMAGENT_ARTIFACTS", Path(__file__).resolve().parents[2] / "runs" / "artifacts"))
    where.mkdir(parents=True, exist_ok=True)
    return where


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800",
                "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


async def until(cond, timeout_s=30.0, what="condition"):
    for _ in range(int(timeout_s / 0.05)):
        if await cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not met within {timeout_s} s")


CANVAS_STD = """
const c = document.getElementById('frame'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let s = 0, s2 = 0, n = 0; for (let i = 0; i < d.length; i += 16) { s += d[i]; s2 += d[i] * d[i]; n++; }
return Math.sqrt(s2 / n - (s / n) * (s / n));
"""

NO_TOKEN = """
const done = arguments[arguments.length - 1];
fetch('/api/control', {method: 'POST', body: JSON.stringify({command: 'abort'})}).then(r => done(r.status));
"""


async def test_page_shows_the_run_updates_and_pauses_the_agent(tmp_path):
    cfg = config_from_dict(CFG)
    clock = build_clock(cfg)
    source = LiveSource()
    agent = await build_agent(cfg, run_dir=tmp_path / "run", driver=MinimalTwinDriver(cfg.driver, clock=clock), clock=clock,
                              telemetry=source)
    source.attach(agent)
    browser = await asyncio.to_thread(chromium)
    try:
        async with ViewServer(source, "127.0.0.1", 0) as server:
            run = asyncio.ensure_future(agent.run())

            def js(script, *args):
                return asyncio.to_thread(browser.execute_script, script, *args)

            await asyncio.to_thread(browser.get, server.url)

            async def drawn():
                return (await js("return window.stemagentView && window.stemagentView.draws")) or 0

            await until(lambda: _gt(drawn, 0), what="the page draws a frame")
            first = await js("return window.stemagentView.doc.frame.index")
            assert await js(CANVAS_STD) > 5.0  # the canvas shows an image, not a blank
            await until(lambda: _newer(js, first), what="the page updates as frames arrive")
            assert await js("return document.getElementById('state').textContent") == "running"
            assert await js("return window.stemagentView.doc.atoms.col_row.length") > 10

            assert await asyncio.to_thread(browser.execute_async_script, NO_TOKEN) == 401  # no token: refused
            assert agent.sm.state.value == "running"

            await asyncio.to_thread(lambda: browser.find_element("id", "pause").click())

            async def paused():
                return agent.sm.state.value == "paused" and (await js("return document.getElementById('state').textContent")) == "paused"

            await until(paused, what="the agent and the page are paused")
            ack = await js("return document.getElementById('acks').textContent")
            assert "pause (view-1): accepted" in ack
            await asyncio.to_thread(browser.save_screenshot, str(artifacts_dir() / "view_browser.png"))
            await asyncio.to_thread(lambda: browser.find_element("id", "stop").click())
            summary = await asyncio.wait_for(run, 30)
    finally:
        await asyncio.to_thread(browser.quit)
    assert summary.reason == "operator stop" and summary.pauses == 1
    controls = RunLog.open(summary.log_path).event_data("controls")
    assert [(c["command"], c["id"], c["accepted"], c["reason"]) for c in controls] == [
        ("pause", "view-1", True, "from the live view"), ("stop", "view-2", True, "from the live view")]
    assert (artifacts_dir() / "view_browser.png").stat().st_size > 10_000


async def _gt(get, n):
    return (await get()) > n


async def _newer(js, first):
    return (await js("return window.stemagentView.doc.frame.index")) > first


async def test_the_browser_closing_mid_run_leaves_the_agent_running(tmp_path):
    cfg = config_from_dict({**CFG, "max_frames": 40})
    clock = build_clock(cfg)
    source = LiveSource()
    agent = await build_agent(cfg, run_dir=tmp_path / "run", driver=MinimalTwinDriver(cfg.driver, clock=clock), clock=clock,
                              telemetry=source)
    source.attach(agent)
    browser = await asyncio.to_thread(chromium)
    closed = False
    try:
        async with ViewServer(source, "127.0.0.1", 0) as server:
            run = asyncio.ensure_future(agent.run())
            await asyncio.to_thread(browser.get, server.url)

            async def drawn():
                return (await asyncio.to_thread(browser.execute_script, "return window.stemagentView && window.stemagentView.draws")) or 0

            await until(lambda: _gt(drawn, 1), what="the page draws")
            assert not run.done()
            await asyncio.to_thread(browser.quit)  # the operator closes the browser, a long poll pending
            closed = True
            summary = await asyncio.wait_for(run, 60)
            snapshots = server.stats["snapshots"]
    finally:
        if not closed:
            await asyncio.to_thread(browser.quit)
    assert summary.exit_status == "success" and summary.frames == 40 and snapshots >= 2
