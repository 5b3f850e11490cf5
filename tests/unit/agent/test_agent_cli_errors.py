"""Every CLI path ends in one line naming what, where and the value (issue 10, defects 8-11)."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from stemagent.agent.app.cli import app
from stemagent.agent.app.factory import build_agent, build_clock, run_metadata
from stemagent.config import config_from_dict
from stemagent.runlog import RunLog
from stemagent.simulators.minimal import MinimalTwinDriver

GOOD = {
    "name": "cli", "seed": 1, "max_frames": 2,
    "scan": {"fov_A": 12.8, "shape_px": 32, "dwell_s": 1e-5},
    "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0},
    "log": {"fsync": False},
}


def write(tmp_path: Path, data, name="run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, (str, bytes)) else data) if not isinstance(data, bytes) else p.write_bytes(data)
    return p


def cli(*args: str, verbose: bool = False):
    result = CliRunner().invoke(app, [*(["-v"] if verbose else []), *args])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()] if result.stderr_bytes is not None else []
    return result, lines


def one_error_line(result, lines) -> str:
    assert "Traceback" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    assert errors[0] == result.output.strip().splitlines()[-1]  # the last thing printed
    return errors[0]


@pytest.mark.parametrize(
    "scan, rule",
    [
        ({"fov_A": 150.0}, "fov"),  # max_fov_A is 100
        ({"center_A": [500.0, 0.0]}, "area"),
        ({"dwell_s": 1e-9}, "dwell"),
    ],
)
def test_validate_and_run_refuse_what_the_gate_refuses(tmp_path, scan, rule):
    """Issue 10 defect 8: these passed validate and the run exited 0 as a success."""
    cfg = write(tmp_path, {**GOOD, "scan": {**GOOD["scan"], **scan}})
    for args in (["validate", str(cfg)], ["run", "--config", str(cfg), "--log-dir", str(tmp_path / "runs")]):
        result, lines = cli(*args)
        assert result.exit_code == 2
        line = one_error_line(result, lines)
        assert f"({rule})" in line and str(cfg) in line
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_budget_of_infinity_is_not_a_valid_config(tmp_path):
    cfg = write(tmp_path, {**GOOD, "safety": {"dose_budget_e_per_A2": float("inf")}})
    result, lines = cli("validate", str(cfg))
    line = one_error_line(result, lines)
    assert result.exit_code == 2 and "safety.dose_budget_e_per_A2=inf" in line and "finite" in line


def test_a_run_whose_every_command_is_refused_is_a_failure(tmp_path):
    # one field fits the area; the first frame (7.8e3 e/Å²) fits the budget, every later field
    # overlaps it and would pass the budget: refused, the run fails
    cfg = write(tmp_path, {**GOOD, "max_frames": 5, "agent": {"max_consecutive_refusals": 3},
                           "safety": {**GOOD["safety"], "area_half_width_A": 7.0, "dose_budget_e_per_A2": 1e4}})
    result, lines = cli("run", "--config", str(cfg), "--log-dir", str(tmp_path / "runs"))
    assert result.exit_code == 1
    assert "refused by the safety gate" in one_error_line(result, lines)


def test_secrets_are_never_printed_or_logged(tmp_path):
    """Issue 10 defect 10: the MQTT password was in the start document and in validate's output."""
    data = {**GOOD, "telemetry": {"host": "127.0.0.1", "username": "agent", "password": "s3cret-pw"}}
    result, _ = cli("validate", str(write(tmp_path, data)))
    assert result.exit_code == 0 and "s3cret-pw" not in result.output and "**********" in result.output
    cfg = config_from_dict(data)
    assert cfg.telemetry.password.get_secret_value() == "s3cret-pw"
    caps = asyncio.run(MinimalTwinDriver(cfg.driver).capabilities())
    assert "s3cret-pw" not in json.dumps(run_metadata(cfg, caps))
    bad = write(tmp_path, {**GOOD, "telemetry": {"password": 12345678}}, "bad.yaml")
    result, lines = cli("validate", str(bad))
    assert result.exit_code == 2 and "12345678" not in result.output and "<redacted>" in one_error_line(result, lines)


def test_a_config_that_is_not_utf8(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    result, lines = cli("validate", str(p))
    assert result.exit_code == 2 and "not UTF-8" in one_error_line(result, lines)


def test_a_log_dir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result, lines = cli("run", "--config", str(write(tmp_path, GOOD)), "--log-dir", str(blocker))
    assert result.exit_code == 2 and "cannot be created" in one_error_line(result, lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_bridge_running_is_a_failed_run_in_one_line(tmp_path):
    data = {**GOOD, "driver": {"kind": "zmq", "control_endpoint": f"tcp://127.0.0.1:{free_port()}",
                               "frames_endpoint": f"tcp://127.0.0.1:{free_port()}", "connect_timeout_s": 0.5}}
    result, lines = cli("run", "--config", str(write(tmp_path, data)), "--log-dir", str(tmp_path / "runs"))
    assert result.exit_code == 1
    assert "no bridge answered" in one_error_line(result, lines)
    assert not (tmp_path / "runs").exists()


def test_verbose_shows_the_traceback(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(app, ["-v", "run", "--config", str(write(tmp_path, GOOD)), "--log-dir", str(blocker)])
    assert result.exit_code == 2 and "Traceback" in result.output
    assert result.output.strip().splitlines()[-1].startswith("error:")


def test_replay_of_broken_logs_and_bad_options(tmp_path):
    result, _ = cli("run", "--config", str(write(tmp_path, GOOD)), "--log-dir", str(tmp_path / "runs"), "--json")
    assert result.exit_code == 0, result.output
    log = Path(json.loads(result.stdout.strip().splitlines()[-1])["log_path"])
    result, lines = cli("replay", str(log), "--pace", "bogus")
    assert result.exit_code == 2 and "--pace='bogus'" in one_error_line(result, lines)
    zarr_json = next((log / "frames.zarr" / "Experiments").glob("*/data/zarr.json"))
    zarr_json.write_text("{broken")
    result, lines = cli("replay", str(log))
    assert result.exit_code == 2 and "not a readable Zarr array" in one_error_line(result, lines)
    import shutil

    shutil.rmtree(log / "frames.zarr")
    result, lines = cli("replay", str(log))
    assert result.exit_code == 2 and "not a readable Zarr array" in one_error_line(result, lines)


def test_simulate_to_a_path_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = write(tmp_path, {**GOOD, "driver": {"kind": "twin", "specimen_size_A": 60.0}})
    result, lines = cli("simulate", "--config", str(cfg), "--out", str(blocker / "frames.npz"), "-n", "1")
    assert result.exit_code == 2 and "cannot be written" in one_error_line(result, lines)


async def test_a_start_that_fails_closes_its_log_and_its_driver(tmp_path):
    """Issue 10 defect 11: missing weights left a run folder with no stop document and the driver connected."""
    cfg = config_from_dict({**GOOD, "pipeline": {"segmenter": {"kind": "unet", "weights": str(tmp_path / "missing.pt")}}})
    clock = build_clock(cfg)
    twin = MinimalTwinDriver(cfg.driver, clock=clock)
    with pytest.raises(Exception, match="missing"):
        await build_agent(cfg, run_dir=tmp_path / "run", driver=twin, clock=clock)
    assert not twin.connected and twin.beam_blanked
    log = RunLog.open(tmp_path / "run")
    assert log.stop["exit_status"] == "fail" and "could not start" in log.stop["reason"] and "missing" in log.stop["reason"]


def test_an_uncalibrated_tiff_replays_with_a_pixel_size(tmp_path):
    """Issue 10 defect 11: the error said to pass pixel_size_A, which replay had no option for."""
    tifffile = pytest.importorskip("tifffile")
    from stemagent.config import MinimalTwinConfig
    from stemagent.types import ScanGeometry

    g = ScanGeometry(fov_A=(25.6, 25.6), shape_px=(128, 128))
    img = np.asarray(MinimalTwinDriver(MinimalTwinConfig()).noiseless_image(g) * 100, dtype=np.float32)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, img)
    result, lines = cli("replay", str(path), "--log-dir", str(tmp_path / "runs"))
    assert result.exit_code == 2 and "--pixel-size-A" in one_error_line(result, lines)
    result, _ = cli("replay", str(path), "--pixel-size-A", "0.2", "--log-dir", str(tmp_path / "runs"), "--json")
    assert result.exit_code == 0, result.output
    assert 150 < json.loads(result.stdout.strip().splitlines()[-1])["atoms_per_frame"] < 350


SHIPPED = sorted(p for p in Path(__file__).resolve().parents[3].joinpath("configs").glob("*.yaml") if not p.name.startswith("train-"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_pass_the_gate(path):
    from stemagent.agent.safety import preflight
    from stemagent.config import load_config

    verdict, _ = preflight(load_config(path))
    assert verdict.allowed, verdict


def test_an_error_message_with_brackets_is_printed_as_written(tmp_path):
    # rich markup must not eat "[name, document]"-like text or a value such as "[red]"
    bad = {**GOOD, "scan": {**GOOD["scan"], "shape_px": "[bold]x"}}
    result, lines = cli("run", "--config", str(write(tmp_path, bad)), "--log-dir", str(tmp_path / "runs"))
    assert result.exit_code == 2 and "[bold]x" in one_error_line(result, lines), result.output
