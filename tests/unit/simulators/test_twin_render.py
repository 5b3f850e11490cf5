"""Image formation of the digital twin: render_sample API, Z contrast, counting noise, drift."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.simulators import render_sample
from stemagent.simulators.fast_adf import ADFModel, render_fraction
from stemagent.simulators.optics import ProbeOptics
from stemagent.simulators.render import cramer_rao_bound_A, render_frame
from stemagent.simulators.scan import DetectorModel, DriftModel
from stemagent.simulators.specimens import SPECIMEN_KINDS, specimen_from_atoms
from stemagent.types import ScanGeometry


@pytest.mark.parametrize("kind", SPECIMEN_KINDS)
def test_render_sample_returns_image_and_consistent_truth(kind: str) -> None:
    geo = ScanGeometry(center_A=(13.0, -7.0), fov_A=(25.6, 25.6), shape_px=(128, 128), rotation_rad=0.3)
    image, truth = render_sample(kind, geo, 2e5, np.random.default_rng(1))
    assert image.shape == (128, 128) and image.dtype == np.float32
    assert np.all(np.isfinite(image)) and image.max() > 0
    k = len(truth.positions_A)
    assert k > 20
    assert truth.pixels_rc.shape == (k, 2) and truth.labels.shape == (k,) and truth.species.shape == (k,)
    assert truth.labels.max() < len(truth.class_names)
    # without drift or jitter the pixel positions are the geometry's mapping of the positions
    np.testing.assert_allclose(truth.pixels_rc, geo.sample_to_pixel(truth.positions_A), atol=1e-9)
    assert np.all((truth.pixels_rc >= -0.5) & (truth.pixels_rc <= 127.5))
    # the noisy image scatters around the expected image
    assert abs(float(image.mean()) - float(truth.expected_image.mean())) < 0.05 * float(truth.expected_image.mean()) + 0.05


def test_render_sample_is_reproducible_from_the_generator() -> None:
    geo = ScanGeometry(fov_A=(20.0, 20.0), shape_px=(64, 64))
    a, ta = render_sample("mos2", geo, 1e5, np.random.default_rng(7))
    b, tb = render_sample("mos2", geo, 1e5, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ta.labels, tb.labels)


def test_column_intensity_follows_z_contrast_ordering() -> None:
    zs = [6, 14, 16, 34, 42, 74]
    xy = np.stack([np.arange(len(zs)) * 5.0 - 12.5, np.zeros(len(zs))], axis=1)
    spec = specimen_from_atoms(xy, zs)
    geo = ScanGeometry(fov_A=(32.0, 8.0), shape_px=(80, 320))
    _, truth = render_frame(spec, geo, 1000.0, np.random.default_rng(0), noise=False)
    rc = np.rint(geo.sample_to_pixel(xy)).astype(int)
    peaks = truth.expected_image[rc[:, 0], rc[:, 1]]
    assert np.all(np.diff(peaks) > 0), peaks
    # with n = 1.8 the ratio of isolated peaks follows (Z1/Z2)^1.8
    assert peaks[-1] / peaks[0] == pytest.approx((74 / 6) ** 1.8, rel=0.02)


def test_counts_have_poisson_statistics_at_the_given_dose() -> None:
    geo = ScanGeometry(fov_A=(8.0, 8.0), shape_px=(40, 40))
    spec = specimen_from_atoms(np.array([[0.0, 0.0]]), [42])
    dose = 5e4
    _, truth = render_frame(spec, geo, dose * 0.2 * 0.2, np.random.default_rng(0), noise=False,
                            adf=ADFModel(background=0.01))
    lam = truth.expected_image.astype(np.float64)
    rng = np.random.default_rng(3)
    samples = np.stack([DetectorModel().sample(lam, rng) for _ in range(400)])
    mean, var = samples.mean(axis=0), samples.var(axis=0, ddof=1)
    assert np.mean(mean) == pytest.approx(np.mean(lam), rel=0.01)
    # dispersion index ~ 1 everywhere (Poisson), and read noise / gain change it as predicted
    ratio = var.sum() / mean.sum()
    assert ratio == pytest.approx(1.0, abs=0.03)
    det = DetectorModel(gain=3.0, offset=10.0, read_noise=2.0)
    s2 = np.stack([det.sample(lam, rng) for _ in range(400)])
    assert s2.mean() == pytest.approx(3.0 * lam.mean() + 10.0, rel=0.01)
    assert s2.var(axis=0, ddof=1).mean() == pytest.approx(9.0 * lam.mean() + 4.0, rel=0.05)
    # the beam electrons per pixel are dose x pixel area; background = 1% of them
    assert truth.electrons_per_pixel == pytest.approx(dose * 0.04)
    assert lam.min() == pytest.approx(0.01 * dose * 0.04, rel=0.05)


def _centroids(image: np.ndarray, rc: np.ndarray, half: int = 4) -> np.ndarray:
    out = []
    for r, c in np.rint(rc).astype(int):
        win = image[r - half : r + half + 1, c - half : c + half + 1].astype(np.float64)
        w = np.clip(win - 0.3 * win.max(), 0, None)
        yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
        out.append([r + (w * yy).sum() / w.sum(), c + (w * xx).sum() / w.sum()])
    return np.asarray(out)


def test_drift_ground_truth_matches_the_distortion_seen_in_the_frame() -> None:
    g = np.arange(-30.0, 30.1, 5.0)
    xy = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)
    spec = specimen_from_atoms(xy, np.full(len(xy), 42))
    geo = ScanGeometry(fov_A=(40.0, 40.0), shape_px=(200, 200), dwell_s=1e-5, flyback_s=1e-4)
    drift = DriftModel(velocity_A_per_s=(10.0, -3.0), wobble_amplitude_A=1.0, wobble_period_s=0.5,
                       random_walk_A_per_sqrt_s=0.5, seed=3)
    _, still = render_frame(spec, geo, 100.0, np.random.default_rng(0), noise=False)
    _, moved = render_frame(spec, geo, 100.0, np.random.default_rng(0), noise=False, drift=drift)
    px, py = geo.pixel_size_A
    # atoms seen in both frames, away from the edges
    ok_m = np.all((moved.pixels_rc > 6) & (moved.pixels_rc < 193), axis=1)
    ok_s = np.all((still.pixels_rc > 6) & (still.pixels_rc < 193), axis=1)
    common = np.intersect1d(moved.site_index[ok_m], still.site_index[ok_s])
    assert len(common) > 30
    im = np.searchsorted(moved.site_index, common)
    is_ = np.searchsorted(still.site_index, common)
    seen_m = _centroids(moved.expected_image, moved.pixels_rc[im])
    seen_s = _centroids(still.expected_image, still.pixels_rc[is_])
    apparent_A = (seen_m - seen_s)[:, ::-1] * np.array([px, py])  # (x, y) displacement seen in the image
    truth_A = drift.displacement_A(moved.times_s[im])
    assert np.max(np.abs(truth_A[:, 0])) > 2.0  # the drift is visible (> 10 px)
    np.testing.assert_allclose(apparent_A, truth_A, atol=0.03)
    # and the truth's pixel positions are where the atoms are seen
    np.testing.assert_allclose(seen_m, moved.pixels_rc[im], atol=0.15)
    np.testing.assert_allclose(moved.drift_A[0], drift.displacement_A(0.0), atol=1e-12)


def test_crlb_shrinks_with_dose_as_one_over_sqrt_dose() -> None:
    geo = ScanGeometry(fov_A=(10.0, 10.0), shape_px=(50, 50))
    spec = specimen_from_atoms(np.array([[0.0, 0.0]]), [42])
    _, t1 = render_frame(spec, geo, 100.0, np.random.default_rng(0), noise=False)
    _, t2 = render_frame(spec, geo, 400.0, np.random.default_rng(0), noise=False)
    s1 = cramer_rao_bound_A(t1, 0)
    s2 = cramer_rao_bound_A(t2, 0)
    assert s1[0] == pytest.approx(2 * s2[0], rel=0.02)
    assert 0.001 < s1[0] < 0.5


def test_fast_renderer_places_sub_pixel_positions_exactly() -> None:
    optics, model = ProbeOptics(), ADFModel()
    shape = (64, 64)
    for off in (0.0, 0.25, 0.5, 0.8):
        img = render_fraction(shape, (0.1, 0.1), np.array([[32.0, 32.0 + off]]), np.array([1.0]), np.array([0.05]), optics, model)
        row = img[32].astype(np.float64)
        c = np.arange(64)
        w = np.clip(row - 0.1 * row.max(), 0, None)
        centroid = (w * c).sum() / w.sum()
        assert centroid == pytest.approx(32.0 + off, abs=0.03)


def test_sampled_conditions_render_for_every_specimen() -> None:
    from stemagent.simulators import sample_conditions

    rng = np.random.default_rng(5)
    geo = ScanGeometry(fov_A=(16.0, 16.0), shape_px=(64, 64))
    for kind in SPECIMEN_KINDS:
        kw = sample_conditions(rng, kind)
        dose = kw.pop("dose_e_per_A2")
        image, truth = render_sample(kind, geo, dose, rng, **kw)
        assert np.all(np.isfinite(image)) and len(truth.labels) > 5
        # the expected image is the mean the noisy image scatters around
        resid = (image - truth.expected_image) / np.sqrt(
            truth.detector.gain * np.maximum(truth.expected_image - truth.detector.offset, 0) + truth.detector.read_noise**2 + 1e-6
        )
        assert abs(float(resid.mean())) < 0.1 and 0.7 < float(resid.std()) < 1.3


@pytest.mark.parametrize("pixel_A", [0.1, 0.5])  # 0.5 Å pixels are rendered supersampled
def test_line_jitter_shifts_each_scan_line_by_its_ground_truth_amount(pixel_A: float) -> None:
    spec = specimen_from_atoms(np.array([[0.0, 0.0]]), [74])
    n = 41 if pixel_A == 0.1 else 17
    geo = ScanGeometry(fov_A=(n * pixel_A, n * pixel_A), shape_px=(n, n))
    jitter = np.where(np.arange(n) % 2 == 0, 0.2, -0.15)
    _, still = render_frame(spec, geo, 100.0, np.random.default_rng(0), noise=False)
    _, shaken = render_frame(spec, geo, 100.0, np.random.default_rng(0), noise=False, jitter_A=jitter)
    np.testing.assert_allclose(shaken.jitter_A, jitter)
    c = np.arange(n)
    centre = n // 2
    for r in range(centre - 2, centre + 3):
        a = still.expected_image[r].astype(np.float64)
        b = shaken.expected_image[r].astype(np.float64)
        ca = (a * c).sum() / a.sum()
        cb = (b * c).sum() / b.sum()
        assert cb - ca == pytest.approx(-jitter[r] / pixel_A, abs=0.05 if pixel_A == 0.1 else 0.03)
    # the truth's pixel position of the atom includes its row's jitter
    assert shaken.pixels_rc[0, 1] == pytest.approx(still.pixels_rc[0, 1] - jitter[centre] / pixel_A)
