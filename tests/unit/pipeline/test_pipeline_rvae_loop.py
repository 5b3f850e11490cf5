"""The rVAE stage in the loop (``pipeline.rvae``): per-atom latents (angle, shift, content z) in
the policy's observation and the run log's ``latents`` stream; replay and ``replay --verify``
reproduce them. A few frames of the twin with the shipped weights."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from policy_inputs import run_recording_policy_inputs
from typer.testing import CliRunner

from stemagent.agent.app.cli import app
from stemagent.agent.app.factory import stage_names
from stemagent.config import config_from_dict
from stemagent.encoding.config import PipelineRVAEConfig
from stemagent.encoding.rvae import default_rvae_weights
from stemagent.encoding.rvae_stage import RVAEStage
from stemagent.errors import ConfigError, InputError
from stemagent.runlog import RunLog
from stemagent.types import Atoms

#: content latents of the shipped weights
SHIPPED_K = int(json.loads(default_rvae_weights().with_suffix(".json").read_text())["spec"]["latent_dim"])

CFG = {
    "name": "latents", "seed": 5, "max_frames": 3,
    "driver": {"kind": "twin", "specimen": "graphene", "specimen_size_A": 60.0, "n_si": 6, "pace": "fast"},
    "scan": {"fov_A": 25.6, "shape_px": 128, "dwell_s": 1e-4},
    "pipeline": {"segmenter": {"kind": "log"}, "rvae": {"device": "cpu"}},
    "policy": {"kind": "raster", "overlap": 0.5},
    "safety": {"area_half_width_A": 16.0, "max_fov_A": 60.0},
    "log": {"fsync": False},
}


@pytest.fixture(scope="module")
def run_log(tmp_path_factory) -> str:
    cfg = config_from_dict(CFG)
    assert stage_names(cfg) == ["segment", "rvae", "policy"]
    path, seen = run_recording_policy_inputs(cfg, tmp_path_factory.mktemp("rvae") / "run")
    assert len(seen) == 3
    for f in seen:  # the policy sees an angle, a shift and the content latents of every atom
        n = f["n"]
        assert f["rvae_angle_rad"].shape == (n,) and f["rvae_shift_px"].shape == (n, 2) and f["rvae_z"].shape == (n, SHIPPED_K)
        enc = f["rvae_encoded"]
        assert enc.mean() > 0.5 and np.all(np.isfinite(f["rvae_z"][enc])) and np.all(np.isnan(f["rvae_z"][~enc]))
        assert np.all(np.abs(f["rvae_angle_rad"][enc]) <= np.pi + 1e-6)
        # graphene's two sublattices: the angle latent takes two values 60 degrees apart (mod 120)
        a = np.degrees(f["rvae_angle_rad"][enc])
        d = np.abs(((a[:, None] - a[None, :]) + 60) % 120 - 60)
        assert 0.25 < np.mean(d > 40) < 0.75 and np.mean((d > 15) & (d < 45)) < 0.25
    return path


def test_latents_stream_has_a_latent_per_atom(run_log):
    log = RunLog.open(run_log)
    lat = log.event_data("latents")
    atoms = log.atoms()
    assert [d["frame_index"] for d in lat] == [a.frame_index for a in atoms] == [0, 1, 2]
    for d, a in zip(lat, atoms):
        assert len(d["angle_rad"]) == len(d["z"]) == len(d["encoded"]) == len(a)
        assert d["weights"].startswith("rvae_graphene.pt@")
        assert all((z is None) == (not e) for z, e in zip((z[0] for z in d["z"]), d["encoded"]))
    rec = [d["records"]["rvae"] for d in log.event_data("pipeline")]
    assert all(r["encoded"] == sum(d["encoded"]) for r, d in zip(rec, lat))
    assert "rvae" in log.start["pipeline"]["stages"]


def test_verify_and_replay_reproduce_the_latents(run_log, tmp_path):
    result = CliRunner().invoke(app, ["replay", run_log, "--verify", "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.output.strip().splitlines()[-1])
    assert rep["ok"] and rep["compared"]["latents"] == 3
    result = CliRunner().invoke(app, ["replay", run_log, "--log-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    replayed = RunLog.open(next(tmp_path.iterdir()))
    assert replayed.event_data("latents") == RunLog.open(run_log).event_data("latents")


def test_rvae_off_by_default_and_its_options_checked(tmp_path):
    cfg = config_from_dict({k: v for k, v in CFG.items() if k != "pipeline"})
    assert cfg.pipeline.rvae is None and "rvae" not in stage_names(cfg)
    with pytest.raises(ConfigError, match="pipeline.rvae.bogus"):
        config_from_dict({**CFG, "pipeline": {"rvae": {"bogus": 1}}})
    with pytest.raises(ConfigError, match="pipeline.rvae.device"):
        config_from_dict({**CFG, "pipeline": {"rvae": {"device": "tpu"}}})
    with pytest.raises(InputError, match="no such file"):
        RVAEStage(PipelineRVAEConfig(weights=tmp_path / "missing.pt"))


def test_atoms_in_the_drift_corrected_frame_are_put_back_where_the_beam_saw_them():
    stage = RVAEStage(PipelineRVAEConfig(device="cpu"))
    atoms = Atoms(np.array([[1.0, 2.0], [3.0, 4.0]]), np.zeros(2), np.ones(2), 0, times_s=np.array([0.0, 1.0]))
    drift = SimpleNamespace(times_s=np.array([0.0, 2.0]), displacement_A=np.array([[0.0, 0.0], [2.0, -4.0]]))
    assert np.allclose(stage.beam_positions_A(atoms, drift), [[1.0, 2.0], [4.0, 2.0]])
    assert np.allclose(stage.beam_positions_A(atoms, None), atoms.positions_A)


def test_report_names_the_latents_and_their_weights(run_log):
    result = CliRunner().invoke(app, ["report", run_log])
    assert result.exit_code == 0, result.output
    n = sum(sum(d["encoded"]) for d in RunLog.open(run_log).event_data("latents"))
    assert f"- rVAE latents: {n} atoms encoded over 3 frames (weights rvae_graphene.pt@" in result.output
    assert "own streams" not in result.output
