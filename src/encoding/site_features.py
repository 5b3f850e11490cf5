"""Per-site features from the atom list and the frame, next to the Zernike magnitudes.

A Zernike patch sees its neighbours only as a few counts each: at 1e4 e/Å² on a HAADF detector a
graphene C scatters ~8 electrons, so a missing neighbour is lost in the noise of one patch. The
atom list knows it exactly. Three blocks, each optional (``EncodingConfig.site_features``):

- ``coordination`` ``(N, 1)``: the number of neighbours within the first shell, a soft count
  (weight 1 up to ``inner`` x the nearest-neighbour distance, falling linearly to 0 at
  ``outer`` x; 1.3 and 1.55 by default, wide enough for the U-Net's position scatter, whose
  median nearest-neighbour distance also reads ~6 % short, and short of the second shell at
  1.73): 3 for a graphene C or a TMD column inside the lattice, 2 beside a vacancy the atom
  list lacks. Rotation invariant, free of photon noise when the positions are right.
- ``intensity`` ``(N, 1)``: the site's own signal, a Gaussian-weighted mean of the frame around
  the (sub-pixel) atom position (sigma ``sigma_factor`` x the nearest-neighbour distance), divided
  by the frame's mean over all sites: a Si in graphene is ~4, a TMD chalcogen column with one atom
  missing about half its host's value. Dose, dwell and gain cancel.
- ``neighbour_intensity`` ``(N, 3)``: the min, mean and max of the first-shell neighbours'
  ``intensity`` (weighted by the soft count for the mean; 0 for an atom with none): what makes a
  site dopant-adjacent or vacancy-adjacent when its own signal is ordinary.

:func:`site_features` computes all three; :meth:`SiteFeatures.matrix` stacks the chosen blocks,
each multiplied by its weight, to be appended to the Zernike magnitudes before the clustering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from stemagent.errors import InputError

SITE_BLOCKS = ("coordination", "intensity", "neighbour_intensity")
LOG_FLOOR = 0.05  # the log transform's offset, in units of the frame's mean site
WINDOW_SIGMAS = 2.5  # the site intensity's window: +- this many sigma (the weight at its edge is 4 %)


@dataclass
class SiteFeatures:
    """``coordination`` ``(N,)`` soft neighbour count; ``intensity`` ``(N,)`` in units of the frame's
    mean site intensity; ``neighbour_intensity`` ``(N, 3)`` min / mean / max of the neighbours'
    intensity; ``scale`` the frame's mean raw site intensity (counts per pixel)."""

    coordination: np.ndarray
    intensity: np.ndarray
    neighbour_intensity: np.ndarray
    scale: float
    transform: str = "sqrt"

    def block(self, name: str) -> np.ndarray:
        """One block as an ``(N, width)`` array (see the module docstring); intensities as their
        square roots, which makes their photon noise about the same at every brightness (a vacancy
        at ~0 counts and a host at ~8 are then ~4 noise widths apart, not ~2.5)."""
        if name == "coordination":
            return self.coordination[:, None]
        if name == "intensity":
            return transform_intensity(self.intensity, self.transform)[:, None]
        if name == "neighbour_intensity":
            return transform_intensity(self.neighbour_intensity, self.transform)
        raise InputError("site_features", name, f"must be one of {SITE_BLOCKS}")

    def matrix(self, blocks: Sequence[str], weights: dict[str, float] | None = None) -> np.ndarray:
        """The chosen ``blocks`` side by side ``(N, d)``, each times ``weights[block]`` (default 1)."""
        w = weights or {}
        cols = [self.block(b) * float(w.get(b, 1.0)) for b in blocks]
        return np.concatenate(cols, axis=1) if cols else np.zeros((len(self.coordination), 0))


def transform_intensity(v: np.ndarray, transform: str = "sqrt") -> np.ndarray:
    """Intensities (units of the frame's mean site) as clustered: ``sqrt`` (photon noise about
    equal at every brightness) or ``log`` (``log(v + LOG_FLOOR)``: relative differences equal, which
    stretches the dark end further: an S column with one atom missing, or an empty site)."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0.0, None)
    if transform == "sqrt":
        return np.sqrt(v)
    if transform == "log":
        return np.log(v + LOG_FLOOR)
    raise InputError("intensity_transform", transform, "must be 'sqrt' or 'log'")


def _check_positions(positions: np.ndarray, name: str) -> np.ndarray:
    p = np.asarray(positions, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or len(p) == 0:
        raise InputError(f"{name}.shape", p.shape, "must be a non-empty (N, 2) array")
    if not np.all(np.isfinite(p)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(p), axis=1))[0])
        raise InputError(f"{name}[{bad}]", p[bad].tolist(), "must be finite")
    return p


def soft_coordination(positions_A: np.ndarray, nn_A: float, inner: float = 1.3, outer: float = 1.55
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Soft neighbour count ``(N,)`` of atoms at ``positions_A`` ``(N, 2)`` and the neighbour pairs
    ``(i, j, weight)`` (both directions) it is made of; ``nn_A`` the lattice's nearest-neighbour
    distance, ``inner`` < ``outer`` the shell's edges in units of it."""
    p = _check_positions(positions_A, "atoms.positions_A")
    if not (np.isfinite(nn_A) and nn_A > 0):
        raise InputError("nn_A", nn_A, "must be a positive nearest-neighbour distance")
    if not 0 < inner < outer:
        raise InputError("coordination_shell", (inner, outer), "must satisfy 0 < inner < outer")
    pairs = cKDTree(p).query_pairs(outer * nn_A, output_type="ndarray")
    if len(pairs) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return np.zeros(len(p)), empty, empty, np.zeros(0)
    d = np.linalg.norm(p[pairs[:, 0]] - p[pairs[:, 1]], axis=1) / nn_A
    w = np.clip((outer - d) / (outer - inner), 0.0, 1.0)
    i = np.concatenate([pairs[:, 0], pairs[:, 1]])
    j = np.concatenate([pairs[:, 1], pairs[:, 0]])
    ww = np.concatenate([w, w])
    coord = np.bincount(i, weights=ww, minlength=len(p))
    return coord, i, j, ww


def site_intensities(image: np.ndarray, centres_rc: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian-weighted mean ``(N,)`` of ``image`` around each sub-pixel centre ``(N, 2)`` (row,
    col), window +-``WINDOW_SIGMAS`` sigma; pixels outside the image do not count (a centre must lie
    inside)."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or img.size == 0:
        raise InputError("frame.image.shape", img.shape, "must be a non-empty 2D array")
    c = _check_positions(centres_rc, "atoms.pixels_rc")
    if not (np.isfinite(sigma_px) and sigma_px > 0):
        raise InputError("sigma_px", sigma_px, "must be a positive width")
    h, w = img.shape
    off = np.any((c < -0.5) | (c > np.array([h, w]) - 0.5), axis=1)
    if off.any():
        bad = int(np.flatnonzero(off)[0])
        raise InputError(f"atoms.pixels_rc[{bad}]", c[bad].tolist(), f"must lie inside the {h}x{w} frame")
    half = max(1, int(np.ceil(WINDOW_SIGMAS * sigma_px)))
    k = np.arange(-half, half + 1)
    base = np.clip(np.rint(c).astype(np.int64), 0, np.array([h - 1, w - 1]))
    rows = base[:, 0, None] + k[None, :]  # (N, W)
    cols = base[:, 1, None] + k[None, :]
    gr = np.exp(-0.5 * ((rows - c[:, 0, None]) / sigma_px) ** 2) * ((rows >= 0) & (rows < h))
    gc = np.exp(-0.5 * ((cols - c[:, 1, None]) / sigma_px) ** 2) * ((cols >= 0) & (cols < w))
    padded = np.pad(img, half)  # windows at the border read zeros, which carry no weight
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * half + 1, 2 * half + 1))
    win = windows[base[:, 0], base[:, 1]]  # (N, W, W): the window centred on each atom's nearest pixel
    num = np.einsum("nr,nr->n", gr, np.matmul(win, gc[:, :, None])[:, :, 0])
    den = gr.sum(axis=1) * gc.sum(axis=1)
    return num / den


def site_features(image: np.ndarray, positions_A: np.ndarray, centres_rc: np.ndarray, nn_A: float, pixel_A: float,
                  inner: float = 1.3, outer: float = 1.55, sigma_factor: float = 0.25,
                  in_frame: np.ndarray | None = None, transform: str = "sqrt") -> SiteFeatures:
    """All three blocks (see the module docstring) for atoms at ``positions_A`` ``(N, 2)`` (sample,
    Å) = ``centres_rc`` ``(N, 2)`` (frame pixels). ``in_frame`` ``(N,)``: which atoms lie inside the
    frame (default: those whose centre does); the others count as neighbours but have no intensity
    of their own (their neighbours' statistics skip them) and get NaN intensities."""
    pos = _check_positions(positions_A, "atoms.positions_A")
    c = _check_positions(centres_rc, "atoms.pixels_rc")
    if len(pos) != len(c):
        raise InputError("atoms.pixels_rc.shape", c.shape, f"must match atoms.positions_A {pos.shape}")
    if not (np.isfinite(pixel_A) and pixel_A > 0):
        raise InputError("pixel_A", pixel_A, "must be a positive pixel size")
    if not (np.isfinite(sigma_factor) and sigma_factor > 0):
        raise InputError("site_sigma_factor", sigma_factor, "must be positive")
    h, w = np.asarray(image).shape[:2]
    inside = np.all((c >= 0) & (c <= np.array([h, w]) - 1), axis=1) if in_frame is None else np.asarray(in_frame, dtype=bool)
    coord, i, j, ww = soft_coordination(pos, nn_A, inner, outer)
    raw = np.full(len(pos), np.nan)
    if inside.any():
        raw[inside] = site_intensities(image, c[inside], sigma_factor * nn_A / pixel_A)
    scale = float(np.mean(raw[inside])) if inside.any() else float("nan")
    if not (np.isfinite(scale) and scale > 0):
        scale = 1.0
    inten = raw / scale
    neigh = np.zeros((len(pos), 3))
    keep = (ww > 0) & inside[j]
    if keep.any():
        i, j, ww = i[keep], j[keep], ww[keep]
        v = inten[j]
        n_w = np.bincount(i, weights=ww, minlength=len(pos))
        s_w = np.bincount(i, weights=ww * v, minlength=len(pos))
        has = n_w > 0
        neigh[has, 1] = s_w[has] / n_w[has]
        lo = np.full(len(pos), np.inf)
        hi = np.full(len(pos), -np.inf)
        np.minimum.at(lo, i, v)
        np.maximum.at(hi, i, v)
        neigh[has, 0] = lo[has]
        neigh[has, 2] = hi[has]
    transform_intensity(np.zeros(1), transform)  # names a bad transform before anything is returned
    return SiteFeatures(coordination=coord, intensity=inten, neighbour_intensity=neigh, scale=scale, transform=transform)
