"""Zernike basis and moments: orthonormality after the discretisation correction, rotation
invariance of the magnitudes, the phase of the complex moments, sub-pixel centring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stemagent.encoding.patches import extract_patches
from stemagent.encoding.zernike import (
    ZernikeBasis,
    rotate_moments,
    symmetry_scores,
    zernike_indices,
    zernike_moments,
    zernike_moments_at,
    zernike_polynomial,
)
from stemagent.errors import InputError

P, R = 32, 15.0


@pytest.fixture(scope="module")
def basis() -> ZernikeBasis:
    return ZernikeBasis(10, P, R)


@pytest.fixture(scope="module")
def gram_basis() -> ZernikeBasis:
    return ZernikeBasis(10, P, R, subpixel_steps=2, correction="gram")


def atoms_image(angle: float, shift=(0.0, 0.0), sigma=1.6, size=P) -> np.ndarray:
    """Analytic test image: a bright centre and three unequal neighbours at 8 px, rotated by
    ``angle`` about the atom, which sits ``shift`` (row, col) px from the patch centre."""
    c = (size - 1) / 2.0
    y = (np.arange(size) - c - shift[0])[:, None]
    x = (np.arange(size) - c - shift[1])[None, :]
    f = 2.0 * np.exp(-(x**2 + y**2) / (2 * sigma**2))
    for k, amp in enumerate((1.0, 1.5, 0.7)):
        a = angle + 0.3 + k * 2 * math.pi / 3 + (0.2 if k == 2 else 0.0)
        f += amp * np.exp(-((x - 8 * math.cos(a)) ** 2 + (y - 8 * math.sin(a)) ** 2) / (2 * sigma**2))
    return f


def test_indices_count_and_order() -> None:
    n, m = zernike_indices(10)
    assert len(n) == 36 and np.all(np.diff(n) >= 0) and np.all(m >= 0) and np.all((n - m) % 2 == 0)
    ns, ms = zernike_indices(10, signed=True)
    assert len(ns) == 66


def test_sampled_basis_needs_the_correction_and_corrected_basis_is_orthonormal(basis: ZernikeBasis) -> None:
    k = len(basis.n_signed)
    raw = basis.gram
    assert np.abs(raw - np.eye(k)).max() > 0.05  # the plain sampled functions are not orthonormal
    for dy, dx in ((0.0, 0.0), (0.25, -0.375)):
        w = basis.orthonormal(dy, dx).reshape(k, -1)
        g = (w * basis.mask(dy, dx).reshape(1, -1)) @ w.conj().T
        assert np.abs(g - np.eye(k)).max() < 1e-9


def test_basis_matches_analytic_zernike(basis: ZernikeBasis) -> None:
    c = (P - 1) / 2.0
    x = ((np.arange(P) - c) / R)[None, :].repeat(P, 0)
    y = ((np.arange(P) - c) / R)[:, None].repeat(P, 1)
    v = basis.sampled()
    for j, (n, m) in enumerate(zip(basis.n_signed, basis.m_signed)):
        np.testing.assert_allclose(v[j], zernike_polynomial(int(n), int(m), x, y), atol=1e-9)


def _in_span_image(basis: ZernikeBasis, coeffs: np.ndarray, angle: float) -> np.ndarray:
    c = (P - 1) / 2.0
    x = ((np.arange(P) - c) / R)[None, :].repeat(P, 0)
    y = ((np.arange(P) - c) / R)[:, None].repeat(P, 1)
    f = np.zeros((P, P), dtype=np.complex128)
    for a, n, m in zip(coeffs, basis.n_signed, basis.m_signed):
        f += a * np.exp(-1j * m * angle) * zernike_polynomial(int(n), int(m), x, y)
    return f.real


def test_gram_corrected_moments_are_exact_for_images_in_the_span(gram_basis: ZernikeBasis) -> None:
    rng = np.random.default_rng(1)
    ns, ms = gram_basis.n_signed, gram_basis.m_signed
    a = rng.normal(size=len(ns)) + 1j * rng.normal(size=len(ns))
    for j, (n, m) in enumerate(zip(ns, ms)):  # a real image: a_{n,-m} = conj(a_{n,m})
        if m < 0:
            a[j] = np.conj(a[np.flatnonzero((ns == n) & (ms == -m))[0]])
        elif m == 0:
            a[j] = a[j].real
    angles = np.array([0.0, 0.37, 1.9, 4.4])
    imgs = np.stack([_in_span_image(gram_basis, a, t) for t in angles])
    mom = zernike_moments(torch.as_tensor(imgs), gram_basis).numpy()
    np.testing.assert_allclose(mom[0], a[ms >= 0], atol=1e-9)
    for t, mt in zip(angles, mom):
        np.testing.assert_allclose(mt, a[ms >= 0] * np.exp(-1j * gram_basis.m * t), atol=1e-9)


@pytest.mark.parametrize("angle", [0.21, 1.0, 2.5, 3.9, 5.77])
def test_magnitudes_are_rotation_invariant_on_an_analytic_image(basis: ZernikeBasis, angle: float) -> None:
    imgs = torch.as_tensor(np.stack([atoms_image(0.0), atoms_image(angle)]))
    mom = zernike_moments(imgs, basis).numpy()
    mag = np.abs(mom)
    assert np.abs(mag[1] - mag[0]).max() < 2e-5 * mag[0].max()
    assert mag[0, basis.m == 1].max() > 1e-2 * mag[0].max()  # the test image is not symmetric


@pytest.mark.parametrize("angle", [0.4, 2.2, 5.1])
def test_complex_moments_rotate_by_the_right_phase(basis: ZernikeBasis, angle: float) -> None:
    imgs = torch.as_tensor(np.stack([atoms_image(0.0), atoms_image(angle)]))
    mom = zernike_moments(imgs, basis).numpy()
    expected = rotate_moments(mom[0], basis.m, angle)
    assert np.abs(mom[1] - expected).max() < 3e-5 * np.abs(mom[0]).max()
    wrong = rotate_moments(mom[0], basis.m, -angle)  # the opposite sense is clearly wrong
    assert np.abs(mom[1] - wrong).max() > 1e-2 * np.abs(mom[0]).max()


def test_subpixel_centring_follows_the_atom(basis: ZernikeBasis) -> None:
    shifts = [(0.0, 0.0), (0.25, -0.125), (-0.5, 0.375), (0.125, 0.5)]
    imgs = torch.as_tensor(np.stack([atoms_image(0.9, s) for s in shifts]))
    mom = zernike_moments(imgs, basis, torch.tensor(shifts, dtype=torch.float64)).numpy()
    scale = np.abs(mom[0]).max()
    for k in range(1, len(shifts)):
        assert np.abs(mom[k] - mom[0]).max() < 1e-4 * scale
    # ignoring the offset is visibly wrong
    naive = zernike_moments(imgs, basis).numpy()
    assert np.abs(naive[2] - mom[0]).max() > 1e-2 * scale


def test_moments_from_image_equal_moments_of_extracted_patches(basis: ZernikeBasis) -> None:
    rng = np.random.default_rng(3)
    img = torch.as_tensor(rng.poisson(5.0, size=(96, 128)).astype(np.float32))
    centres = torch.as_tensor(rng.uniform(20, 75, size=(24, 2)), dtype=torch.float32)
    a = zernike_moments_at(img, centres, basis, chunk=5)
    patches, offsets = extract_patches(img, centres, P)
    b = zernike_moments(patches, basis, offsets)
    scale = float(np.abs(b.numpy()).max())
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=5e-5 * scale)
    # the grouped path (used for thousands of patches) gives the same moments
    from stemagent.encoding import zernike

    old = zernike.GROUPED_MIN_PATCHES
    zernike.GROUPED_MIN_PATCHES = 0
    try:
        c = zernike_moments(patches, basis, offsets)
    finally:
        zernike.GROUPED_MIN_PATCHES = old
    np.testing.assert_allclose(c.numpy(), b.numpy(), rtol=0, atol=5e-5 * scale)


def test_float32_agrees_with_float64(basis: ZernikeBasis) -> None:
    imgs = np.stack([atoms_image(t) for t in (0.1, 0.7)])
    m64 = zernike_moments(torch.as_tensor(imgs), basis).numpy()
    m32 = zernike_moments(torch.as_tensor(imgs, dtype=torch.float32), basis).numpy()
    assert np.abs(m32 - m64).max() < 1e-5 * np.abs(m64).max()


def test_symmetry_scores_find_the_fold(basis: ZernikeBasis) -> None:
    c = (P - 1) / 2.0
    y = (np.arange(P) - c)[:, None]
    x = (np.arange(P) - c)[None, :]

    def ring(fold: int) -> np.ndarray:
        f = np.zeros((P, P))
        for k in range(fold):
            a = 0.2 + 2 * math.pi * k / fold
            f += np.exp(-((x - 8 * math.cos(a)) ** 2 + (y - 8 * math.sin(a)) ** 2) / 4.0)
        return f

    mom = zernike_moments(torch.as_tensor(np.stack([ring(3), ring(4), ring(6)])), basis)
    s = symmetry_scores(mom, basis.m, (2, 3, 4, 6)).numpy()
    assert s[0, 1] > 0.999 and s[0, 2] < 0.2  # threefold
    assert s[1, 2] > 0.999 and s[1, 0] > 0.999 and s[1, 1] < 0.2  # fourfold (so also twofold)
    assert s[2, 3] > 0.999 and s[2, 0] > 0.999 and s[2, 1] > 0.999  # sixfold


def test_bad_basis_parameters_name_the_field() -> None:
    with pytest.raises(InputError, match="radius_px"):
        ZernikeBasis(4, 16, 9.0)
    with pytest.raises(InputError, match="n_max"):
        ZernikeBasis(12, 32, 10.0)
    with pytest.raises(InputError, match="correction"):
        ZernikeBasis(4, 16, 6.0, correction="magic")
    with pytest.raises(InputError, match="patches.shape"):
        zernike_moments(torch.zeros(3, 16, 16), ZernikeBasis(4, 20, 6.0))
