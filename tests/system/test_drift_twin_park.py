"""Closed loop on the drifting twin: frames -> atom finder -> drift stage -> converted commands.

The twin's driver is driven directly (no agent loop): acquire frames of one field, find atoms
with the classical finder, update the drift stage, then park the beam at a tracked atom's
sample-frame position converted to the beam frame at the park's start. The twin's ground truth
says which specimen point the beam sat on; it must be the intended atom within 0.2 Å.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemagent.clock import VirtualClock
from stemagent.drift import DriftConfig, DriftStage
from stemagent.drift.commands import to_beam_command
from stemagent.segmentation.classical import LoGFinder
from stemagent.simulators import DriftModel, TwinDriver, build_specimen
from stemagent.types import Park, ScanGeometry, ScanRegion

pytestmark = pytest.mark.system

GEOMETRY = ScanGeometry(center_A=(0.0, 0.0), fov_A=(25.6, 25.6), shape_px=(256, 256), dwell_s=4e-6)  # 0.26 s frames


async def _tracked_twin(seed: int, n_frames: int = 10):
    rng = np.random.default_rng(seed)
    specimen = build_specimen("mos2", size_A=(80.0, 80.0), center_A=(0.0, 0.0), rng=rng)
    drift = DriftModel(velocity_A_per_s=(0.4, -0.3), wobble_amplitude_A=0.3, wobble_period_s=20.0,
                       random_walk_A_per_sqrt_s=0.02, seed=seed)
    clock = VirtualClock()
    twin = TwinDriver(specimen, clock=clock, rng=seed, drift=drift, dynamics=False, beam_current_pA=5.0)
    await twin.connect()
    finder = LoGFinder(sigma_A=0.45)
    stage = DriftStage(DriftConfig(bins_per_frame=8, window_frames=12))
    last = None
    for _ in range(n_frames):
        frame = await twin.acquire(GEOMETRY)
        atoms = finder.find(frame)
        est = stage.update(frame, atoms)
        assert est.status in ("reference", "tracking"), est.reason
        last = (frame, atoms, est)
    return twin, clock, stage, last


def _true_site_of(twin: TwinDriver, frame, beam_xy: np.ndarray) -> np.ndarray:
    """The twin's sample-frame position of the column seen at beam position ``beam_xy`` in ``frame``."""
    truth = twin.ground_truth.frame_truth(frame.index)
    seen_at = frame.geometry.pixel_to_sample(truth.pixels_rc)
    d, j = cKDTree(seen_at).query(beam_xy)
    assert d < 0.3
    return truth.positions_A[j]


@pytest.mark.parametrize("seed", [3, 11])
async def test_drift_converted_park_lands_on_the_intended_atom(seed: int) -> None:
    twin, clock, stage, (frame, atoms, est) = await _tracked_twin(seed)
    # the target: the tracked atom nearest the field's centre, in the stage's sample frame
    tracked = np.flatnonzero(est.track_ids >= 0)
    k = tracked[np.argmin(np.linalg.norm(est.refined_positions_A[tracked], axis=1))]
    target_sample = est.refined_positions_A[k]
    true_site = _true_site_of(twin, frame, atoms.positions_A[k])
    await clock.sleep(0.5)  # the agent thinks, the specimen drifts (0.25 Å at 0.5 Å/s)
    converted = to_beam_command(Park(position_A=tuple(target_sample), dwell_s=0.01), stage, clock.monotonic())
    assert converted.check.reliable, converted.check.reason
    result = await twin.park(converted.command.position_A, converted.command.dwell_s)
    landed = np.asarray(result.position_A) - twin.ground_truth.drift_at(result.start_time_s)
    error = float(np.linalg.norm(landed - true_site))
    assert error < 0.2, f"converted park missed the atom by {error:.3f} Å"
    # without the conversion (the atom's last detected position, as if the specimen stood still)
    naive = atoms.positions_A[k] - twin.ground_truth.drift_at(result.start_time_s)
    naive_error = float(np.linalg.norm(naive - true_site))
    assert naive_error > 0.2 and error < naive_error / 3
    await twin.close()
    assert twin.beam_blanked


async def test_drift_converted_scan_is_centred_on_the_intended_atom() -> None:
    twin, clock, stage, (frame, atoms, est) = await _tracked_twin(5)
    tracked = np.flatnonzero(est.track_ids >= 0)
    k = tracked[np.argmin(np.linalg.norm(est.refined_positions_A[tracked] - np.array([3.0, -2.0]), axis=1))]
    true_site = _true_site_of(twin, frame, atoms.positions_A[k])
    await clock.sleep(0.3)
    sub = ScanGeometry(center_A=tuple(est.refined_positions_A[k]), fov_A=(12.8, 12.8), shape_px=(128, 128), dwell_s=4e-6)
    converted = to_beam_command(ScanRegion(sub), stage, clock.monotonic())
    assert converted.check.reliable, converted.check.reason
    new = await twin.acquire(converted.command.geometry)
    truth = twin.ground_truth.frame_truth(new.index)
    j = int(np.argmin(np.linalg.norm(truth.positions_A - true_site, axis=1)))
    assert np.linalg.norm(truth.positions_A[j] - true_site) < 1e-9
    appeared_at = new.geometry.pixel_to_sample(truth.pixels_rc[j : j + 1])[0]
    off_centre = float(np.linalg.norm(appeared_at - np.asarray(new.geometry.center_A)))
    assert off_centre < 0.2, f"the atom appeared {off_centre:.3f} Å from the scan centre"
    await twin.close()
