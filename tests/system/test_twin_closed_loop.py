"""The agent's closed loop on the physical digital twin, from each twin config, and the simulate CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemagent.agent.app.factory import build_agent, build_clock, build_driver
from stemagent.config import config_from_dict, load_config
from stemagent.runlog import RunLog
from stemagent.simulators.twin import TwinDriver

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("twin-*.yaml"))

pytestmark = pytest.mark.system


def test_every_twin_config_validates_and_builds_a_twin_driver() -> None:
    assert len(CONFIGS) >= 3
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.driver.kind == "twin"
        assert isinstance(build_driver(cfg, build_clock(cfg)), TwinDriver)


async def test_agent_runs_on_the_graphene_twin_and_leaves_the_beam_blanked(tmp_path) -> None:
    base = load_config(ROOT / "configs" / "twin-graphene-si.yaml").model_dump(mode="json")
    base["max_frames"] = 4
    base["scan"]["shape_px"] = 128
    base["scan"]["dwell_s"] = 1e-4  # enough dose for the classical finder on graphene
    cfg = config_from_dict(base)
    clock = build_clock(cfg)
    twin = build_driver(cfg, clock)
    assert isinstance(twin, TwinDriver)
    agent = await build_agent(cfg, run_dir=tmp_path / "run", driver=twin, clock=clock)
    summary = await agent.run()
    assert summary.frames == 4 and summary.beam_blanked_at_end
    assert twin.beam_blanked and twin.ground_truth.beam_log[-1].state == "blanked"
    log = RunLog.open(summary.log_path)
    frames = list(log.frames())
    assert len(frames) == 4
    # the atoms the agent found are where the twin's ground truth says the columns appear in each
    # frame (the agent here does no drift correction, so compare in the scan frame)
    for f, atoms in zip(frames, log.atoms()):
        truth = twin.ground_truth.frame_truth(f.index)
        assert truth is not None
        seen_at = f.geometry.pixel_to_sample(truth.pixels_rc)
        occupied = truth.labels != truth.class_names.index("vacancy")
        inner = f.geometry.contains(seen_at, margin_A=1.5) & occupied
        recall_d, _ = cKDTree(atoms.positions_A).query(seen_at[inner])
        found = f.geometry.contains(atoms.positions_A, margin_A=1.5)
        precision_d, _ = cKDTree(seen_at[occupied]).query(atoms.positions_A[found])
        assert np.mean(precision_d < 0.3) > 0.9  # what the finder reports is where the truth is
        assert np.mean(recall_d < 0.3) > 0.6
        good = precision_d[precision_d < 0.3]
        assert np.sqrt(np.mean(good**2)) < 0.15


def test_simulate_cli_writes_frames_and_ground_truth(tmp_path) -> None:
    out = tmp_path / "mos2.npz"
    cfg = tmp_path / "cfg.yaml"
    text = (ROOT / "configs" / "twin-mos2-survey.yaml").read_text().replace("shape_px: 256", "shape_px: 64")
    cfg.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "stemagent.agent.app.cli", "simulate", "--config", str(cfg), "--out", str(out), "-n", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["frames"] == 2
    z = np.load(out, allow_pickle=False)
    assert z["images"].shape == (2, 64, 64)
    labels = z["frame0/truth_labels"]
    names = list(z["frame0/truth_class_names"])
    assert names == ["metal", "chalcogen", "substituted", "vacancy"]
    assert z["frame0/truth_pixels_rc"].shape == (len(labels), 2)
    assert json.loads(str(z["config_json"]))["driver"]["specimen"] == "mos2"
    bad = tmp_path / "bad.yaml"
    bad.write_text("driver:\n  kind: twin\n  specimen: mos3\n")
    proc = subprocess.run([sys.executable, "-m", "stemagent.agent.app.cli", "simulate", "--config", str(bad), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "specimen" in proc.stderr
