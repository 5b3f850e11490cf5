"""Sample-frame commands to beam-frame commands with the drift forecast; the stage's config."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from stemagent.drift import DriftConfig, DriftStage
from stemagent.drift.commands import execution_time_s, to_beam_command
from stemagent.drift.synthetic import SyntheticScan, hexagonal_lattice_A, linear_drift
from stemagent.types import Blank, Park, ScanGeometry, ScanRegion

GEOMETRY = ScanGeometry(fov_A=(25.6, 25.6), shape_px=(256, 256), dwell_s=4e-6)
V = np.array([0.5, -0.25])


@pytest.fixture(scope="module")
def stage() -> DriftStage:
    rng = np.random.default_rng(2)
    scan = SyntheticScan(hexagonal_lattice_A(40.0), linear_drift(tuple(V)), GEOMETRY, sigma_A=0.02)
    st = DriftStage(DriftConfig(window_frames=8, refit_every_frames=4, refit_max_iter=25))
    for k in range(8):
        frame, atoms, _ = scan.frame(k, scan.start_time_s(k), rng)
        st.update(frame, atoms)
    return st


def test_drift_park_converts_at_its_start_and_scan_at_its_mid_time(stage: DriftStage) -> None:
    start = 2.3
    park = to_beam_command(Park(position_A=(1.0, -2.0), dwell_s=0.05), stage, start)
    assert park.time_s == start == execution_time_s(park.sample_command, start)
    d, _ = stage.forecast(start)
    np.testing.assert_allclose(park.command.position_A, np.array([1.0, -2.0]) + d[0])
    np.testing.assert_allclose(park.offset_A, d[0])
    assert park.command.dwell_s == 0.05 and park.check.reliable
    sub = ScanGeometry(center_A=(3.0, 4.0), fov_A=(10.0, 10.0), shape_px=(100, 100), dwell_s=1e-5)
    scan = to_beam_command(ScanRegion(sub), stage, start)
    mid = start + sub.frame_time_s / 2
    assert scan.time_s == pytest.approx(mid)
    d_mid, _ = stage.forecast(mid)
    np.testing.assert_allclose(scan.command.geometry.center_A, np.array([3.0, 4.0]) + d_mid[0])
    assert scan.command.geometry.fov_A == sub.fov_A and scan.command.geometry.dwell_s == sub.dwell_s
    # the conversion follows the drift: half a second later the park moves by v * 0.5
    later = to_beam_command(Park(position_A=(1.0, -2.0), dwell_s=0.05), stage, start + 0.5)
    np.testing.assert_allclose(np.subtract(later.command.position_A, park.command.position_A), V * 0.5, atol=0.02)
    json.dumps(scan.to_dict())


def test_drift_blank_is_unchanged_and_an_unreliable_estimate_says_why(stage: DriftStage) -> None:
    blank = to_beam_command(Blank(), stage, 1.0)
    assert blank.command == Blank()
    far = to_beam_command(Park(position_A=(0.0, 0.0), dwell_s=0.01), stage, 500.0)  # minutes past the data
    assert not far.check.reliable and "band_limit_A" in far.check.reason and far.check.band_A > 0.2
    fresh = DriftStage()
    check = fresh.check(0.0)
    assert not check.reliable and "reference" in check.reason


def test_drift_config_rejects_unknown_and_bad_fields_by_name() -> None:
    with pytest.raises(ValidationError, match="windw_frames"):
        DriftConfig(windw_frames=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="band_limit_A"):
        DriftConfig(band_limit_A=-1.0)
    cfg = DriftConfig.model_validate({"enabled": False, "window_frames": 10})
    assert not cfg.enabled and cfg.model_dump()["window_frames"] == 10
