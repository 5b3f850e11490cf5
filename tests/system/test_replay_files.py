"""``stemagent replay`` runs the pipeline on an acquisition file written by other software's format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stemagent.agent.app.cli import app
from stemagent.config import MinimalTwinConfig
from stemagent.simulators.minimal import MinimalTwinDriver
from stemagent.types import ScanGeometry

pytestmark = pytest.mark.system
rsciio = pytest.importorskip("rsciio")


def lattice_image(n: int = 128, fov_A: float = 25.6) -> np.ndarray:
    twin = MinimalTwinDriver(MinimalTwinConfig())
    g = ScanGeometry(center_A=(0.0, 0.0), fov_A=(fov_A, fov_A), shape_px=(n, n))
    return np.asarray(twin.noiseless_image(g), dtype=np.float32)


def test_replay_an_emd_file(tmp_path: Path) -> None:
    from rsciio.emd import file_writer

    n, fov_nm = 128, 2.56
    img = lattice_image(n, fov_nm * 10)
    axes = [
        {"name": "y", "size": n, "scale": fov_nm / n, "offset": -fov_nm / 2, "units": "nm", "navigate": False},
        {"name": "x", "size": n, "scale": fov_nm / n, "offset": -fov_nm / 2, "units": "nm", "navigate": False},
    ]
    path = tmp_path / "graphene.emd"
    file_writer(str(path), {"data": np.stack([img, img]), "axes": [{"name": "t", "size": 2, "scale": 1.0, "offset": 0.0,
                            "units": "s", "navigate": True}, *axes], "metadata": {"General": {"title": "HAADF"}, "Signal": {"signal_type": ""}},
                            "original_metadata": {}})
    result = CliRunner().invoke(app, ["replay", str(path), "--json", "--log-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["frames"] == 2 and summary["state"] == "stopped"
    # a 25.6 Å field of graphene holds ~250 atoms; the finder sees them at the file's calibration
    assert 150 < summary["atoms_per_frame"] < 350


def test_replay_of_a_broken_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.dm3"
    path.write_bytes(b"\x00\x00\x00\x03not really")
    result = CliRunner().invoke(app, ["replay", str(path)])
    assert result.exit_code == 2 and "RosettaSciIO" in result.output


def emd_file(tmp_path: Path, n: int = 256, fov_nm: float = 2.56) -> Path:
    from rsciio.emd import file_writer

    img = lattice_image(n, fov_nm * 10) * 50.0
    axes = [
        {"name": "y", "size": n, "scale": fov_nm / n, "offset": -fov_nm / 2, "units": "nm", "navigate": False},
        {"name": "x", "size": n, "scale": fov_nm / n, "offset": -fov_nm / 2, "units": "nm", "navigate": False},
    ]
    path = tmp_path / "graphene.emd"
    file_writer(str(path), {"data": img, "axes": axes, "metadata": {"General": {"title": "HAADF"}, "Signal": {"signal_type": ""}},
                            "original_metadata": {}})
    return path


def test_replay_a_file_with_the_unet_and_a_specimen_and_no_invented_dose(tmp_path: Path) -> None:
    # issue 12 item 7: replay always used the LoG finder, and a file with no recorded beam current
    # got a dose from a 20 pA default in its summary
    path = emd_file(tmp_path)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["replay", str(path), "--json", "--log-dir", str(runs), "--segmenter", "unet", "--specimen", "graphene"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["peak_dose_e_per_A2"] == "unknown" and "records no beam current" in summary["dose_note"]
    assert 150 < summary["atoms_per_frame"] < 350
    log_text = (Path(summary["log_path"]) / "documents.jsonl").read_text() if Path(summary["log_path"]).is_dir() else Path(summary["log_path"]).read_text()
    assert "specimen_choice" in log_text and "evidence_nats" in log_text  # the segment stage's report, the atoms' evidence
    # the user gives current and dwell: 20 pA x 2 µs over (0.1 Å)^2 = 2.5e4 e/Å²
    result = CliRunner().invoke(app, ["replay", str(path), "--json", "--log-dir", str(runs), "--beam-current-pA", "20", "--dwell-s", "2e-6"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["peak_dose_e_per_A2"] == pytest.approx(20e-12 * 2e-6 / 1.602176634e-19 / 0.01, rel=1e-3)


def test_replay_options_of_files_are_refused_with_a_bad_value(tmp_path: Path) -> None:
    path = emd_file(tmp_path, n=64, fov_nm=0.64)
    result = CliRunner().invoke(app, ["replay", str(path), "--segmenter", "cnn"])
    assert result.exit_code == 2 and "--segmenter" in result.output
    result = CliRunner().invoke(app, ["replay", str(path), "--segmenter", "log", "--specimen", "tmd"])
    assert result.exit_code == 2 and "--specimen" in result.output
