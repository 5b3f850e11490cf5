"""The live page's cost and speed (issue 22 targets), all measured in one run.

For each pipeline, runs of the same agent on the twin at the twin's real pace (the microscope
sets the frame rate), alternating **without** the page (no server, no browser) and **with** it
(the view server on the agent's loop and Debian's headless chromium showing the page, driven by
Selenium), ``--pairs`` times:

- **loop frame→decision latency** (wall time from a frame's arrival to the next command's
  issue: the run summary's latencies), p50/p95/mean without and with the page, and the ratio
  with/without (target: within 5 %);
- **page update latency frame→screen**: from the moment the agent has the analysed frame (its
  ``frame`` telemetry) to the browser having drawn it (the page's ``requestAnimationFrame``
  after the canvas is drawn; both clocks are this machine's wall clock), p50/p95 (target ≤ 200 ms),
  and how many frames reached the screen.

Pipelines: ``log`` (minimal twin, 256 x 256 px, LoG finder + raster: the lightest loop, where
the page's share is largest) and ``unet+drift`` (the physical twin, graphene with Si,
256 x 256 px, the shipped U-Net + the drift stage + raster: ``configs/twin-graphene-si.yaml``
at 4 µs dwell).

Prints one JSON document. Usage:
``python benchmarks/bench_view.py [--frames 40] [--pairs 2] [--pipelines log,unet+drift] [--screenshot docs/live_view.png]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stemagent.agent.app.factory import build_agent
from stemagent.agent.view.live import LiveSource
from stemagent.agent.view.server import ViewServer
from stemagent.config import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
PIPELINES: dict[str, dict[str, Any]] = {
    "log": load_config(ROOT / "configs" / "demo-minimal-twin.yaml").model_dump(mode="json")
    | {"driver": {"kind": "minimal-twin", "lattice_A": 2.46, "specimen_size_A": 400.0, "atom_sigma_A": 0.45,
                  "beam_current_pA": 20.0, "pace": "realtime"}},
    "unet+drift": load_config(ROOT / "configs" / "twin-graphene-si.yaml").model_dump(mode="json"),
}
PIPELINES["unet+drift"]["driver"]["pace"] = "realtime"
PIPELINES["unet+drift"]["scan"]["dwell_s"] = 4e-6
PIPELINES["unet+drift"]["safety"]["dose_budget_e_per_A2"] = 1e12


def chromium() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


async def interleaved_run(cfg_doc: dict[str, Any], frames: int, block: int, browser: Any, screenshot: Path | None) -> dict[str, Any]:
    """One run; the page is opened and closed (``about:blank``) every ``block`` frames. Each
    latency belongs to the condition in force when its frame arrived; the first frame after
    each switch is left out of both (the page loading)."""
    cfg = config_from_dict({**cfg_doc, "max_frames": frames, "log": {"fsync": False}})
    source = LiveSource()
    with tempfile.TemporaryDirectory() as tmp:
        agent = await build_agent(cfg, run_dir=Path(tmp) / "run", telemetry=source)
        source.attach(agent)
        async with ViewServer(source, "127.0.0.1", 0) as server:
            marks: list[tuple[int, bool]] = [(0, False)]  # (index into latencies, page open from there)
            page_ms: list[float] = []
            run = asyncio.ensure_future(agent.run())
            open_now, shot_taken = False, False
            while not run.done():
                await asyncio.sleep(0.02)
                n = agent.summary.frames
                if n >= (len(marks)) * block and not run.done():
                    open_now = not open_now
                    if not open_now:  # collect the page's latencies before it closes
                        page_ms += await asyncio.to_thread(browser.execute_script, "return window.stemagentView.latencies_ms;")
                        if screenshot is not None and not shot_taken:
                            await asyncio.to_thread(browser.save_screenshot, str(screenshot))
                            shot_taken = True
                    marks.append((len(agent.summary.latencies_s), open_now))
                    await asyncio.to_thread(browser.get, server.url if open_now else "about:blank")
            summary = await run
            if open_now:
                page_ms += await asyncio.to_thread(browser.execute_script, "return window.stemagentView.latencies_ms;")
                await asyncio.to_thread(browser.get, "about:blank")
            snapshots = server.stats["snapshots"]
    lat = [v * 1e3 for v in summary.latencies_s]
    out: dict[str, list[float]] = {"without": [], "with": []}
    bounds = [m[0] for m in marks] + [len(lat)]
    for (i0, page_open), i1 in zip(marks, bounds[1:]):
        out["with" if page_open else "without"] += lat[i0 + 1:i1]
    return {"frames": summary.frames, "exit": summary.exit_status, "reason": summary.reason, "loop_ms": out, "page_ms": page_ms,
            "snapshots": snapshots, "blocks": len(marks)}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    browser = await asyncio.to_thread(chromium)
    out: dict[str, Any] = {}
    try:
        for name in args.pipelines.split(","):
            cfg = PIPELINES[name]
            shot = Path(args.screenshot) if args.screenshot and name == args.screenshot_pipeline else None
            r = await interleaved_run(cfg, args.frames, args.block, browser, shot)
            res: dict[str, Any] = {"frames": r["frames"], "exit": r["exit"], "blocks": r["blocks"]}
            for cond, loop in r["loop_ms"].items():
                res[cond] = {"n": len(loop), "loop_ms_p50": pct(loop, 50), "loop_ms_p95": pct(loop, 95),
                             "loop_ms_mean": float(np.mean(loop)) if loop else None}
            page = r["page_ms"]
            res["page_update_ms_p50"] = pct(page, 50)
            res["page_update_ms_p95"] = pct(page, 95)
            res["page_updates_drawn"] = len(page)
            res["frames_with_page_open"] = res["with"]["n"] + res["blocks"] // 2
            res["snapshots_built"] = r["snapshots"]
            for k in ("p50", "p95", "mean"):
                a, b = res["with"][f"loop_ms_{k}"], res["without"][f"loop_ms_{k}"]
                res[f"ratio_loop_{k}_with_over_without"] = a / b if a and b else None
            out[name] = res
    finally:
        await asyncio.to_thread(browser.quit)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=200, help="frames per pipeline (one run)")
    ap.add_argument("--block", type=int, default=10, help="frames between opening and closing the page")
    ap.add_argument("--pipelines", default="log,unet+drift")
    ap.add_argument("--screenshot", default=None, help="save the page of the last run with it here (PNG)")
    ap.add_argument("--screenshot-pipeline", default="unet+drift")
    args = ap.parse_args()
    t0 = time.time()
    res = bench(args)
    result = asyncio.run(res)
    print(json.dumps({"bench": "view", "frames_per_run": args.frames, "block_frames": args.block, "cpu_count": os.cpu_count(),
                      "wall_s": round(time.time() - t0, 1), "results": result}, indent=1))


if __name__ == "__main__":
    main()
