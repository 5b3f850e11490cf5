"""A low-dose overview followed by high-dose sub-scans (the survey's pattern) on a specimen that
does not drift: the stage must not read the overview's position errors as drift.

The overview's detections carry, besides 0.05 Å of noise, an error shared by the atoms of a
region (up to 0.1 Å, varying over 40 Å: a low-dose frame's finder bias and scan distortion), as
the survey's overview on the twin does (0.23 Å RMS against the truth). Each 20 Å sub-scan lies
inside one such region. Measured against the overview, every sub-scan would show a common shift
of up to 0.1 Å that the GP reads as drift; the sub-scan's 50x dose makes it the reference instead.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from stemagent.drift import DriftConfig, DriftStage
from stemagent.drift.synthetic import SyntheticScan, hexagonal_lattice_A
from stemagent.types import ScanGeometry

SITES = hexagonal_lattice_A(80.0)
OVERVIEW = ScanGeometry(fov_A=(64.0, 64.0), shape_px=(320, 320), dwell_s=1e-6)
SUBSCAN_CENTRES_A = [(-15.0, -15.0), (15.0, -15.0), (-15.0, 15.0), (15.0, 15.0), (-15.0, -15.0), (15.0, -15.0)]


def _no_drift(t: np.ndarray) -> np.ndarray:
    return np.zeros((len(np.atleast_1d(t)), 2))


def _regional_error_A(p: np.ndarray) -> np.ndarray:
    return 0.1 * np.stack([np.sin(2 * np.pi * p[:, 0] / 40.0 + 0.7), np.cos(2 * np.pi * p[:, 1] / 40.0 + 0.3)], axis=1)


def _survey(config: DriftConfig, seed: int = 0) -> list[float]:
    """The largest estimated drift (Å, either axis, over each frame's grid) of each sub-scan."""
    rng = np.random.default_rng(seed)
    stage = DriftStage(config)
    scan = SyntheticScan(SITES, _no_drift, OVERVIEW, sigma_A=0.05, dose_e_per_A2=2e3)
    frame, atoms, ids = scan.frame(0, 0.0, rng)
    atoms = dataclasses.replace(atoms, positions_A=atoms.positions_A + _regional_error_A(SITES[ids]))
    assert stage.update(frame, atoms).status == "reference"
    largest = []
    t = frame.end_time_s + 0.2
    for k, centre in enumerate(SUBSCAN_CENTRES_A, start=1):
        g = ScanGeometry(center_A=centre, fov_A=(20.0, 20.0), shape_px=(100, 100), dwell_s=2e-5)
        sub = SyntheticScan(SITES, _no_drift, g, sigma_A=0.02, dose_e_per_A2=1e5)
        frame, atoms, _ = sub.frame(k, t, rng)
        est = stage.update(frame, atoms)
        largest.append(float(np.max(np.abs(est.displacement_A))))
        t = frame.end_time_s + 0.2
    return largest


def test_sub_scans_after_a_low_dose_overview_do_not_invent_drift() -> None:
    assert max(_survey(DriftConfig())) < 0.03


def test_with_the_overview_as_reference_its_errors_read_as_drift() -> None:
    # what the first test guards against (the stage before reference_dose_ratio)
    assert max(_survey(DriftConfig(reference_dose_ratio=None))) > 0.06


def test_a_better_reference_keeps_the_sample_frame_under_drift() -> None:
    # low-dose frames of a drifting field, then the same field at 50x the dose: the new reference
    # starts from the drift forecast, so sample-frame positions do not jump by the drift so far
    from stemagent.drift.synthetic import linear_drift

    rng = np.random.default_rng(1)
    geometry = ScanGeometry(fov_A=(25.6, 25.6), shape_px=(256, 256), dwell_s=4e-6)
    sites = hexagonal_lattice_A(40.0)
    drift = linear_drift((0.5, -0.3))
    stage = DriftStage(DriftConfig(window_frames=12, refit_every_frames=5, refit_max_iter=25))
    gauges, statuses = [], []
    for k in range(10):
        low = k < 6
        scan = SyntheticScan(sites, drift, geometry, sigma_A=0.05 if low else 0.02, dose_e_per_A2=2e3 if low else 1e5)
        frame, atoms, ids = scan.frame(k, scan.start_time_s(k), rng)
        est = stage.update(frame, atoms)
        statuses.append(est.status)
        has = est.track_ids >= 0
        gauges.append(np.mean(est.refined_positions_A[has] - sites[ids[has]], axis=0))
    assert statuses == ["reference"] + ["tracking"] * 5 + ["reference"] + ["tracking"] * 3
    assert np.linalg.norm(drift(np.array([scan.start_time_s(6)]))[0]) > 0.8  # the jump there would be
    assert np.all(np.linalg.norm(np.array(gauges[6:]) - gauges[5], axis=1) < 0.05)
