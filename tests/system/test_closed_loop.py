"""The walking closed loop on the minimal twin: run, log, replay, control, faults, CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemagent.agent.control import ControlMessage
from stemagent.agent.app.factory import build_agent, build_clock
from stemagent.agent.state import AgentState
from stemagent.config import config_from_dict, load_config
from stemagent.runlog import RunLog
from stemagent.simulators.minimal import MinimalTwinDriver

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo-minimal-twin.yaml"


def demo_cfg(**over):
    base = load_config(DEMO).model_dump(mode="json")
    base.update(over)
    return config_from_dict(base)


async def run_agent(cfg, tmp_path, driver=None, clock=None, during=None):
    clock = clock or build_clock(cfg)
    driver = driver or MinimalTwinDriver(cfg.driver, seed=cfg.seed, clock=clock)
    agent = await build_agent(cfg, run_dir=tmp_path / "run", driver=driver, clock=clock)
    if during is not None:
        task = asyncio.ensure_future(agent.run())
        await during(agent)
        summary = await task
    else:
        summary = await agent.run()
    return agent, driver, summary


async def test_closed_loop_writes_a_complete_log(tmp_path):
    cfg = demo_cfg(max_frames=6)
    agent, twin, summary = await run_agent(cfg, tmp_path)
    assert summary.state == "stopped" and summary.frames == 6
    assert twin.beam_blanked and summary.beam_blanked_at_end
    log = RunLog.open(summary.log_path)
    assert log.stop["exit_status"] == "success"
    assert log.start["seed"] == cfg.seed and log.start["config"]["name"] == cfg.name
    frames = list(log.frames())
    assert len(frames) == 6 and len(log.atoms()) == 6 and len(log.event_data("decisions")) == 6
    # the raster moved the field each time, and every command that was sent was logged
    centres = {tuple(f.geometry.center_A) for f in frames}
    assert len(centres) == 6
    assert [c["outcome"] for c in log.event_data("commands")] == ["sent"] * 6
    # atoms are where the twin's ground truth says
    for f, atoms in zip(frames, log.atoms()):
        truth = twin.ground_truth_positions(f.geometry, margin_A=1.0)
        d, _ = cKDTree(atoms.positions_A).query(truth)
        assert np.mean(d < 0.5) > 0.97
        assert np.sqrt(np.mean(d[d < 0.5] ** 2)) < 0.15
    states = [e["state"] for e in log.event_data("interruptions") if e["kind"] == "state"]
    assert states == ["running", "stopping", "stopped"]


async def test_replay_reproduces_atoms_exactly(tmp_path):
    from stemagent.agent.app.cli import compare_atoms
    from stemagent.drivers.replay import ReplayDriver

    cfg = demo_cfg(max_frames=4)
    _, _, original = await run_agent(cfg, tmp_path / "a")
    rcfg = config_from_dict({**cfg.model_dump(mode="json"), "driver": {"kind": "replay", "path": original.log_path}})
    clock = build_clock(rcfg)
    replay_driver = ReplayDriver(original.log_path, clock=clock)
    _, _, replayed = await run_agent(rcfg, tmp_path / "b", driver=replay_driver, clock=clock)
    assert replayed.frames == 4
    same, compared = compare_atoms(RunLog.open(original.log_path), RunLog.open(replayed.log_path))
    assert (same, compared) == (4, 4)
    assert replay_driver.mismatched_geometries == 0  # the same decisions asked for the same fields


async def test_pause_resume_stop_are_obeyed_and_logged(tmp_path):
    cfg = demo_cfg(max_frames=1000)

    async def operator(agent):
        while agent.summary.frames < 2:
            await asyncio.sleep(0)
        ack = agent.control(ControlMessage(command="pause", id="p1", reason="look"))
        assert ack.accepted
        while agent.sm.state != AgentState.PAUSED:
            await asyncio.sleep(0)
        frames_when_paused = agent.summary.frames
        assert agent.driver.beam_blanked
        for _ in range(50):  # nothing is acquired while paused
            await asyncio.sleep(0)
        assert agent.summary.frames == frames_when_paused
        agent.control(ControlMessage(command="resume", id="r1"))
        while agent.summary.frames < frames_when_paused + 2:
            await asyncio.sleep(0)
        agent.control(ControlMessage(command="stop", id="s1"))

    agent, twin, summary = await run_agent(cfg, tmp_path, during=operator)
    assert summary.state == "stopped" and summary.reason == "operator stop"
    assert summary.pauses == 1 and twin.beam_blanked
    kinds = [e["kind"] for e in RunLog.open(summary.log_path).event_data("interruptions")]
    assert "control:pause" in kinds and "control:resume" in kinds and "control:stop" in kinds
    assert agent.control(ControlMessage(command="resume")).accepted is False  # the run is over


async def test_abort_cancels_at_once_and_blanks(tmp_path):
    cfg = demo_cfg(max_frames=1000)

    async def operator(agent):
        while agent.summary.frames < 1:
            await asyncio.sleep(0)
        agent.control(ControlMessage(command="abort"))

    _, twin, summary = await run_agent(cfg, tmp_path, during=operator)
    assert summary.state == "aborted" and twin.beam_blanked
    assert RunLog.open(summary.log_path).stop["exit_status"] == "abort"


async def test_safety_refusals_are_logged_and_end_the_run(tmp_path):
    # a dose budget below one frame's dose: the first scan is refused and the run stops cleanly
    cfg = demo_cfg(max_frames=3, safety={"area_half_width_A": 60.0, "max_fov_A": 100.0, "dose_budget_e_per_A2": 10.0})
    _, twin, summary = await run_agent(cfg, tmp_path)
    assert summary.frames == 0 and summary.commands_refused == 1 and twin.frames_acquired == 0
    log = RunLog.open(summary.log_path)
    assert [e["rule"] for e in log.event_data("safety")] == ["dose"]
    assert summary.reason == "the initial scan was refused by the safety gate"


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stemagent.agent.app.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_run_replay_and_bad_config(tmp_path):
    r = _cli("run", "--config", str(DEMO), "--max-frames", "3", "--log-dir", str(tmp_path), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 3 and summary["state"] == "stopped"
    r = _cli("replay", summary["log_path"], "--log-dir", str(tmp_path), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["atoms_identical_frames"] == rep["frames_compared"] == 3

    bad = tmp_path / "bad.yaml"
    bad.write_text("max_frames: 5\nscan:\n  dwell_s: -1\n")
    r = _cli("run", "--config", str(bad), cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "scan.dwell_s" in lines[0] and "-1" in lines[0] and "bad.yaml" in lines[0]
    assert "Traceback" not in r.stderr + r.stdout


async def test_log_failure_mid_run_still_blanks_and_closes(tmp_path):
    cfg = demo_cfg(max_frames=10)
    clock = build_clock(cfg)
    twin = MinimalTwinDriver(cfg.driver, seed=cfg.seed, clock=clock)
    agent = await build_agent(cfg, run_dir=tmp_path / "run", driver=twin, clock=clock)
    real = agent.writer.write_atoms
    calls = {"n": 0}

    def failing(atoms):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(atoms)

    agent.writer.write_atoms = failing
    summary = await agent.run()
    assert twin.beam_blanked and not twin.connected
    # a log that cannot be written ends the run: nothing is acquired that could not be recorded
    assert summary.state == "aborted" and "No space left" in summary.reason
    assert twin.frames_acquired == 3
    log = RunLog.open(summary.log_path)
    assert len(log.atoms()) == 2  # what was logged before the failure is intact
    assert log.stop["exit_status"] == "fail"


def test_cli_run_on_the_physical_twin_scores_against_ground_truth(tmp_path):
    cfg = ROOT / "configs" / "twin-graphene-si.yaml"
    r = _cli("run", "--config", str(cfg), "--max-frames", "12", "--log-dir", str(tmp_path), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    score = out["vs_ground_truth"]
    assert score["frames_scored"] >= 10  # drift reaches ~0.6 Å by frame 12: sample-frame atoms vs sample-frame truth
    assert score["f1"] > 0.98 and score["rmse_A"] < 0.15
    # the raster plans inside the allowed area less the drift margin: drift-converted fields stay inside it
    assert out["commands_refused"] == 0


@pytest.mark.parametrize("name", ["twin-graphene-si", "twin-mos2-survey"])
async def test_unet_closed_loop_on_the_twin_matches_ground_truth(tmp_path, name):
    from stemagent.simulators.scoring import score_run

    cfg = config_from_dict({**load_config(ROOT / "configs" / f"{name}.yaml").model_dump(mode="json"), "max_frames": 3})
    assert cfg.pipeline.segmenter.kind == "unet"
    agent = await build_agent(cfg, run_dir=tmp_path / "run")
    summary = await agent.run()
    log = RunLog.open(summary.log_path)
    score = score_run(log, agent.driver.ground_truth)
    assert score["frames_scored"] == 3
    assert score["f1"] > 0.99 and score["rmse_A"] < 0.1
    names = log.atoms()[0].class_names
    assert "vacancy" in names or "column-vacancy" in names  # the U-Net's classes are logged
