"""Extraction (peaks + Gaussian ML refinement), resampling and CRLB on synthetic data: exact cases."""

import numpy as np
import pytest
import torch

from stemagent.errors import InputError
from stemagent.segmentation.crlb import crlb_incoherent, fisher_crlb
from stemagent.segmentation.extract import _wing_regression, aperture_counts, detector_response, find_peaks, refine_gaussians
from stemagent.segmentation.resample import model_shape, pad_to_multiple, resize, scale_rc


def _gaussians(shape, rc, amp, sigma, background=0.0):
    r, c = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = np.full(shape, background, dtype=np.float64)
    for (y, x), a in zip(rc, amp):
        img += a * np.exp(-((r - y) ** 2 + (c - x) ** 2) / (2 * sigma**2))
    return img


def test_refinement_exact_on_isolated_gaussians():
    rng = np.random.default_rng(0)
    gy, gx = np.meshgrid(np.arange(14, 90, 24.0), np.arange(14, 90, 24.0))
    truth = np.stack([gy.ravel(), gx.ravel()], 1) + rng.uniform(-0.5, 0.5, (gy.size, 2))
    amp = rng.uniform(5, 50, len(truth))
    img = _gaussians((100, 100), truth, amp, 2.3, background=0.7)
    start = torch.as_tensor(truth + rng.uniform(-0.7, 0.7, truth.shape), dtype=torch.float32)
    fit = refine_gaussians(torch.as_tensor(img, dtype=torch.float32)[None], torch.zeros(len(truth), dtype=torch.long), start, 2.0, iterations=10)
    assert fit.ok.all()
    assert np.abs(fit.rc.numpy() - truth).max() < 2e-3  # px
    assert np.allclose(fit.amplitude.numpy(), amp, rtol=2e-3)
    assert np.allclose(fit.width_px.numpy(), 2.3, rtol=2e-3)
    assert np.allclose(fit.background.numpy(), 0.7, atol=5e-3)
    assert (fit.sigma_rc.numpy() > 0).all()


def test_refinement_models_neighbours_and_batches():
    # two overlapping spots in one image, an isolated one in a second image of the batch
    truth0 = np.array([[30.2, 30.6], [30.9, 40.1]])  # 9.5 px apart, sigma 2.2
    truth1 = np.array([[20.4, 50.3]])
    imgs = np.stack([_gaussians((64, 64), truth0, [20, 40], 2.2), _gaussians((64, 64), truth1, [30], 2.2)])
    rc0 = torch.as_tensor(np.concatenate([truth0, truth1]) + 0.4, dtype=torch.float32)
    fit = refine_gaussians(torch.as_tensor(imgs, dtype=torch.float32), torch.tensor([0, 0, 1]), rc0, 2.2, iterations=12)
    assert np.abs(fit.rc.numpy() - np.concatenate([truth0, truth1])).max() < 0.02


def test_refinement_rejects_empty_sites_and_masked_atoms():
    img = _gaussians((40, 40), [[20.0, 20.0]], [10.0], 2.0)
    rc0 = torch.tensor([[20.3, 19.8], [8.0, 8.0]])
    fit = refine_gaussians(torch.as_tensor(img, dtype=torch.float32)[None], torch.zeros(2, dtype=torch.long), rc0, 2.0, iterations=8, fit_mask=torch.tensor([True, False]))
    assert fit.ok.tolist() == [True, False]
    assert torch.equal(fit.rc[1], rc0[1])
    assert abs(float(fit.rc[0, 0]) - 20.0) < 1e-3


def test_find_peaks_positions_and_classes():
    h = w = 32
    logits = torch.full((1, 4, h, w), -5.0)
    logits[:, 0] = 5.0
    for (r, c), k in [((5, 7), 1), ((20, 12), 3), ((25, 25), 2)]:
        rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blob = 12.0 * torch.exp(-((rr - r) ** 2 + (cc - c) ** 2) / 2.0)
        logits[0, k] = torch.maximum(logits[0, k], blob)
    peaks = find_peaks(logits, threshold=0.5, min_separation_px=2)
    got = sorted(zip(peaks.rc.round().long().tolist(), peaks.classes.tolist()))
    assert got == [([5, 7], 0), ([20, 12], 2), ([25, 25], 1)]
    assert ((peaks.confidence > 0.5) & (peaks.confidence <= 1.0)).all()
    assert len(find_peaks(logits, threshold=0.5, min_separation_px=2, valid_shape=(16, 16))) == 1


@pytest.mark.parametrize("scale", [0.5, 0.37, 2.0])
def test_resampling_maps_positions_back(scale):
    truth = np.array([[40.3, 61.7], [90.55, 30.2], [64.0, 100.4]])
    img = _gaussians((128, 128), truth, [1, 1, 1], 4.0)
    out_shape = (int(round(128 * scale)), int(round(128 * scale)))
    small = resize(torch.as_tensor(img, dtype=torch.float32)[None, None], out_shape)[0, 0].numpy()
    # locate each spot on the resampled grid (log-parabola on the 3x3 peak) and map back
    found = []
    for y, x in scale_rc(torch.as_tensor(truth), (128, 128), out_shape).numpy():
        r, c = int(round(y)), int(round(x))
        lg = np.log(np.maximum(small[r - 1 : r + 2, c - 1 : c + 2], 1e-12))
        dr = 0.5 * (lg[0, 1] - lg[2, 1]) / (lg[0, 1] - 2 * lg[1, 1] + lg[2, 1])
        dc = 0.5 * (lg[1, 0] - lg[1, 2]) / (lg[1, 0] - 2 * lg[1, 1] + lg[1, 2])
        found.append([r + dr, c + dc])
    back = scale_rc(torch.as_tensor(np.asarray(found)), out_shape, (128, 128)).numpy()
    assert np.abs(back - truth).max() < 0.1  # input pixels


def test_model_shape_and_padding():
    assert model_shape((512, 512), (0.1, 0.1), 0.2) == (256, 256)
    assert model_shape((300, 200), (0.1, 0.15), 0.2) == (225, 100)  # pixel_A is (x, y)
    x = torch.zeros(1, 1, 150, 150)
    assert pad_to_multiple(x, 4).shape[-2:] == (152, 152)
    with pytest.raises(InputError, match="pixel_size_A"):
        model_shape((64, 64), (float("nan"), 0.1), 0.2)


def test_crlb_of_a_gaussian_spot_is_sigma_over_sqrt_counts():
    sigma, counts = 3.0, 400.0
    spacing = 0.25
    k = np.arange(-40, 40.25, spacing)
    kr, kc = np.meshgrid(k, k, indexing="ij")
    psf = np.exp(-(kr**2 + kc**2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)  # unit total per pixel grid
    truth = np.array([[50.3, 49.6]])
    expected = counts * _gaussians((100, 100), truth, [1.0 / (2 * np.pi * sigma**2)], sigma) + 1e-9
    bound = crlb_incoherent(expected, truth, np.array([counts]), psf, spacing, radius_px=30)
    assert np.allclose(bound, sigma / np.sqrt(counts), rtol=0.02)
    # background adds variance and loosens the bound
    looser = crlb_incoherent(expected + 1.0, truth, np.array([counts]), psf, spacing, radius_px=30)
    assert (looser > bound).all()


def test_crlb_bad_shapes():
    with pytest.raises(InputError, match="dmu.shape"):
        fisher_crlb(np.zeros((3, 2)), np.ones((3, 2)))
    with pytest.raises(InputError, match="scale.shape"):
        crlb_incoherent(np.ones((10, 10)), np.zeros((2, 2)), np.ones(3), np.ones((5, 5)), 1.0)


def test_match_counts_per_class_and_border():
    from stemagent.segmentation.metrics import match

    true_xy = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [6.0, 0.0]])
    true_cls = np.array([0, 0, 1, 1])
    pred_xy = np.array([[0.1, 0.0], [2.0, 0.3], [4.2, 0.1], [9.0, 9.0]])
    pred_cls = np.array([0, 1, 1, 0])  # one misclassified, one spurious, one missed
    m = match(pred_xy, pred_cls, true_xy, true_cls, radius_A=0.5)
    assert (m.tp[0], m.fp[0], m.fn[0]) == (1, 1, 1)
    assert (m.tp[1], m.fp[1], m.fn[1]) == (1, 1, 1)
    # an atom just inside the border whose detection lies just outside is not an error
    m2 = match(np.array([[0.3, 0.0]]), np.array([0]), np.array([[0.0, 0.0]]), np.array([0]), count_pred=np.array([False]), count_true=np.array([True]))
    assert (m2.tp[0], m2.fp[0], m2.fn[0]) == (1, 0, 0)


def test_aperture_counts_split_a_noiseless_image_into_site_and_neighbours():
    # two images, close neighbours, a constant background and an empty site: the counts in
    # each disk are exactly the neighbours' share plus the site's own intensity times its psf
    h = w = 64
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    rc = torch.tensor([[20.3, 20.7], [20.2, 24.9], [40.0, 40.0], [30.6, 12.4]])
    amp = torch.tensor([10.0, 30.0, 5.0, 0.0])
    batch = torch.tensor([0, 0, 1, 1])
    width = 1.6
    img = torch.full((2, h, w), 2.0)
    for i in range(4):
        img[batch[i]] += amp[i] * torch.exp(-0.5 * ((yy - rc[i, 0]) ** 2 + (xx - rc[i, 1]) ** 2) / width**2)
    fit = refine_gaussians(img, batch, rc + 0.2, width, iterations=10, fit_mask=amp > 0)
    assert fit.ok.tolist() == [True, True, True, False]
    ap = aperture_counts(img, batch, fit.rc, fit, width, 3.0)
    # back from electrons to detector counts with the gain and offset it read from the residuals
    g, o = ap.gain[batch][:, None, None], ap.offset[batch][:, None, None]
    counts, others = ap.counts * g + o * ap.mask, ap.others * g + o * ap.mask
    intensity = amp * 2 * np.pi * width**2  # integrated counts of each site
    model = others + intensity[:, None, None] * ap.psf
    # (the model of a neighbour ends 3.5 widths out: its tail beyond is 0.1 % of its peak)
    assert torch.allclose(model, counts, rtol=1e-2, atol=0.05)
    assert float((model - counts).abs().sum()) < 5e-3 * float(counts.sum())
    # the empty site's counts are all background; the close pair sees each other's tails
    assert float(others[3].sum()) == pytest.approx(float(counts[3].sum()), rel=1e-3)
    assert float(others[0].sum()) > float(2.0 * ap.mask[0].sum()) + 1.0
    # the disk: the pixels within 3 px of each site (about pi 3^2), all inside the frame
    assert torch.all((ap.mask.sum(dim=(1, 2)) >= 25) & (ap.mask.sum(dim=(1, 2)) <= 33))


def test_aperture_counts_of_no_sites():
    img = torch.ones(1, 16, 16)
    fit = refine_gaussians(img, torch.zeros(0, dtype=torch.long), torch.zeros(0, 2), 1.5)
    ap = aperture_counts(img, torch.zeros(0, dtype=torch.long), torch.zeros(0, 2), fit, 1.5, 2.0)
    assert ap.counts.shape == (0, 5, 5)


@pytest.mark.parametrize(("gain", "offset", "read"), [(1.0, 0.0, 0.0), (2.5, 20.0, 0.5), (0.6, 5.0, 0.2)])
def test_detector_response_reads_gain_and_offset_from_the_noise(gain, offset, read):
    # counts = offset + gain x Poisson(electrons) + read noise, around a known mean image
    rng = np.random.default_rng(7)
    h = w = 96
    yy, xx = np.mgrid[0:h, 0:w]
    electrons = 0.5 + sum(40.0 * np.exp(-0.5 * ((yy - r) ** 2 + (xx - c) ** 2) / 1.6**2) for r in range(8, h, 7) for c in range(8, w, 7))
    counts = offset + gain * rng.poisson(electrons) + rng.normal(0.0, read, (h, w))
    g, o = detector_response(torch.tensor(counts[None], dtype=torch.float32), torch.tensor((offset + gain * electrons)[None], dtype=torch.float32), 4)
    assert float(g[0]) == pytest.approx(gain, rel=0.05)
    # the offset it reads is the one that makes (counts - offset) / gain Poisson to two moments:
    # read noise shows as read^2 / gain less offset
    assert float(o[0]) == pytest.approx(offset - read**2 / gain, abs=0.05 * gain + 0.05)


def test_wing_regression_splits_vacuum_from_the_atoms_wings():
    # two images: the fitted local backgrounds grow with the atom intensity around each atom
    # (0.3 + 0.12 x density); the second has too few fitted atoms and keeps the fallback
    rng = np.random.default_rng(3)
    density = torch.tensor(rng.uniform(1.0, 3.0, 60), dtype=torch.float32)
    background = 0.3 + 0.12 * density + torch.tensor(rng.normal(0, 0.005, 60), dtype=torch.float32)
    use = torch.zeros(2, 60, dtype=torch.bool)
    use[0, :50] = True
    use[1, 50:] = True  # 10 atoms
    vacuum, share = _wing_regression(background, density, use, torch.tensor([-1.0, 0.7]))
    assert float(share[0]) == pytest.approx(0.12, abs=0.01)
    assert float(vacuum[0]) == pytest.approx(0.3, abs=0.02)
    assert float(share[1]) == 0.0
    assert float(vacuum[1]) == pytest.approx(0.7)


def _lattice(rng, spacing=7.1, width=1.75, amp=40.0, background=1.0, shape=(56, 56)):
    """Columns as dense as graphene's at 0.2 Å/px (sigma 1.75 px, 7.1 px apart), sub-pixel centres."""
    rows = [(6.0 + i * spacing * 0.866, 6.0 + j * spacing + (spacing / 2 if i % 2 else 0.0)) for i in range(6) for j in range(6)]
    truth = np.array(rows) + rng.uniform(-0.5, 0.5, (len(rows), 2))
    truth = truth[(truth[:, 0] < shape[0] - 4) & (truth[:, 1] < shape[1] - 4)]
    return truth, _gaussians(shape, truth, np.full(len(truth), amp), width, background)


def test_a_small_fit_window_still_models_the_neighbours_whole_tails():
    # a fit window of 4 px (2.3 widths) in a dense lattice: every atom's image still enters its
    # neighbours' model over 3.5 widths, so a noiseless lattice is fitted to ~1e-3 px (with the
    # tails cut at the fit window, model_radius_px=4, errors are up to 0.09 px)
    rng = np.random.default_rng(11)
    truth, img = _lattice(rng)
    start = torch.as_tensor(truth + rng.uniform(-0.4, 0.4, truth.shape), dtype=torch.float32)
    batch = torch.zeros(len(truth), dtype=torch.long)
    fit = refine_gaussians(torch.as_tensor(img, dtype=torch.float32)[None], batch, start, 1.75, iterations=8, radius_px=4)
    assert fit.ok.all()
    assert np.abs(fit.rc.numpy() - truth).max() < 0.01


def test_a_small_fit_window_is_about_as_precise_as_the_wide_one_on_poisson_counts():
    # seeded Poisson counts of known sub-pixel centres; three Fisher steps from 0.4 px off, as the
    # segmenter runs them: 0.12 px at most, and the small window's RMSE within 10 % of the
    # 3.5-width window's (the segmenter's; the small one was 1.8x faster but lost precision on
    # twin frames at 1e6 e/Å²: BENCHMARKS.md, 2026-12-02)
    err = {4: [], None: []}
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        truth, img = _lattice(rng)
        counts = torch.as_tensor(rng.poisson(img), dtype=torch.float32)[None]
        start = torch.as_tensor(truth + rng.uniform(-0.4, 0.4, truth.shape), dtype=torch.float32)
        for rad in err:
            fit = refine_gaussians(counts, torch.zeros(len(truth), dtype=torch.long), start, 1.75, iterations=3, radius_px=rad, prior_sigma_px=0.5)
            assert fit.ok.all()
            err[rad].append(fit.rc.numpy() - truth)
    rmse = {rad: float(np.sqrt(np.mean(np.concatenate(e) ** 2))) for rad, e in err.items()}
    assert rmse[4] < 0.12  # px; the start is 0.23 px off (rms per axis)
    assert rmse[4] < 1.1 * rmse[None]
