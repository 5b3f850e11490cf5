"""What the pipeline and the loop cost per frame, apart from the stages themselves.

1. ``Pipeline.run`` with four trivial stages (segment, drift, encode, policy that only set a
   field): the composition's own overhead per observation (timing, records, error guard).
2. The whole loop on the ScriptedDriver (virtual clock, 64 x 64 px frames, no scan time) with
   trivial stages, one command at a time: the agent's own cost per frame (gate, log with fsync
   off, executor hop, telemetry).
3. Overlap at the microscope's pace: the ScriptedDriver on the system clock with a 20 ms scan
   and a stage that takes 20 ms (a stand-in for a segmenter): analysed frames per second and
   drops, one command at a time vs streaming in bursts of 4.

Prints one JSON document. Usage: ``python benchmarks/bench_pipeline.py [n_frames]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from stemagent.agent.app.factory import build_agent
from stemagent.clock import Clock, SystemClock, VirtualClock
from stemagent.config import config_from_dict
from stemagent.drivers.scripted import ScriptedDriver
from stemagent.pipeline import Pipeline, PolicyStage
from stemagent.stages import Observation, no_atoms
from stemagent.types import Decision, ScanGeometry, ScanRegion


class Trivial:
    def __init__(self, name: str, sleep_s: float = 0.0) -> None:
        self.name, self.sleep_s = name, sleep_s

    def process(self, obs: Observation) -> Observation:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        obs.records[self.name] = {"ok": True}
        return obs


class Stare:
    name = "stare"

    def decide(self, obs: Observation) -> Decision:
        return Decision(ScanRegion(obs.geometry), self.name)


def pipeline_overhead_us(n: int) -> float:
    p = Pipeline([Trivial("segment"), Trivial("drift"), Trivial("encode"), Trivial("policy")])
    g = ScanGeometry(fov_A=(10.0, 10.0), shape_px=(8, 8))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(n):
            p.run(Observation(i, 0.0, g, no_atoms(i)))
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


async def loop_rate(n_frames: int, overlap: bool, sleep_s: float, scan_s: float = 0.0) -> dict[str, float]:
    cfg = config_from_dict({"max_frames": n_frames, "scan": {"fov_A": 12.8, "shape_px": 64, "dwell_s": 1e-6},
                            "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0, "max_commands_per_s": 1e6},
                            "agent": {"overlap": overlap, "stream_burst_frames": 4}, "log": {"fsync": False}})
    clock: Clock = SystemClock() if scan_s else VirtualClock()
    driver = ScriptedDriver(clock=clock, delay_s={"acquire": scan_s, "frame": scan_s})
    with tempfile.TemporaryDirectory() as tmp:
        agent = await build_agent(cfg, run_dir=Path(tmp) / "run", driver=driver, clock=clock)
        agent.pipeline = Pipeline([Trivial("segment", sleep_s), PolicyStage(Stare())])
        t0 = time.perf_counter()
        summary = await agent.run()
        wall = time.perf_counter() - t0
    return {"frames_per_s": summary.frames / wall, "ms_per_frame": 1e3 * wall / summary.frames,
            "frames_acquired": summary.frames + summary.frames_dropped, "frames_dropped": summary.frames_dropped}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    out = {
        "load_average_1min": os.getloadavg()[0],
        "pipeline_overhead_us_per_observation_4_stages": pipeline_overhead_us(2000),
        "loop_trivial_stages_one_by_one": asyncio.run(loop_rate(n, False, 0.0)),
        "loop_20ms_scan_20ms_stage": {"one_by_one": asyncio.run(loop_rate(n // 4, False, 0.02, 0.02)),
                                      "overlap": asyncio.run(loop_rate(n // 4, True, 0.02, 0.02))},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
