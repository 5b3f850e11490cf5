"""DriftLoopStage, hostile inputs: NaN positions, an empty frame, bad config values; parks are
replaced by a re-scan of the reference field whenever the estimate cannot place the beam."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from stemagent.drift import DriftConfig, DriftStage
from stemagent.drift.loop_stage import DriftLoopStage
from stemagent.drift.synthetic import SyntheticScan, hexagonal_lattice_A, linear_drift
from stemagent.errors import InputError
from stemagent.stages import Observation
from stemagent.types import Atoms, Park, ScanGeometry, ScanRegion

GEOM = ScanGeometry(center_A=(0.0, 0.0), fov_A=(20.0, 20.0), shape_px=(100, 100), dwell_s=2e-5)


def _obs(frame, atoms) -> Observation:
    return Observation(frame_index=frame.index, time_s=frame.end_time_s, geometry=frame.geometry, atoms=atoms, frame=frame)


def _tracked(n: int = 4):
    rng = np.random.default_rng(0)
    scan = SyntheticScan(hexagonal_lattice_A(30.0), linear_drift((0.2, -0.1)), GEOM, sigma_A=0.01)
    stage = DriftLoopStage(DriftStage(DriftConfig(window_frames=6)), background_refit=False)
    for i in range(n):
        frame, atoms, _ = scan.frame(i, scan.start_time_s(i), rng)
        obs = stage.process(_obs(frame, atoms))
    return stage, scan, rng, obs


def test_drift_loop_stage_converts_a_reliable_park_and_replaces_it_after_an_empty_frame() -> None:
    stage, scan, rng, obs = _tracked()
    assert obs.records["drift"]["status"] == "tracking"
    t = scan.start_time_s(4)
    cmd, rec = stage.to_device(Park((1.0, 1.0), 0.01), t)
    assert isinstance(cmd, Park) and rec["reliable"] and "replaced" not in rec
    np.testing.assert_allclose(np.asarray(cmd.position_A) - 1.0, rec["offset_A"])
    frame, atoms, _ = scan.frame(4, t, rng)
    empty = Atoms(np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0), 4)
    out = stage.process(_obs(frame, empty))
    assert out.records["drift"]["status"] == "too_few_atoms"
    cmd, rec = stage.to_device(Park((1.0, 1.0), 0.01), t + 1.0)
    assert isinstance(cmd, ScanRegion) and "min_atoms" in rec["replaced"]


def test_drift_loop_stage_names_nan_positions_and_then_refuses_to_park() -> None:
    stage, scan, rng, _ = _tracked(3)
    frame, atoms, _ = scan.frame(3, scan.start_time_s(3), rng)
    p = atoms.positions_A.copy()
    p[2] = np.nan
    bad = Atoms(p, atoms.classes, atoms.confidence, 3, uncertainty_A=atoms.uncertainty_A, times_s=atoms.times_s)
    with pytest.raises(InputError, match="atoms.positions_A"):
        stage.process(_obs(frame, bad))
    cmd, rec = stage.to_device(Park((0.0, 0.0), 0.01), scan.start_time_s(4))
    assert isinstance(cmd, ScanRegion) and "failed" in rec["replaced"]


@pytest.mark.parametrize("field,value", [("band_limit_A", -1.0), ("window_frames", 1), ("slip_A", 0.0), ("min_atoms", 0),
                                         ("band_inflation_range", (2.0, 1.0)), ("calibration_frames", 0.5)])
def test_drift_config_rejects_bad_values_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        DriftConfig(**{field: value})


@pytest.mark.parametrize("lag", [1, 2, 3])
def test_a_background_refit_is_adopted_the_configured_number_of_frames_after_it_was_due(lag: int) -> None:
    rng = np.random.default_rng(0)
    scan = SyntheticScan(hexagonal_lattice_A(30.0), linear_drift((0.2, -0.1)), GEOM, sigma_A=0.01)
    stage = DriftLoopStage(DriftStage(DriftConfig(window_frames=6, refit_adopt_after_frames=lag)))
    due, adopted = [], []
    for i in range(8):
        frame, atoms, _ = scan.frame(i, scan.start_time_s(i), rng)
        obs = stage.process(_obs(frame, atoms))
        assert obs.drift is not None
        if obs.records["drift"]["refit"]:
            adopted.append(i)
        if obs.drift.refit_due:
            due.append(i)
    stage.close()
    assert due and adopted and adopted[0] == due[0] + lag  # by frames, never by timing
    with pytest.raises(ValidationError, match="refit_adopt_after_frames"):
        DriftConfig(refit_adopt_after_frames=0)
