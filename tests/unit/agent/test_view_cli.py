"""``stemagent run --view`` and ``stemagent view LOG`` from the command line (issue 22)."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from stemagent.agent.app.cli import app

CFG = {
    "name": "cli-view", "seed": 1, "max_frames": 2,
    "scan": {"fov_A": 12.8, "shape_px": 32, "dwell_s": 1e-5},
    "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0},
    "log": {"fsync": False},
}


def test_run_with_view_prints_the_page_and_view_serves_its_log(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    ran = CliRunner().invoke(app, ["run", "--config", str(cfg), "--view-at", "127.0.0.1:0", "--no-report", "--json",
                                   "--log-dir", str(tmp_path / "runs")])
    assert ran.exit_code == 0, ran.output
    assert "live view: http://127.0.0.1:" in ran.output and "/#token=" in ran.output
    log = next((tmp_path / "runs").iterdir())
    shown = CliRunner().invoke(app, ["view", str(log), "--at", "127.0.0.1:0", "--seconds", "0.2"])
    assert shown.exit_code == 0, shown.output
    assert f"run log {log} (2 observations): http://127.0.0.1:" in shown.output


def test_view_of_something_that_is_not_a_log_is_one_clear_error(tmp_path):
    shown = CliRunner().invoke(app, ["view", str(tmp_path)])
    assert shown.exit_code == 2 and "Traceback" not in shown.output
    assert "is not a run log" in shown.output and str(tmp_path) in shown.output
    bad = CliRunner().invoke(app, ["view", str(tmp_path), "--at", "localhost:http"])
    assert bad.exit_code == 2 and "--at" in bad.output and "localhost:http" in bad.output
