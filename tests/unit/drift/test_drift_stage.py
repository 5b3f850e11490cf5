"""The drift stage on synthetic detections under known drifts (no image formation).

Tolerances: detections carry 0.02 Å Gaussian noise (a good finder at high dose); frames are
0.26 s of 256 x 256 at 0.1 Å/px, back to back. "Placement" is where the beam lands on the
specimen, relative to the intended atom, when it is sent to the atom's refined sample-frame
position plus the forecast, 0.1 s after the last frame: it is gauge-free (the stage's sample
frame is its own reference lattice).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from stemagent.drift import DriftConfig, DriftStage
from stemagent.drift.resample import corrected_image
from stemagent.drift.synthetic import SyntheticScan, hexagonal_lattice_A, linear_drift, random_walk_drift, sinusoidal_drift
from stemagent.errors import InputError
from stemagent.types import Atoms, Frame, ScanGeometry

GEOMETRY = ScanGeometry(fov_A=(25.6, 25.6), shape_px=(256, 256), dwell_s=4e-6)
SITES = hexagonal_lattice_A(40.0)
CONFIG = DriftConfig(window_frames=12, refit_every_frames=5, refit_max_iter=25)


def _run(drift, n_frames: int = 14, seed: int = 0, config: DriftConfig = CONFIG, **frame_kw):
    rng = np.random.default_rng(seed)
    scan = SyntheticScan(SITES, drift, GEOMETRY, sigma_A=0.02)
    stage = DriftStage(config)
    out = []
    for k in range(n_frames):
        frame, atoms, ids = scan.frame(k, scan.start_time_s(k), rng, **frame_kw)
        out.append((frame, atoms, ids, stage.update(frame, atoms)))
    return stage, out


def _placement_rms_A(stage: DriftStage, drift, last, horizon_s: float = 0.1) -> float:
    frame, _, ids, est = last
    te = frame.end_time_s + horizon_s
    has = est.track_ids >= 0
    landed = stage.to_beam(est.refined_positions_A[has], te) - drift(np.array([te]))
    return float(np.sqrt(np.mean(np.sum((landed - SITES[ids[has]]) ** 2, axis=1))))


def _gauge(est, ids) -> np.ndarray:
    has = est.track_ids >= 0
    return np.mean(est.refined_positions_A[has] - SITES[ids[has]], axis=0)


def test_drift_stage_recovers_a_linear_drift() -> None:
    drift = linear_drift((0.5, -0.3))
    stage, out = _run(drift)
    assert [o[3].status for o in out] == ["reference"] + ["tracking"] * (len(out) - 1)
    assert _placement_rms_A(stage, drift, out[-1]) < 0.02
    t = out[-1][0].end_time_s
    (d0, d1), _ = stage.forecast(np.array([t, t + 1.0]))
    np.testing.assert_allclose(d1 - d0, [0.5, -0.3], atol=0.02)  # the velocity, within 0.02 Å/s
    assert stage.check(t + 0.1).reliable


def test_drift_stage_recovers_a_sinusoidal_drift() -> None:
    drift = sinusoidal_drift((0.4, 0.3), period_s=6.0, v_A_per_s=(0.2, 0.0))
    stage, out = _run(drift, n_frames=16)
    assert _placement_rms_A(stage, drift, out[-1]) < 0.04


def test_drift_stage_recovers_a_random_walk_within_its_unpredictable_part() -> None:
    rng = np.random.default_rng(7)
    drift = random_walk_drift(0.05, 20.0, rng, v_A_per_s=(0.3, 0.1))
    stage, out = _run(drift, n_frames=16)
    # what no one can forecast: the walk's own spread over the 0.1 s horizon, 0.05 * sqrt(0.1) per axis
    floor = 0.05 * np.sqrt(0.1) * np.sqrt(2)
    assert _placement_rms_A(stage, drift, out[-1]) < 3 * floor


def test_drift_stage_without_drift_forecasts_zero_with_a_narrow_band() -> None:
    drift = linear_drift((0.0, 0.0))
    stage, out = _run(drift, n_frames=12)
    frame, _, ids, est = out[-1]
    mean, std = stage.forecast(frame.end_time_s + 0.1)
    truth_in_stage_frame = -_gauge(est, ids)
    assert np.all(np.abs(mean[0] - truth_in_stage_frame) < 0.01)
    assert np.all(1.96 * std[0] < 0.03)
    assert _placement_rms_A(stage, drift, out[-1]) < 0.015


def test_drift_stage_survives_a_dopant_hop_a_new_vacancy_and_30_percent_missing_atoms() -> None:
    drift = linear_drift((0.4, 0.2))
    rng = np.random.default_rng(3)
    scan = SyntheticScan(SITES, drift, GEOMETRY, sigma_A=0.02)
    stage = DriftStage(CONFIG)
    present = np.ones(len(SITES), dtype=bool)
    near = lambda p: int(np.argmin(np.linalg.norm(SITES - np.asarray(p), axis=1)))  # noqa: E731
    hopper, vacancy = near((-3.0, 1.0)), near((4.0, -2.0))
    d = np.linalg.norm(SITES - SITES[hopper], axis=1)
    empty = int(np.flatnonzero((d > 1.3) & (d < 1.5))[0])
    present[empty] = False
    hop_track = None
    for k in range(14):
        if k == 6:
            present[vacancy] = False  # knocked out
        if k == 8:
            present[hopper], present[empty] = False, True  # the atom hops into the empty site
        frame, atoms, ids = scan.frame(k, scan.start_time_s(k), rng, present=present, missing_fraction=0.3)
        est = stage.update(frame, atoms)
        assert est.status == ("reference" if k == 0 else "tracking"), est.reason
        assert est.n_outliers <= 2
        if k == 7 and np.any(ids == hopper):
            hop_track = int(est.track_ids[np.flatnonzero(ids == hopper)[0]])
        if k >= 8 and np.any(ids == empty):
            # the atom at its new site is a new track, never the old one displaced
            assert int(est.track_ids[np.flatnonzero(ids == empty)[0]]) != hop_track
    assert _placement_rms_A(stage, drift, (frame, atoms, ids, est)) < 0.03


def test_drift_stage_reports_too_few_atoms_instead_of_guessing() -> None:
    drift = linear_drift((0.5, 0.0))
    rng = np.random.default_rng(0)
    scan = SyntheticScan(SITES, drift, GEOMETRY, sigma_A=0.02)
    stage = DriftStage(CONFIG)
    few = np.zeros(len(SITES), dtype=bool)
    few[:5] = True
    frame, atoms, _ = scan.frame(0, 0.0, rng, present=few)
    est = stage.update(frame, atoms)
    assert est.status == "too_few_atoms" and "min_atoms" in est.reason and not est.used
    assert not stage.has_reference and not stage.check(1.0).reliable
    for k in range(1, 6):
        frame, atoms, _ = scan.frame(k, scan.start_time_s(k), rng)
        assert stage.update(frame, atoms).used
    tracks_before = stage.n_tracks
    empty = Atoms(np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0), frame_index=6)
    frame6, _, _ = scan.frame(6, scan.start_time_s(6), rng)
    est = stage.update(frame6, empty)
    assert est.status == "too_few_atoms" and est.n_matched == 0
    assert stage.n_tracks == tracks_before  # nothing was dropped or guessed


def test_drift_stage_lost_tracking_starts_a_new_reference() -> None:
    stage, out = _run(linear_drift((0.3, 0.0)), n_frames=5)
    frame, atoms, _, _ = out[-1]
    jumped = Atoms(atoms.positions_A + np.array([3.3, 1.9]), atoms.classes, atoms.confidence, frame_index=99,
                   uncertainty_A=atoms.uncertainty_A, times_s=atoms.times_s + 0.3)
    later = Frame(frame.image, frame.geometry, frame.line_times_s + 0.3, 99, 0.0)
    ref = stage.reference_id
    est = stage.update(later, jumped)
    # a jump by a lattice-commensurate amount is ambiguous: either it matches (shift taken out)
    # or the stage says it lost track; it never reports a confident estimate from wrong matches
    if est.status == "lost":
        assert stage.reference_id == ref + 1 and "tracking lost" in est.reason
        assert not stage.check(later.end_time_s).reliable
    else:
        assert np.linalg.norm(np.asarray(est.shift_A)) > 0.1


def test_drift_stage_disabled_passes_positions_through() -> None:
    stage, out = _run(linear_drift((0.5, 0.0)), n_frames=2, config=DriftConfig(enabled=False))
    frame, atoms, _, est = out[-1]
    assert est.status == "disabled"
    np.testing.assert_array_equal(est.atoms.positions_A, atoms.positions_A)
    np.testing.assert_array_equal(stage.to_beam((1.0, 2.0), 5.0), [1.0, 2.0])
    assert stage.check(5.0).reliable


def test_drift_stage_is_deterministic_for_replay() -> None:
    a, out_a = _run(linear_drift((0.4, 0.1)), n_frames=6, seed=5)
    b, out_b = _run(linear_drift((0.4, 0.1)), n_frames=6, seed=5)
    for (_, _, _, ea), (_, _, _, eb) in zip(out_a, out_b):
        np.testing.assert_array_equal(ea.displacement_A, eb.displacement_A)
        np.testing.assert_array_equal(ea.atoms.positions_A, eb.atoms.positions_A)
        assert ea.to_dict()["hyperparameters"] == eb.to_dict()["hyperparameters"]
    json.dumps(out_a[-1][3].to_dict())  # the log document is plain JSON


def test_drift_stage_conversions_are_inverse_and_bad_input_names_the_field() -> None:
    stage, out = _run(linear_drift((0.5, 0.0)), n_frames=4)
    p = np.array([[1.0, 2.0], [3.0, -1.0]])
    np.testing.assert_allclose(stage.to_sample(stage.to_beam(p, 2.0), 2.0), p)
    frame, atoms, _, _ = out[-1]
    bad = Atoms(atoms.positions_A, atoms.classes, atoms.confidence, frame_index=9,
                uncertainty_A=np.full(len(atoms), np.nan), times_s=atoms.times_s)
    with pytest.raises(InputError, match="uncertainty_A"):
        stage.update(frame, bad)


def test_drift_corrected_image_puts_a_drifting_spot_back_at_its_sample_position() -> None:
    g = ScanGeometry(fov_A=(12.8, 12.8), shape_px=(128, 128), dwell_s=1e-5)
    v = np.array([5.0, -4.0])  # Å/s: the spot is scanned about 0.08 s into the 0.16 s frame, 0.5 Å away
    X = np.array([1.0, -0.5])
    line_times = g.line_start_times_s(0.0)
    times = line_times[:, None] + np.arange(128)[None, :] * g.dwell_s
    rr, cc = np.meshgrid(np.arange(128.0), np.arange(128.0), indexing="ij")
    beam = g.pixel_to_sample(np.stack([rr.ravel(), cc.ravel()], axis=1)).reshape(128, 128, 2)
    seen = beam - times[..., None] * v  # the sample point under each pixel
    image = np.exp(-np.sum((seen - X) ** 2, axis=-1) / (2 * 0.3**2)).astype(np.float32)
    frame = Frame(image, g, line_times, 0, 0.0)
    out = corrected_image(frame, lambda t: (np.asarray(t)[:, None] * v[None, :], np.zeros((len(t), 2))))
    peak = np.unravel_index(np.nanargmax(out), out.shape)
    at = g.pixel_to_sample(np.array([peak]))[0]
    assert np.linalg.norm(at - X) < 0.15
    raw_peak = g.pixel_to_sample(np.array([np.unravel_index(np.argmax(image), image.shape)]))[0]
    assert np.linalg.norm(raw_peak - X) > 0.3  # uncorrected, the spot is elsewhere


def test_drift_stage_a_field_without_tracks_adds_atoms_and_keeps_the_reference() -> None:
    drift = linear_drift((0.3, 0.1))
    sites = hexagonal_lattice_A(100.0)
    rng = np.random.default_rng(4)
    here = SyntheticScan(sites, drift, GEOMETRY, sigma_A=0.02)
    there = SyntheticScan(sites, drift, ScanGeometry(center_A=(40.0, 0.0), fov_A=(25.6, 25.6), shape_px=(256, 256),
                                                     dwell_s=4e-6), sigma_A=0.02)
    stage = DriftStage(CONFIG)
    for k in range(5):
        stage.update(*here.frame(k, here.start_time_s(k), rng)[:2])
    ref = stage.reference_id
    est = stage.update(*there.frame(5, here.start_time_s(5), rng)[:2])
    assert est.status == "new_field" and est.n_new > 50 and stage.reference_id == ref
    frame, atoms, _ = here.frame(6, here.start_time_s(6), rng)
    est = stage.update(frame, atoms)
    assert est.status == "tracking" and est.n_matched > 0.8 * len(atoms)


def test_drift_stage_can_leave_the_refit_to_the_caller() -> None:
    drift = linear_drift((0.5, -0.3))
    stage, out = _run(drift, n_frames=6, config=DriftConfig(window_frames=12, refit_in_update=False, refit_max_iter=25))
    assert not any(o[3].refit for o in out) and stage.gp.fits == 0
    assert out[-1][3].refit_due and out[-1][3].to_dict()["refit_due"]
    assert stage.refit() > 0 and stage.gp.fits == 1 and not stage.refit_due
    assert stage.refit() == 0.0  # nothing due any more
    assert _placement_rms_A(stage, drift, out[-1]) < 0.03


def test_drift_stage_band_is_calibrated_by_its_own_forecast_errors() -> None:
    """Drift the GP cannot model (a seeded random jump of 0.03 Å per axis at each frame boundary,
    on a linear drift): the GP alone is overconfident 0.1 s ahead; the band calibration, which
    scores each frame's observations against the forecast made before them, widens the band.
    Seed 0, frames 8-19 (24 axis values): uncalibrated (``calibrate_band=False``) the 95% band
    covered 0.75 of the true drift (this test fails); calibrated it passes."""
    rng = np.random.default_rng(0)
    period_s = GEOMETRY.frame_time_s
    jumps_A = np.cumsum(rng.normal(0.0, 0.03, (200, 2)), axis=0)
    linear = linear_drift((0.3, 0.1))

    def drift(t: np.ndarray) -> np.ndarray:
        return linear(t) + jumps_A[np.clip((np.asarray(t) / period_s).astype(int), 0, len(jumps_A) - 1)]

    scan = SyntheticScan(SITES, drift, GEOMETRY, sigma_A=0.02)
    stage = DriftStage(CONFIG.model_copy(update={"calibration_frames": 5.0}))
    z = []
    for k in range(20):
        frame, atoms, ids = scan.frame(k, scan.start_time_s(k), rng)
        est = stage.update(frame, atoms)
        if k >= 8:
            te = frame.end_time_s + 0.1
            mean, std = stage.forecast(te)
            z.append((mean[0] - (drift(np.array([te]))[0] - _gauge(est, ids))) / std[0])
    z_all = np.concatenate(z)
    assert np.mean(np.abs(z_all) < 1.96) >= 0.79
    assert np.sqrt(np.mean(z_all**2)) < 1.5
    # the band is the GP's, widened on both axes by the logged factor
    inflation = np.asarray(est.band_inflation)
    assert np.all(inflation > 1.15)
    raw_var = stage.gp.predict(te)[1]
    np.testing.assert_allclose(std, np.sqrt(raw_var) * inflation[None, :])
