"""Fast incoherent ADF image formation (real-time mode).

Each atom scatters a fraction ``sigma_Z * P(r_beam - r_atom)`` of the beam into the annular
detector, where ``P`` is the probe intensity density (1/Å², integrates to one) and
``sigma_Z = sigma_C (Z / 6)^n`` an effective cross-section (Å²). Thermal vibration smears each
atom by a Gaussian of rms ``u`` per direction. The image of a frame is therefore

    I(r, c) = sum_j sigma_j (P * G_uj)(beam(r, c) - r_j)        (fraction of electrons)

Method: atoms are placed at their pixel coordinates *in the frame* (drift and rotation already
applied per atom, see :func:`stemagent.simulators.scan.atom_scan_pixels`), splatted bilinearly
onto a padded grid (supersampled when pixels are coarser than the probe needs), convolved by FFT
with the probe intensity times the thermal Debye-Waller factor, divided by the splat kernel's
transfer function (``sinc^2``) so sub-pixel positions are exact for the band-limited signal,
and sampled at the pixel centres, each line shifted by its jitter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft as sfft

from stemagent.simulators.optics import ProbeOptics


@dataclass(frozen=True)
class ADFModel:
    """Incoherent ADF contrast: ``sigma(Z) = sigma_C_A2 * (Z / 6) ** z_exponent``.

    ``sigma_C_A2``: fraction-of-beam cross-section of one carbon atom into the detector (Å²).
    Multislice calibrations at 60 keV, 30 mrad (benchmarks/bench_multislice.py): a 40-200 mrad
    (MAADF-like) detector gives about 0.003, an 80-180 mrad HAADF about 0.0007-0.0009. The
    default 0.0025 (MAADF-like) is the value the training-data API was published with; it is
    kept so training distributions stay stable.
    ``background``: fraction of the beam reaching the detector everywhere (e.g. amorphous
    contamination). ``max_grid_A``: render grid spacing limit (pixels coarser than this are
    supersampled). ``pad_A``: margin rendered around the field so atoms outside still spill in.
    ``thermal_merge_A``: when the atoms' rms vibrations differ by at most this much, one
    cross-section-weighted mean is used (one FFT instead of one per species; the difference is
    far below the probe size). Set 0 to blur every species with its own ``u``.
    """

    z_exponent: float = 1.8
    sigma_C_A2: float = 0.0025
    #: per-element cross-sections ``((Z, sigma_A2), ...)`` sorted by Z (e.g. from a multislice
    #: calibration for one annular detector, :func:`stemagent.simulators.adf_detector.calibrated_adf`);
    #: when set it replaces the power law: log sigma is interpolated linearly in log Z between the
    #: tabulated elements and extrapolated with the end segments' slopes.
    sigma_table: tuple[tuple[int, float], ...] | None = None
    background: float = 0.0
    max_grid_A: float = 0.2
    pad_A: float = 3.0
    workers: int = 2
    thermal_merge_A: float = 0.03

    def cross_section_A2(self, numbers: np.ndarray) -> np.ndarray:
        z = np.asarray(numbers, dtype=np.float64)
        if self.sigma_table is None:
            return self.sigma_C_A2 * (z / 6.0) ** self.z_exponent
        tz = np.log(np.array([t[0] for t in self.sigma_table], dtype=np.float64))
        ts = np.log(np.array([t[1] for t in self.sigma_table], dtype=np.float64))
        lz = np.log(np.maximum(z, 1.0))
        out = np.interp(lz, tz, ts)
        if len(tz) >= 2:
            lo, hi = lz < tz[0], lz > tz[-1]
            out[lo] = ts[0] + (lz[lo] - tz[0]) * (ts[1] - ts[0]) / (tz[1] - tz[0])
            out[hi] = ts[-1] + (lz[hi] - tz[-1]) * (ts[-1] - ts[-2]) / (tz[-1] - tz[-2])
        return np.exp(out)


def supersampling(pixel_A: tuple[float, float], optics: ProbeOptics, max_grid_A: float) -> int:
    limit = min(max_grid_A, optics.max_grid_spacing_A())
    return max(1, int(math.ceil(max(pixel_A) / limit - 1e-9)))


@lru_cache(maxsize=32)
def _kernel(optics: ProbeOptics, shape: tuple[int, int], spacing: tuple[float, float], u_rms_A: float) -> np.ndarray:
    """rfft-domain kernel: probe intensity x Debye-Waller / (bilinear splat transfer)."""
    ny, nx = shape
    sy, sx = spacing
    spec = optics.intensity_spectrum(shape, spacing)
    ky = np.fft.fftfreq(ny, d=sy)[:, None]
    kx = np.fft.rfftfreq(nx, d=sx)[None, :]
    k2 = kx * kx + ky * ky
    dw = np.exp(-2.0 * np.pi**2 * u_rms_A**2 * k2)
    splat = (np.sinc(ky * sy) ** 2) * (np.sinc(kx * sx) ** 2)
    k = spec * dw / np.maximum(splat, 0.05)
    out = k.astype(np.complex64)
    out.setflags(write=False)
    return out


def render_fraction(
    shape_px: tuple[int, int],
    pixel_A: tuple[float, float],
    atoms_rc: np.ndarray,
    cross_sections_A2: np.ndarray,
    u_rms_A: np.ndarray,
    optics: ProbeOptics,
    model: ADFModel,
    jitter_px: np.ndarray | None = None,
) -> np.ndarray:
    """Noiseless fraction of beam electrons reaching the detector at every pixel, ``(rows, cols)`` float32.

    ``atoms_rc``: ``(N, 2)`` fractional pixel coordinates ``(row, col)`` of the atoms in this
    frame (outside-the-field atoms within ``pad_A`` contribute). ``pixel_A``: ``(x, y)`` pixel
    size. ``jitter_px``: ``(rows,)`` column shift of each line's beam (pixels) or None.
    Pixels are taken to be square in the probe's frame up to the ``(x, y)`` sizes given;
    scan rotation is already in ``atoms_rc`` (the probe is round unless astigmatic).
    """
    rows, cols = shape_px
    px, py = pixel_A
    s = supersampling(pixel_A, optics, model.max_grid_A)
    gx, gy = px / s, py / s
    pad_c = int(math.ceil(model.pad_A / gx)) + 1
    pad_r = int(math.ceil(model.pad_A / gy)) + 1
    nyr = sfft.next_fast_len((rows - 1) * s + 1 + 2 * pad_r, real=True)
    nxr = sfft.next_fast_len((cols - 1) * s + 1 + 2 * pad_c, real=True)
    rc = np.asarray(atoms_rc, dtype=np.float64).reshape(-1, 2)
    fy = rc[:, 0] * s + pad_r
    fx = rc[:, 1] * s + pad_c
    iy = np.floor(fy).astype(np.int64)
    ix = np.floor(fx).astype(np.int64)
    inside = (iy >= 0) & (iy < nyr - 1) & (ix >= 0) & (ix < nxr - 1)
    w = np.asarray(cross_sections_A2, dtype=np.float64)
    u = np.asarray(u_rms_A, dtype=np.float64)
    fy, fx, iy, ix, w, u = fy[inside], fx[inside], iy[inside], ix[inside], w[inside], u[inside]
    ty = fy - iy
    tx = fx - ix
    if len(u) and float(u.max() - u.min()) <= model.thermal_merge_A:
        ug = np.full(len(u), round(float(np.sum(w * u) / max(np.sum(w), 1e-300)), 3))
    else:
        ug = np.round(u, 3)
    total = None
    for uval in np.unique(ug) if len(ug) else np.array([0.0]):
        sel = ug == uval
        base = iy[sel] * nxr + ix[sel]
        a, b = ty[sel], tx[sel]
        ww = w[sel]
        idx = np.concatenate([base, base + 1, base + nxr, base + nxr + 1])
        wt = np.concatenate([ww * (1 - a) * (1 - b), ww * (1 - a) * b, ww * a * (1 - b), ww * a * b])
        grid = np.bincount(idx, weights=wt, minlength=nyr * nxr).reshape(nyr, nxr).astype(np.float32)
        spec = sfft.rfft2(grid, workers=model.workers)
        spec *= _kernel(optics, (nyr, nxr), (gy, gx), float(uval))
        total = spec if total is None else total + spec
    img = sfft.irfft2(total, s=(nyr, nxr), workers=model.workers)
    r_idx = pad_r + s * np.arange(rows)
    c_idx = pad_c + s * np.arange(cols)
    if jitter_px is None or not np.any(jitter_px):
        out = img[r_idx[:, None], c_idx[None, :]] if s > 1 else img[pad_r : pad_r + rows, pad_c : pad_c + cols]
    else:
        # each line is the rendered row read from a shifted start: integer part by a strided
        # window (a contiguous copy per row), fractional part by linear blending
        shift = np.asarray(jitter_px, dtype=np.float64) * s
        start = c_idx[0] + shift
        start = np.clip(start, 0, nxr - 2 - (cols - 1) * s)
        i0 = np.floor(start).astype(np.int64)
        f = (start - i0).astype(np.float32)[:, None]
        width = (cols - 1) * s + 2
        windows = np.lib.stride_tricks.sliding_window_view(img, width, axis=1)  # (nyr, nxr - width + 1, width)
        rows_sel = windows[r_idx, i0]  # (rows, width)
        left = rows_sel[:, 0 : (cols - 1) * s + 1 : s]
        right = rows_sel[:, 1 : (cols - 1) * s + 2 : s]
        out = left * (1 - f) + right * f
    out = np.asarray(out, dtype=np.float32)
    np.maximum(out, 0.0, out=out)
    if model.background:
        out += np.float32(model.background)
    return out


def psf(optics: ProbeOptics, u_rms_A: float, spacing_A: float = 0.05, size_A: float = 12.8) -> np.ndarray:
    """Image of one atom of unit cross-section (probe intensity * thermal Gaussian), centred, 1/Å²."""
    n = int(round(size_A / spacing_A))
    n += n % 2
    k = _kernel(optics, (n, n), (spacing_A, spacing_A), float(u_rms_A)).astype(np.complex128)
    # undo the splat correction: this is the continuous image sampled on the grid
    ky = np.fft.fftfreq(n, d=spacing_A)[:, None]
    kx = np.fft.rfftfreq(n, d=spacing_A)[None, :]
    k = k * np.maximum((np.sinc(ky * spacing_A) ** 2) * (np.sinc(kx * spacing_A) ** 2), 0.05)
    return np.fft.fftshift(np.fft.irfft2(k, s=(n, n)))
