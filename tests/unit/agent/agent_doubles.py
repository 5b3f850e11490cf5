"""Shared set-up of the loop's unit tests: an agent on the package's ScriptedDriver, and small policies."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from stemagent.agent.app.factory import build_agent
from stemagent.agent.loop import Agent
from stemagent.clock import VirtualClock
from stemagent.config import config_from_dict
from stemagent.drivers.scripted import ScriptedDriver
from stemagent.stages import Observation
from stemagent.types import Decision, Park, ScanGeometry, ScanRegion

CFG: dict[str, Any] = {
    "name": "loop",
    "seed": 3,
    "max_frames": 4,
    "driver": {"kind": "minimal-twin"},
    "scan": {"fov_A": 12.8, "shape_px": 32, "dwell_s": 1e-5},
    "pipeline": {"segmenter": {"kind": "log", "sigma_A": 0.45, "threshold": 0.3}},
    "policy": {"kind": "raster"},
    "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0},
    "agent": {"retry_s": 0.01},
    "log": {"fsync": False},
}


def merged(**over: Any) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in CFG.items()}
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


async def scripted_agent(tmp_path: Path, driver: ScriptedDriver | None = None, **over: Any) -> tuple[Agent, ScriptedDriver]:
    cfg = config_from_dict(merged(**over))
    clock = driver.clock if driver is not None else VirtualClock()
    driver = driver or ScriptedDriver(clock=clock)
    agent = await build_agent(cfg, run_dir=tmp_path / "run", driver=driver, clock=clock)
    return agent, driver


async def until(predicate: Any, what: str, steps: int = 100_000) -> None:
    """Yield to the loop until ``predicate()``; fails after ``steps`` turns (never waits on wall time)."""
    for _ in range(steps):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


class Stare:
    """Asks for the field it just saw, again and again."""

    name = "stare"

    def decide(self, obs: Observation) -> Decision:
        return Decision(ScanRegion(obs.geometry), self.name, "the same field again")


class Outside:
    """Asks for a field outside the allowed area (the gate refuses it); every ``good``-th time a good one."""

    name = "outside"

    def __init__(self, good_every: int = 0) -> None:
        self.good_every = good_every
        self.calls = 0

    def decide(self, obs: Observation) -> Decision:
        self.calls += 1
        if self.good_every and self.calls % self.good_every == 0:
            return Decision(ScanRegion(obs.geometry), self.name, "a good one")
        g = ScanGeometry(center_A=(1000.0, 0.0), fov_A=obs.geometry.fov_A, shape_px=obs.geometry.shape_px,
                         dwell_s=obs.geometry.dwell_s)
        return Decision(ScanRegion(g), self.name, "outside the area")


class Parker:
    """Parks beside the field's centre after every frame."""

    name = "parker"

    def decide(self, obs: Observation) -> Decision:
        return Decision(Park(obs.geometry.center_A, 0.01), self.name, "park")
