"""A live agent on the minimal twin with the view's LiveSource as its telemetry, and a bounded
wait; shared by the live-view tests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable

from stemagent.agent.app.factory import build_agent, build_clock
from stemagent.agent.view.live import LiveSource
from stemagent.config import config_from_dict
from stemagent.simulators.minimal import MinimalTwinDriver


async def start_live_agent(tmp_path: Path, config: dict[str, Any]):
    """``(agent, source)``: the agent built from ``config`` with a LiveSource attached (not yet running)."""
    cfg = config_from_dict(config)
    clock = build_clock(cfg)
    source = LiveSource()
    agent = await build_agent(cfg, run_dir=tmp_path / "run", driver=MinimalTwinDriver(cfg.driver, clock=clock),
                              clock=clock, telemetry=source)
    source.attach(agent)
    return agent, source


async def until(cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")
