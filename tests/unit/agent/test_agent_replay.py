"""Replays of long runs, of runs whose device restarted, and of logs with a rotten chunk (issue 10, defects 5, 6, 9)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from typer.testing import CliRunner

from stemagent.agent.app.cli import app, compare_atoms
from stemagent.agent.control import ControlMessage
from stemagent.agent.app.factory import build_agent, build_clock
from stemagent.config import config_from_dict
from stemagent.driver import DriverFault
from stemagent.runlog import RunLog
from stemagent.simulators.minimal import MinimalTwinDriver

BASE = {
    "name": "long", "seed": 2,
    # 64 x 64 px at 10 µs: 41 ms a frame, 24 frames a second, under the 50 commands/s rate limit
    "scan": {"fov_A": 12.8, "shape_px": 64, "dwell_s": 1e-5},
    "pipeline": {"segmenter": {"kind": "log"}},
    "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0, "dose_budget_e_per_A2": 1e9},
    "agent": {"retry_s": 0.01},
    "log": {"fsync": False},
}


async def record(tmp_path: Path, driver_cls=MinimalTwinDriver, schedule=None, **over) -> str:
    cfg = config_from_dict({**BASE, **over})
    clock = build_clock(cfg)
    agent = await build_agent(cfg, run_dir=tmp_path / "original", driver=driver_cls(cfg.driver, seed=2, clock=clock),
                              clock=clock, schedule=schedule)
    summary = await agent.run()
    assert summary.exit_status == "success", summary.reason
    return summary.log_path


def replay(log: str, tmp_path: Path, *extra: str):
    return CliRunner().invoke(app, ["replay", log, "--log-dir", str(tmp_path / "replays"), *extra])


def test_a_60_frame_log_replays_every_frame_at_fast_pace(tmp_path):
    """Issue 10 defect 5: at --pace fast the virtual clock stood still, and after 50 frames the
    rate rule refused every command (50 of 60 replayed, exit 1)."""
    log = asyncio.run(record(tmp_path, max_frames=60))
    result = replay(log, tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert '"frames": 60' in result.output and '"atoms_identical_frames": 60, "frames_compared": 60' in result.output


class RestartingDevice(MinimalTwinDriver):
    """Loses its link after 4 frames and comes back with its frame counter at 0 (a restarted bridge)."""

    async def acquire(self, g):
        if self.frames_acquired == 4 and not getattr(self, "restarted", False):
            self.restarted = True
            self.frames_acquired = 0
            raise DriverFault("bridge restarted")
        return await super().acquire(g)


def test_frames_keep_their_identity_when_the_device_counter_restarts(tmp_path):
    """Issue 10 defect 6: the log held frames 0-3 twice and replay compared the wrong ones."""
    log = asyncio.run(record(tmp_path, driver_cls=RestartingDevice, max_frames=9))
    frames = RunLog.open(log).event_data("frames")
    assert [f["frame_index"] for f in frames] == list(range(9))
    assert [f["meta"]["device_index"] for f in frames] == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    result = replay(log, tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert '"atoms_identical_frames": 9, "frames_compared": 9' in result.output


def test_replay_applies_the_logged_dose_budget(tmp_path):
    # one frame gives 3.1e4 e/Å²; neighbouring raster fields overlap, so after the first frame the
    # 4e4 budget would refuse them: the operator raised it to 1e9, and the replay must too
    log = asyncio.run(record(tmp_path, max_frames=6, safety={**BASE["safety"], "dose_budget_e_per_A2": 4e4},
                             schedule=[(1, ControlMessage(command="set_dose_budget", value=1e9, id="up"))]))
    assert not RunLog.open(log).event_data("safety")
    result = replay(log, tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert '"atoms_identical_frames": 6, "frames_compared": 6' in result.output
    replayed = RunLog.open(next((tmp_path / "replays").iterdir()))
    assert not replayed.event_data("safety")  # nothing refused: the budget was raised at the same point
    assert [(c["command"], c["arguments"]) for c in replayed.event_data("controls")] == [("set_dose_budget", {"value": 1e9})]


def test_a_corrupt_chunk_is_skipped_and_reported_in_one_line(tmp_path):
    """Issue 10 defect 9: a corrupt chunk aborted the replay with a traceback."""
    log = asyncio.run(record(tmp_path, max_frames=5))
    chunk = next(Path(log, "frames.zarr", "Experiments").glob("*/data/c/2/0/0"))
    chunk.write_bytes(b"rotten" * 50)
    result = replay(log, tmp_path, "--json")
    assert result.exit_code == 1
    err = [ln for ln in result.output.splitlines() if ln.startswith("error")]
    assert len(err) == 1 and "1 of 5 frames could not be read" in err[0] and "[2]" in err[0]
    assert "Traceback" not in result.output
    summary_line = next(ln for ln in result.output.splitlines() if ln.startswith("{"))
    assert '"frames": 4' in summary_line and '"atoms_identical_frames": 4' in summary_line
    replay_log = RunLog.open(next((tmp_path / "replays").iterdir()))
    assert replay_log.stop["exit_status"] == "success" and len(replay_log.event_data("frames")) == 4
    same, compared = compare_atoms(RunLog.open(log), replay_log)
    assert (same, compared) == (4, 5)
