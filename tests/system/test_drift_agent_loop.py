"""The drift stage in the ordinary agent run, on the drifting twin (ground truth from the twin).

A policy that thinks only in the sample frame stares at one field, then parks on the tracked
atom nearest its centre. The agent converts the park to beam coordinates with the forecast at
the park's start, before the safety gate; the twin says which specimen point the beam sat on.
With the drift stage it is the intended column within 0.2 Å; with the stage switched off by
config (``pipeline.stages.drift.enabled: false``), the same policy misses by the drift.

Then ``stemagent replay`` of the run log reproduces every per-frame drift estimate.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.spatial import cKDTree
from typer.testing import CliRunner

from stemagent.agent.app.cli import app
from stemagent.agent.app.factory import build_agent, build_driver
from stemagent.clock import VirtualClock
from stemagent.config import config_from_dict
from stemagent.runlog import RunLog
from stemagent.segmentation.classical import LoGFinder
from stemagent.stages import Observation
from stemagent.types import Decision, Park, ScanRegion

pytestmark = pytest.mark.system

CFG: dict[str, Any] = {
    "name": "drift-loop",
    "seed": 4,
    "max_frames": 14,
    "driver": {"kind": "twin", "specimen": "mos2", "specimen_size_A": 70.0, "beam_current_pA": 5.0, "dynamics": False,
               "drift_velocity_A_per_s": [0.42, -0.56], "drift_wobble_A": 0.3, "drift_wobble_period_s": 20.0,
               "drift_random_walk_A_per_sqrt_s": 0.02, "jitter_A": 0.02, "pace": "fast"},
    # 1 s frames: the atom at the field's centre is seen half a frame (0.35 Å of drift) before the park
    "scan": {"fov_A": 25.6, "shape_px": 256, "dwell_s": 1.6e-5},
    "pipeline": {"segmenter": {"kind": "log", "sigma_A": 0.45, "threshold": 0.1}, "drift": {"window_frames": 12}},
    "policy": {"kind": "raster"},
    "safety": {"area_half_width_A": 30.0, "max_fov_A": 100.0},
    "log": {"fsync": False},
}


class StareThenPark:
    """Scans the same sample-frame field ``stare`` times, then parks on the atom nearest its centre
    (positions as the pipeline gives them: the sample frame when the drift stage runs)."""

    name = "stare-then-park"

    def __init__(self, stare: int = 5) -> None:
        self.stare = stare
        self.frames = 0
        self.field: ScanRegion | None = None
        self.target_A: tuple[float, float] | None = None
        self.seen: tuple[Any, int] | None = None  # (the frame, the target's index among its atoms), for the test
        self.stop_reason = ""

    def decide(self, obs: Observation) -> Decision:
        self.frames += 1
        if self.field is None:
            self.field = ScanRegion(obs.geometry)
        if self.frames < self.stare:
            return Decision(self.field, self.name, "stare")
        p = obs.atoms.positions_A
        k = int(np.argmin(np.linalg.norm(p - np.asarray(self.field.geometry.center_A), axis=1)))
        self.target_A = (float(p[k, 0]), float(p[k, 1]))
        self.seen = (obs.frame, k)
        return Decision(Park(self.target_A, 0.01), self.name, "park on the centre atom")

    def observe_park(self, obs: Observation) -> Decision | None:
        self.stop_reason = "parked"
        return None


def _config(drift_on: bool, **over: Any) -> Any:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in CFG.items()}
    if not drift_on:
        data["pipeline"] = {**data["pipeline"], "stages": {"drift": {"enabled": False}}}
    data.update(over)
    return config_from_dict(data)


async def _run(tmp_path: Path, drift_on: bool) -> tuple[Any, Any, StareThenPark]:
    cfg = _config(drift_on)
    clock = VirtualClock()
    twin = build_driver(cfg, clock)
    policy = StareThenPark()
    agent = await build_agent(cfg, run_dir=tmp_path / ("on" if drift_on else "off"), driver=twin, clock=clock)
    agent.policy = policy
    summary = await agent.run()
    assert summary.exit_status == "success" and summary.beam_blanked_at_end, summary.reason
    return summary, twin, policy


def _park_error_A(twin: Any, policy: StareThenPark, log: RunLog) -> float:
    """Distance from where the park's beam sat on the specimen to the column the policy meant:
    the column the twin showed where the finder saw the target atom (atoms keep their order
    through the drift stage, and the finder is deterministic)."""
    assert policy.target_A is not None and policy.seen is not None
    frame, k = policy.seen
    detected = LoGFinder(sigma_A=0.45, threshold=0.1).find(frame).positions_A[k]  # beam frame, as the segmenter saw it
    truth = twin.ground_truth.frame_truth(frame.meta["device_index"])
    dist, j = cKDTree(frame.geometry.pixel_to_sample(truth.pixels_rc)).query(detected)
    assert dist < 0.3
    (park,) = log.park_results()
    landed = np.asarray(park.position_A) - twin.ground_truth.drift_at(park.start_time_s)
    return float(np.linalg.norm(landed - truth.positions_A[j]))


async def test_drift_stage_lands_the_agents_park_on_the_intended_column(tmp_path: Path) -> None:
    summary, twin, policy = await _run(tmp_path, drift_on=True)
    log = RunLog.open(summary.log_path)
    error = _park_error_A(twin, policy, log)
    assert error < 0.2, f"the converted park missed the intended column by {error:.3f} Å"
    # the park went out converted (the gate saw the beam position), and every frame has its estimate
    parks = [c for c in log.event_data("commands") if c["command"]["kind"] == "park" and c["outcome"] == "sent"]
    assert len(parks) == 1 and parks[0]["converted"]["drift"]["reliable"]
    assert parks[0]["command"]["position_A"] != list(policy.target_A)
    drift = log.event_data("drift")
    assert len(drift) == summary.frames and [d["frame_index"] for d in drift] == list(range(summary.frames))
    assert drift[0]["status"] == "reference" and all(d["status"] == "tracking" for d in drift[1:])
    assert all(d["band95_A"] is not None and d["band95_A"] < 0.2 for d in drift[2:])
    assert log.start["pipeline"]["stages"] == ["segment", "drift", "policy"]

    # drift off by config: the same policy, the same twin, misses by the drift since the atom was seen
    summary_off, twin_off, policy_off = await _run(tmp_path, drift_on=False)
    log_off = RunLog.open(summary_off.log_path)
    miss = _park_error_A(twin_off, policy_off, log_off)
    assert miss > 0.2 and miss > 3 * error, f"without drift correction the park missed by only {miss:.3f} Å"
    assert log_off.event_data("drift") == [] and log_off.start["pipeline"]["disabled"] == ["drift"]



def test_replay_of_the_run_log_reproduces_every_drift_estimate(tmp_path: Path) -> None:
    summary, _, _ = asyncio.run(_run(tmp_path, drift_on=True))
    drift = RunLog.open(summary.log_path).event_data("drift")
    result = CliRunner().invoke(app, ["replay", str(summary.log_path), "--log-dir", str(tmp_path / "replays")])
    assert result.exit_code == 0, result.output
    assert f"drift estimates: {len(drift)} of {len(drift)} frames reproduced" in result.output
    (replay_dir,) = (tmp_path / "replays").iterdir()
    replayed = RunLog.open(replay_dir)
    again_all = replayed.event_data("drift")
    assert len(again_all) == len(drift) == summary.frames
    for live, again in zip(drift, again_all):
        assert again["status"] == live["status"] and again["n_matched"] == live["n_matched"]
        np.testing.assert_allclose(again["displacement_A"], live["displacement_A"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(again["std_A"], live["std_A"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(again["times_s"], live["times_s"], rtol=0, atol=1e-12)


def test_a_raster_run_with_the_drift_stage_passes_replay_verify(tmp_path: Path) -> None:
    # a raster moves to new fields: each frame comes from a converted scan, which the stage maps
    # back to the sample-frame field it asked for; the verifying replay must hand the logged
    # conversions back to the stage, or it places the field by the forecast instead (0.0008 Å off)
    cfg = config_from_dict({**CFG, "max_frames": 4, "scan": {**CFG["scan"], "shape_px": 128, "dwell_s": 2e-5}})

    async def go() -> Any:
        agent = await build_agent(cfg, run_dir=tmp_path / "run", clock=VirtualClock())
        return await agent.run()

    summary = asyncio.run(go())
    log = RunLog.open(summary.log_path)
    moved = {tuple(c["command"]["geometry"]["center_A"]) for c in log.event_data("commands") if c["command"]["kind"] == "scan"}
    assert summary.frames == 4 and len(moved) >= 3  # the raster went to other fields
    result = CliRunner().invoke(app, ["replay", str(summary.log_path), "--verify"])
    assert result.exit_code == 0, result.output
