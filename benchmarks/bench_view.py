"""The live page's cost and speed (issue 22 targets), both measured in one run.

For each pipeline, ONE run of the agent on the twin at the twin's real pace (the microscope sets
the frame rate) with ``--view`` on, in ``--rounds`` rounds; each round is a block of frames with
the page closed (the browser on ``about:blank``: no request reaches the server) and a block with
the page open (Debian's headless chromium showing it, driven by Selenium), in alternating order
(closed-open, open-closed, ...) so a drift of the machine's load falls on both. The first
``--settle`` frames after each switch are left out (the page loading). Per block:

- **loop frame→decision latency**: wall time from a frame's arrival at the agent to the next
  command's issue (the run summary's latencies), its median;
- **agent CPU per frame**: the agent process's CPU time (every thread: loop, executors, the
  view's snapshot thread and its server) over the block, per frame; and chromium's own CPU per
  frame (all its processes; on a 2-core machine it competes with the agent);
- with the page open, **frame→screen**: from the frame's arrival at the agent to the browser
  having painted it (the page takes ``Date.now()`` in a task queued from the
  ``requestAnimationFrame`` after drawing, i.e. after the paint; the agent's arrival time is on
  the same wall clock), and from the end of the frame's analysis to the paint.

Per round: ratios open/closed of the median latency and of the CPU per frame; the result is the
median of the per-round ratios (target: latency ratio within 1.05), and frame→screen p50/p95/max
over all open blocks (target ≤ 200 ms). The machine's load average is printed with the result.

Pipelines: ``log`` (minimal twin, 256 x 256 px, LoG finder + raster: the lightest loop, where
the page's share is largest) and ``unet+drift`` (the physical twin, graphene with Si,
256 x 256 px, the shipped U-Net + the drift stage + raster: ``configs/twin-graphene-si.yaml``
at 4 µs dwell, the U-Net on one torch thread).

Prints one JSON document. Usage:
``python benchmarks/bench_view.py [--rounds 6] [--block 10] [--settle 2] [--pipelines log,unet+drift]
[--screenshot docs/live_view.png]``.
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
import psutil

from stemagent.agent.app.factory import build_agent
from stemagent.agent.control import read_control
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
# one torch thread: on a shared 2-core machine torch's spinning threads make CPU time track the
# neighbours' load instead of the work (the loop benchmark does the same)
PIPELINES["unet+drift"]["pipeline"]["segmenter"]["num_threads"] = 1


def chromium() -> Any:
    from selenium import webdriver  # selenium only when a browser is started
    from selenium.webdriver.chrome.service import Service  # selenium only when a browser is started

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


TAKE = """const v = window.stemagentView; if (!v) return null;
return {arrived: v.latencies_ms.splice(0), ready: v.ready_latencies_ms.splice(0), painted: v.painted.splice(0)};"""


def chromium_cpu_s(browser: Any) -> float:
    """CPU seconds of chromedriver and every chromium process under it."""
    try:
        root = psutil.Process(browser.service.process.pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total
    except (psutil.Error, AttributeError):
        return float("nan")


async def wait_frames(agent: Any, run: asyncio.Future[Any], n: int) -> None:
    target = agent.summary.frames + n
    while agent.summary.frames < target and not run.done():
        await asyncio.sleep(0.01)


async def rounds_run(cfg_doc: dict[str, Any], rounds: int, block: int, settle: int, browser: Any,
                     screenshot: Path | None) -> dict[str, Any]:
    """One run in ``rounds`` rounds of a closed and an open block (order alternating)."""
    needed = rounds * 2 * (settle + block)
    cfg = config_from_dict({**cfg_doc, "max_frames": needed + 50, "log": {"fsync": False}})
    source = LiveSource()
    blocks: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        agent = await build_agent(cfg, run_dir=Path(tmp) / "run", telemetry=source)
        source.attach(agent)
        async with ViewServer(source, "127.0.0.1", 0) as server:
            run = asyncio.ensure_future(agent.run())
            page_open = False
            for r in range(rounds):
                for want_open in ((False, True) if r % 2 == 0 else (True, False)):
                    if want_open != page_open:
                        await asyncio.to_thread(browser.get, server.url if want_open else "about:blank")
                        page_open = want_open
                    await wait_frames(agent, run, settle)
                    if page_open:
                        await asyncio.to_thread(browser.execute_script, TAKE)  # what the settle frames drew: dropped
                    b = {"round": r, "open": page_open, "lat0": len(agent.summary.latencies_s), "f0": agent.summary.frames,
                         "cpu0": time.process_time(), "ccpu0": chromium_cpu_s(browser), "snap0": server.stats["snapshots"]}
                    await wait_frames(agent, run, block)
                    b.update(lat1=len(agent.summary.latencies_s), f1=agent.summary.frames, cpu1=time.process_time(),
                             ccpu1=chromium_cpu_s(browser), snap1=server.stats["snapshots"])
                    if page_open:
                        await asyncio.sleep(0.3)  # the block's last frame reaching the screen
                        b["page"] = await asyncio.to_thread(browser.execute_script, TAKE)
                        if screenshot is not None and r >= rounds - 2:
                            await asyncio.to_thread(browser.save_screenshot, str(screenshot))
                    blocks.append(b)
            await asyncio.to_thread(browser.get, "about:blank")
            agent.control(read_control(b'{"command": "stop", "id": "bench", "reason": "benchmark done"}'))
            summary = await run
    lat_ms = [v * 1e3 for v in summary.latencies_s]
    for b in blocks:
        b["lat_ms"] = lat_ms[b["lat0"]:b["lat1"]]
        n = max(1, b["f1"] - b["f0"])
        b["frames"] = b["f1"] - b["f0"]
        b["cpu_ms_per_frame"] = (b["cpu1"] - b["cpu0"]) * 1e3 / n
        b["chromium_cpu_ms_per_frame"] = (b["ccpu1"] - b["ccpu0"]) * 1e3 / n
        b["snapshots"] = b["snap1"] - b["snap0"]
    return {"frames": summary.frames, "exit": summary.exit_status, "reason": summary.reason, "blocks": blocks}


def med(xs: list[float]) -> float | None:
    return float(np.median(xs)) if xs else None


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    blocks = r["blocks"]
    rounds = sorted({b["round"] for b in blocks})
    per_round = []
    for k in rounds:
        c = next(b for b in blocks if b["round"] == k and not b["open"])
        o = next(b for b in blocks if b["round"] == k and b["open"])
        per_round.append({
            "round": k, "order": "closed-open" if k % 2 == 0 else "open-closed",
            "loop_ms_p50_closed": med(c["lat_ms"]), "loop_ms_p50_open": med(o["lat_ms"]),
            "latency_ratio": (med(o["lat_ms"]) or 0) / (med(c["lat_ms"]) or 1),
            "cpu_ms_per_frame_closed": c["cpu_ms_per_frame"], "cpu_ms_per_frame_open": o["cpu_ms_per_frame"],
            "cpu_ratio": o["cpu_ms_per_frame"] / c["cpu_ms_per_frame"] if c["cpu_ms_per_frame"] > 0 else None,
            "chromium_cpu_ms_per_frame_open": o["chromium_cpu_ms_per_frame"],
        })
    out: dict[str, Any] = {"frames": r["frames"], "exit": r["exit"], "rounds": len(rounds)}
    lat_ratios = [x["latency_ratio"] for x in per_round]
    cpu_ratios = [x["cpu_ratio"] for x in per_round if x["cpu_ratio"] is not None]
    out["latency_ratio_open_over_closed_median_of_rounds"] = med(lat_ratios)
    out["latency_ratio_range"] = [min(lat_ratios), max(lat_ratios)] if lat_ratios else None
    out["cpu_per_frame_ratio_open_over_closed_median_of_rounds"] = med(cpu_ratios)
    out["cpu_per_frame_ratio_range"] = [min(cpu_ratios), max(cpu_ratios)] if cpu_ratios else None
    for cond, is_open in (("closed", False), ("open", True)):
        lat = [v for b in blocks if b["open"] == is_open for v in b["lat_ms"]]
        out[cond] = {"n": len(lat), "loop_ms_p50": med(lat), "loop_ms_p95": pct(lat, 95),
                     "loop_ms_mean": float(np.mean(lat)) if lat else None,
                     "agent_cpu_ms_per_frame_median": med([b["cpu_ms_per_frame"] for b in blocks if b["open"] == is_open]),
                     "chromium_cpu_ms_per_frame_median": med([b["chromium_cpu_ms_per_frame"] for b in blocks if b["open"] == is_open])}
    opened = [b for b in blocks if b["open"]]
    arrived = [v for b in opened for v in (b.get("page") or {}).get("arrived", [])]
    ready = [v for b in opened for v in (b.get("page") or {}).get("ready", [])]
    out["frame_to_screen_ms"] = {"p50": pct(arrived, 50), "p95": pct(arrived, 95), "max": max(arrived) if arrived else None,
                                 "n": len(arrived)}
    out["analysed_to_screen_ms"] = {"p50": pct(ready, 50), "p95": pct(ready, 95), "max": max(ready) if ready else None}
    out["frames_in_open_blocks"] = sum(b["frames"] for b in opened)
    out["snapshots_built_in_open_blocks"] = sum(b["snapshots"] for b in opened)
    out["snapshots_built_in_closed_blocks"] = sum(b["snapshots"] for b in blocks if not b["open"])
    out["per_round"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in x.items()} for x in per_round]
    return out


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    browser = await asyncio.to_thread(chromium)
    out: dict[str, Any] = {}
    try:
        for name in args.pipelines.split(","):
            shot = Path(args.screenshot) if args.screenshot and name == args.screenshot_pipeline else None
            r = await rounds_run(PIPELINES[name], args.rounds, args.block, args.settle, browser, shot)
            out[name] = summarise(r)
    finally:
        await asyncio.to_thread(browser.quit)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds of a closed and an open block, per pipeline (one run)")
    ap.add_argument("--block", type=int, default=10, help="frames measured per block")
    ap.add_argument("--settle", type=int, default=2, help="frames left out after each opening or closing of the page")
    ap.add_argument("--pipelines", default="log,unet+drift")
    ap.add_argument("--screenshot", default=None, help="save the page (last open block) here (PNG)")
    ap.add_argument("--screenshot-pipeline", default="unet+drift")
    args = ap.parse_args()
    t0 = time.time()
    load_before = os.getloadavg()
    result = asyncio.run(bench(args))
    print(json.dumps({"bench": "view", "rounds": args.rounds, "block_frames": args.block, "settle_frames": args.settle,
                      "cpu_count": os.cpu_count(), "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
                      "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
                      "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t0)),
                      "wall_s": round(time.time() - t0, 1), "results": result}, indent=1))


if __name__ == "__main__":
    main()
