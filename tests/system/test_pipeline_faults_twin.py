"""Faults injected into one closed loop on the physical twin (issue 17, item 7): a frame with a NaN
pixel, a driver that stops answering (the watchdog's timeout), a frame with no atoms and a stage
that raises, all in one run of the LoG + encoding + raster pipeline. The run survives each, blanks,
logs it and resumes; with ``on_error: stop`` for the stage the run stops there, blanked, its log
closed."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stemagent.agent.app.factory import build_agent, build_clock, build_driver
from stemagent.config import config_from_dict
from stemagent.pipeline import Pipeline
from stemagent.runlog import RunLog
from stemagent.stages import Observation
from stemagent.types import Frame, ScanGeometry

pytestmark = pytest.mark.system

TWIN: dict[str, Any] = {
    "name": "faults", "seed": 5, "max_frames": 7,
    "driver": {"kind": "twin", "specimen": "graphene", "specimen_size_A": 60.0, "n_si": 4, "pace": "fast"},
    "scan": {"fov_A": 19.2, "shape_px": 96, "dwell_s": 5e-5},
    "pipeline": {"segmenter": {"kind": "log"}, "encoding": {"n_max": 6, "pool_size": 400}},
    "policy": {"kind": "raster", "overlap": 0.3},
    "safety": {"area_half_width_A": 20.0, "max_fov_A": 60.0, "watchdog_s": 0.3},
    "log": {"fsync": False},
}
NAN_AT, HANG_AT, EMPTY_AT, RAISE_AT = 1, 2, 4, 5  # acquire calls (0-based), and the frame the stage fails on


class FaultyTwin:
    """The twin, with faults at given ``acquire`` calls; everything else passes through."""

    def __init__(self, twin: Any) -> None:
        self.twin = twin
        self.acquires = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.twin, name)

    async def acquire(self, geometry: ScanGeometry) -> Frame:
        n = self.acquires
        self.acquires += 1
        if n == HANG_AT:
            await asyncio.sleep(3600)  # the device stops answering: the agent's watchdog ends the wait
        frame = await self.twin.acquire(geometry)
        if n == NAN_AT:
            img = frame.image.astype(np.float32).copy()
            img[7, 9] = np.nan
            return replace(frame, image=img)
        if n == EMPTY_AT:  # a flat field (beam on vacuum, no columns): nothing to find
            return replace(frame, image=np.full(frame.image.shape, 3.0, dtype=np.float32))
        return frame


class RaisesOnce:
    """A real stage that raises on one frame (wraps it: same name, stream and documents)."""

    def __init__(self, stage: Any, at_frame: int) -> None:
        self.stage, self.at_frame = stage, at_frame
        self.name, self.stream = stage.name, stage.stream

    def process(self, obs: Observation) -> Observation:
        if obs.frame_index == self.at_frame:
            raise RuntimeError("injected stage failure")
        return self.stage.process(obs)

    def log_document(self, obs: Observation) -> Any:
        return self.stage.log_document(obs)


async def run_with_faults(tmp_path: Path, on_error: str) -> tuple[Any, FaultyTwin]:
    cfg = config_from_dict({**TWIN, "pipeline": {**TWIN["pipeline"], "stages": {"encoding": {"on_error": on_error}}}})
    clock = build_clock(cfg)
    driver = FaultyTwin(build_driver(cfg, clock))
    agent = await build_agent(cfg, run_dir=tmp_path / on_error, driver=driver, clock=clock)  # type: ignore[arg-type]
    stages = [RaisesOnce(s, RAISE_AT) if s.name == "encoding" else s for s in agent.pipeline.stages]
    agent.pipeline = Pipeline(stages, agent.pipeline.options)
    return await agent.run(), driver


def interruptions(log: RunLog) -> list[tuple[str, str]]:
    return [(e["kind"], e["reason"]) for e in log.event_data("interruptions") if e["kind"] != "state"]


def test_a_run_on_the_twin_survives_every_injected_fault_and_resumes(tmp_path: Path) -> None:
    summary, driver = asyncio.run(run_with_faults(tmp_path, "skip"))
    assert summary.exit_status == "success" and summary.frames == TWIN["max_frames"], summary
    assert summary.faults == 1 and summary.stage_errors == 1 and summary.beam_blanked_at_end and driver.twin.beam_blanked
    log = RunLog.open(summary.log_path)
    kinds = interruptions(log)
    bad = [r for k, r in kinds if k == "bad_input"]
    assert len(bad) == 1 and "frame.image[7,9]" in bad[0]
    faults = [r for k, r in kinds if k == "fault"]
    assert len(faults) == 1 and "watchdog" in faults[0] and any(k == "recovered" for k, _ in kinds)
    errs = [r for k, r in kinds if k == "stage_error"]
    assert len(errs) == 1 and "encoding: RuntimeError: injected stage failure" in errs[0]
    # the frame of vacuum: analysed, no atoms, no motifs, and the policy still decided
    rows = {r["frame_index"]: r for r in log.event_data("pipeline")}
    empty = [fi for fi, r in rows.items() if r["records"]["segment"]["n_atoms"] == 0]
    assert len(empty) == 1 and rows[empty[0]]["records"]["encoding"] == {"skipped": "no atoms"}
    decided = {d["frame_index"] for d in log.event_data("decisions")}
    assert set(rows) <= decided and RAISE_AT in decided
    assert rows[RAISE_AT]["errors"] == {"encoding": "RuntimeError: injected stage failure"}
    assert log.stop is not None and log.stop["exit_status"] == "success"


def test_a_stage_configured_to_stop_ends_the_run_blanked_with_its_log_closed(tmp_path: Path) -> None:
    summary, driver = asyncio.run(run_with_faults(tmp_path, "stop"))
    assert summary.exit_status == "fail" and "encoding" in summary.reason and "injected stage failure" in summary.reason
    assert summary.beam_blanked_at_end and driver.twin.beam_blanked
    log = RunLog.open(summary.log_path)
    assert log.stop is not None and log.stop["exit_status"] == "fail"
    assert max(f["frame_index"] for f in log.event_data("frames")) == RAISE_AT  # the frame it failed on: the last
    assert max(r["frame_index"] for r in log.event_data("pipeline")) == RAISE_AT - 1
    assert max(d["frame_index"] for d in log.event_data("decisions")) == RAISE_AT - 1  # no command after the failure
