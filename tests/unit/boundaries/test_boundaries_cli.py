"""``stemagent analyze-boundaries`` on frames written by ``stemagent simulate``."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from stemagent.agent.app.cli import app


def _config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load(Path("configs/twin-boundary-film.yaml").read_text())
    cfg["driver"]["specimen_size_A"] = 140.0
    cfg["driver"]["boundary_tile_cells"] = 7
    cfg["scan"] = {"fov_A": 96.0, "shape_px": 384, "dwell_s": 2.0e-6}
    path = tmp_path / "film.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_simulate_then_analyze_writes_the_matrix_parameters_motifs_and_figures(tmp_path: Path) -> None:
    runner = CliRunner()
    npz = tmp_path / "frames.npz"
    res = runner.invoke(app, ["simulate", "-c", str(_config(tmp_path)), "-n", "1", "-o", str(npz)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "analysis"
    res = runner.invoke(app, ["analyze-boundaries", str(npz), "-o", str(out), "--no-alpha-curve", "--fix", "d=0.6", "--omega-n-max", "16", "--kmotif-boot", "200"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["boundaries"] >= 10 and summary["transitions"] > 25 and summary["forbidden_3motifs"] == 0
    params = json.loads((out / "parameters.json").read_text())
    assert params["reduced"]["fixed"] == {"d": 0.6} and params["reduced"]["intervals_95"]["d"] == [0.6, 0.6]
    assert params["steady_state"]["max_abs_difference"] < 1e-9
    matrix = json.loads((out / "transition_matrix.json").read_text())
    assert len(matrix["states"]) == 32 and len(matrix["full_posterior_mean"]) == 32
    traces = json.loads((out / "traces.json").read_text())
    assert traces and set(traces[0]) >= {"steps", "motifs", "motif_confidence", "stop"}
    assert "significant" in json.loads((out / "kmotifs.json").read_text())
    assert json.loads((out / "omega.json").read_text())["alpha_of_d"] is None
    for fig in ("boundary_overlay.png", "omega_loglog.png"):
        assert (out / fig).read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs_exit_2_with_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["analyze-boundaries", str(tmp_path / "missing.npz")])
    assert res.exit_code == 2 and "does not exist" in res.output
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    res = runner.invoke(app, ["analyze-boundaries", str(junk)])
    assert res.exit_code == 2 and "is not a run log" in res.output
    res = runner.invoke(app, ["analyze-boundaries", str(junk), "--fix", "k=zero"])
    assert res.exit_code == 2
