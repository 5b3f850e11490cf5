"""The README's screenshot of the live page (issue 22): a real twin run, a real browser.

``configs/twin-graphene-si-live.yaml`` (graphene with Si on the physical twin at its real pace,
the shipped U-Net, the drift stage, raster), served by the same view server as
``stemagent run --config configs/twin-graphene-si-live.yaml --view``; Debian's headless chromium opens
the page, clicks the frame once (a set-target request, acknowledged and listed in the events),
and saves the page after ``--frames`` frames.

Prints one JSON line (where the PNG went, what the page showed). Usage:
``python benchmarks/fig_live_view.py [--out docs/live_view.png] [--frames 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from bench_view import chromium

from stemagent.agent.app.factory import build_agent
from stemagent.agent.control import read_control
from stemagent.agent.view.live import LiveSource
from stemagent.agent.view.server import ViewServer
from stemagent.config import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]

SHOWN = """const v = window.stemagentView, d = v.doc || {};
return {frame: d.frame && d.frame.index, atoms: d.atoms && d.atoms.col_row.length, command: d.decision && d.decision.command.kind,
        dose_map: !!(d.dose && d.dose.map), drift_points: d.drift ? d.drift.trace.length : 0, state: d.state,
        events: (d.events || []).length, acks: document.getElementById('acks').textContent};"""


async def shoot(out: Path, frames: int) -> dict[str, Any]:
    doc = load_config(ROOT / "configs" / "twin-graphene-si-live.yaml").model_dump(mode="json")
    cfg = config_from_dict({**doc, "max_frames": frames + 20, "log": {"fsync": False}})
    source = LiveSource()
    browser = await asyncio.to_thread(chromium)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            agent = await build_agent(cfg, run_dir=Path(tmp) / "run", telemetry=source)
            source.attach(agent)
            async with ViewServer(source, "127.0.0.1", 0) as server:
                run = asyncio.ensure_future(agent.run())
                await asyncio.to_thread(browser.get, server.url)
                clicked = False
                while agent.summary.frames < frames and not run.done():
                    await asyncio.sleep(0.1)
                    if not clicked and agent.summary.frames >= frames // 2:
                        # a click a little off the frame's centre: set-target, acknowledged on the page
                        await asyncio.to_thread(browser.execute_script, """const c = document.getElementById('frame');
const r = c.getBoundingClientRect();
c.dispatchEvent(new MouseEvent('click', {clientX: r.left + 0.6 * r.width, clientY: r.top + 0.4 * r.height}));""")
                        clicked = True
                await asyncio.sleep(1.5)  # the newest frame on the screen
                shown = await asyncio.to_thread(browser.execute_script, SHOWN)
                out.parent.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(browser.save_screenshot, str(out))
                agent.control(read_control(b'{"command": "stop", "id": "figure", "reason": "screenshot taken"}'))
                await run
    finally:
        await asyncio.to_thread(browser.quit)
    return {"png": str(out), "shown": shown}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "live_view.png"))
    ap.add_argument("--frames", type=int, default=10)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(shoot(Path(args.out), args.frames))))


if __name__ == "__main__":
    main()
