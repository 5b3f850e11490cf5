"""Cramér-Rao lower bound on the position of atomic columns in a counting-noise image.

For an image whose pixels are independent with mean ``mu_p(theta)`` and variance ``v_p``
(Poisson counting: ``v_p = mu_p``), the Fisher information on a column's position
``theta = (row, col)`` is

    F = sum_p  (d mu_p / d theta) (d mu_p / d theta)^T / v_p

and no unbiased estimator does better than ``cov >= F^-1``: the 1-sigma bounds are
``sqrt(diag(F^-1))``. The other columns are taken as known (they enter only through ``mu``),
which is the bound the issue asks precision to be reported against.

:func:`fisher_crlb` works from explicit derivatives; :func:`crlb_incoherent` builds them for an
incoherent linear image (ADF): column ``j`` adds ``scale_j * psf(r - r_j)`` to the expected image,
so ``d mu / d r_j = -scale_j * grad psf(r - r_j)``. It is vectorised over columns.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from stemagent.errors import InputError


def window_pixels(centers_rc: np.ndarray, shape: tuple[int, int], radius_px: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel rows, cols ``(N, S, S)`` of the square window around each rounded centre, and the in-image mask."""
    offs = np.arange(-radius_px, radius_px + 1)
    base = np.rint(centers_rc).astype(np.int64)
    pr = base[:, 0, None, None] + offs[None, :, None] + 0 * offs[None, None, :]
    pc = base[:, 1, None, None] + 0 * offs[None, :, None] + offs[None, None, :]
    inside = (pr >= 0) & (pr < shape[0]) & (pc >= 0) & (pc < shape[1])
    return pr, pc, inside


def sample_centered(array: np.ndarray, spacing_px: float, centers_rc: np.ndarray, pr: np.ndarray, pc: np.ndarray) -> np.ndarray:
    """A centred image (e.g. the PSF, sampled every ``spacing_px`` frame pixels) placed at each
    fractional centre and read at window pixels ``(N, S, S)`` (cubic interpolation, 0 outside)."""
    half = (np.asarray(array.shape) - 1) / 2.0
    ar = (pr - centers_rc[:, 0, None, None]) / spacing_px + half[0]
    ac = (pc - centers_rc[:, 1, None, None]) / spacing_px + half[1]
    vals = ndimage.map_coordinates(array, np.stack([ar.reshape(-1), ac.reshape(-1)]), order=3, mode="constant")
    return vals.reshape(pr.shape)


def fisher_crlb(dmu: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """Bounds ``(N, K)`` from derivatives ``dmu`` ``(N, K, P)`` and pixel variances ``(N, P)``."""
    dmu = np.asarray(dmu, dtype=np.float64)
    var = np.maximum(np.asarray(variance, dtype=np.float64), 1e-300)
    if dmu.ndim != 3 or var.shape != (dmu.shape[0], dmu.shape[2]):
        raise InputError("dmu.shape", dmu.shape, f"must be (N, K, P) matching variance {var.shape}")
    fisher = np.einsum("nkp,nlp->nkl", dmu / var[:, None, :], dmu)
    cov = np.linalg.inv(fisher)
    return np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0.0, None))


def crlb_incoherent(
    expected: np.ndarray,
    centers_rc: np.ndarray,
    scale: np.ndarray,
    psf: np.ndarray,
    psf_spacing_px: float,
    *,
    radius_px: int | None = None,
    variance: np.ndarray | None = None,
) -> np.ndarray:
    """1-sigma CRLB ``(N, 2)`` on (row, col) in pixels for columns at ``centers_rc`` ``(N, 2)``.

    ``expected``: ``(H, W)`` noiseless mean image (counts) with *all* columns and background.
    ``scale``: ``(N,)`` each column's weight (e.g. electrons per pixel x cross-section);
    ``psf``: image of a unit column, centred in the array (odd or even size), sampled every
    ``psf_spacing_px`` frame pixels, in the units that make ``scale * psf`` counts at a pixel.
    ``radius_px``: half-size of the window summed over (default: the PSF's half-extent).
    ``variance``: ``(H, W)`` pixel variance (default ``expected``, Poisson).
    """
    mu = np.asarray(expected, dtype=np.float64)
    if mu.ndim != 2:
        raise InputError("expected.shape", mu.shape, "must be 2-D (rows, cols)")
    var = mu if variance is None else np.asarray(variance, dtype=np.float64)
    var = np.maximum(var, 1e-6 * max(float(np.mean(np.abs(var))), 1e-300))
    rc = np.asarray(centers_rc, dtype=np.float64).reshape(-1, 2)
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    if len(s) != len(rc):
        raise InputError("scale.shape", s.shape, f"must be ({len(rc)},), one per column")
    if not psf_spacing_px > 0:
        raise InputError("psf_spacing_px", psf_spacing_px, "must be positive")
    p = np.asarray(psf, dtype=np.float64)
    g_r, g_c = np.gradient(p, psf_spacing_px)  # d psf / d (row, col) per frame pixel
    half = (np.asarray(p.shape) - 1) / 2.0
    rad = int(radius_px if radius_px is not None else np.floor(min(half) * psf_spacing_px))
    h, w = mu.shape
    pr, pc, inside = window_pixels(rc, (h, w), rad)
    dr = sample_centered(g_r, psf_spacing_px, rc, pr, pc)
    dc = sample_centered(g_c, psf_spacing_px, rc, pr, pc)
    # moving the column by +d shifts its image: d mu / d r_j = -scale * d psf / d (pixel - r_j)
    dmu = -s[:, None, None, None] * np.stack([dr, dc], axis=1)  # (N, 2, S, S)
    dmu = dmu * inside[:, None]
    v = var[np.clip(pr, 0, h - 1), np.clip(pc, 0, w - 1)]
    v = np.where(inside, v, np.inf)
    n = len(rc)
    return fisher_crlb(dmu.reshape(n, 2, -1), v.reshape(n, -1))
