"""Classical atom finder: Laplacian of Gaussian, local maxima, sub-pixel refinement.

This is the foundation's honest baseline. It assumes bright atoms on a dark background
(ADF contrast) of roughly known width, and returns every local maximum of the scale-normalised
LoG response above a threshold, refined to sub-pixel precision.

Refinement ``"gaussian"`` fits a parabola to the logarithm of the Gaussian-smoothed image
through the 3x3 neighbourhood of each peak. The logarithm of a Gaussian is a quadratic and a
Gaussian smoothed by a Gaussian is again a Gaussian, so the estimate is exact for an isolated
Gaussian atom on a zero background; it is vectorised over all peaks (no per-atom fit loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from stemagent.errors import InputError
from stemagent.types import Atoms, Frame

_TINY = 1e-12
REFERENCE_PERCENTILE = 99.5


def check_image(image: np.ndarray, field: str = "frame.image") -> np.ndarray:
    """Return ``image`` as float64 2-D, or raise :class:`InputError` naming what is wrong."""
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise InputError(f"{field}.shape", arr.shape, "must be 2-D (rows, cols)")
    if arr.shape[0] < 3 or arr.shape[1] < 3:
        raise InputError(f"{field}.shape", arr.shape, "must be at least 3x3 pixels")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{field}.dtype", str(arr.dtype), "must be a real number type")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(f"{field}[{r},{c}]", arr[r, c], f"is not finite ({int(bad.sum())} such pixels)")
    return arr


def log_parabola_offsets(smooth: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel offsets ``(d_row, d_col)`` of peaks at integer ``(rows, cols)`` of a positive image.

    Three-point parabola through ``log(smooth)`` along each axis; offsets are clipped to ±0.5 px.
    """
    h, w = smooth.shape
    r = np.clip(rows, 1, h - 2)
    c = np.clip(cols, 1, w - 2)
    floor = max(float(smooth.max()) * 1e-9, _TINY)
    lg = np.log(np.maximum(smooth, floor))
    centre = lg[r, c]
    up, down = lg[r - 1, c], lg[r + 1, c]
    left, right = lg[r, c - 1], lg[r, c + 1]
    denom_r = up - 2 * centre + down
    denom_c = left - 2 * centre + right
    with np.errstate(divide="ignore", invalid="ignore"):
        dr = np.where(denom_r < -_TINY, 0.5 * (up - down) / denom_r, 0.0)
        dc = np.where(denom_c < -_TINY, 0.5 * (left - right) / denom_c, 0.0)
    # peaks on the border were not moved by the clip; leave them unrefined
    dr = np.where(r == rows, dr, 0.0)
    dc = np.where(c == cols, dc, 0.0)
    return np.clip(dr, -0.5, 0.5), np.clip(dc, -0.5, 0.5)


def centroid_offsets(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, radius_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Intensity-weighted centroid offsets in a ``(2 radius + 1)^2`` window around each peak."""
    h, w = image.shape
    pad = np.pad(image - image.min(), radius_px, mode="constant")
    offs = np.arange(-radius_px, radius_px + 1)
    rr = rows[:, None, None] + radius_px + offs[None, :, None]
    cc = cols[:, None, None] + radius_px + offs[None, None, :]
    win = pad[rr, cc]
    total = win.sum(axis=(1, 2)) + _TINY
    dr = (win * offs[None, :, None]).sum(axis=(1, 2)) / total
    dc = (win * offs[None, None, :]).sum(axis=(1, 2)) / total
    return dr, dc


def suppress_close(points: np.ndarray, strength: np.ndarray, min_distance: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the points kept, strongest first, such that no
    two kept points are closer than ``min_distance`` (same units as ``points``)."""
    n = len(points)
    if n < 2 or min_distance <= 0:
        return np.arange(n)
    order = np.argsort(-strength, kind="stable")
    pairs = cKDTree(points).query_pairs(min_distance, output_type="ndarray")
    if len(pairs) == 0:
        return np.sort(order)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    # orient every pair as (stronger, weaker); a point is dropped if a kept stronger one is near
    a, b = pairs[:, 0], pairs[:, 1]
    swap = rank[a] > rank[b]
    stronger = np.where(swap, b, a)
    weaker = np.where(swap, a, b)
    by_weak = np.argsort(rank[weaker], kind="stable")
    stronger, weaker = stronger[by_weak], weaker[by_weak]
    starts = np.searchsorted(rank[weaker], np.arange(n), side="left")
    ends = np.searchsorted(rank[weaker], np.arange(n), side="right")
    kept = np.zeros(n, dtype=bool)
    for r, i in enumerate(order):  # in order of strength
        nb = stronger[starts[r] : ends[r]]
        kept[i] = not kept[nb].any()
    return np.flatnonzero(kept)


#: a LoG response whose range is below this share of the image's largest value has no contrast
_FLAT_RESPONSE = 1e-5


@dataclass
class LoGFinder:
    """Laplacian-of-Gaussian atom finder. Parameters are physical (Å); pixels are derived per frame."""

    sigma_A: float = 0.45
    threshold: float = 0.1  # fraction of the 99.5th percentile of the LoG response
    min_separation_A: float = 1.0
    refine: str = "gaussian"
    class_names: tuple[str, ...] = ("atom",)

    def __post_init__(self) -> None:
        if self.refine not in ("none", "centroid", "gaussian"):
            raise InputError("refine", self.refine, "must be 'none', 'centroid' or 'gaussian'")
        if not self.sigma_A > 0:
            raise InputError("sigma_A", self.sigma_A, "must be positive")

    def find_pixels(self, image: np.ndarray, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
        """Peaks of one image: ``(N, 2)`` fractional (row, col) and ``(N,)`` LoG responses."""
        img = check_image(image)
        sigma_px = self.sigma_A / pixel_size_A
        response = -ndimage.gaussian_laplace(img, sigma=sigma_px, mode="nearest") * sigma_px**2
        # candidates: 3x3 local maxima above the threshold; then non-maximum suppression among
        # the candidates themselves. (A wide maximum filter would let a bright atom's shoulder
        # hide a dim neighbour that is farther away than min_separation_A.)
        local_max = ndimage.maximum_filter(response, size=3, mode="nearest") == response
        # the reference level is a high percentile, not the maximum: a few bright dopants (Si in
        # graphene is ~4.6x brighter than C) must not lift the threshold above the host atoms
        top = float(np.percentile(response, REFERENCE_PERCENTILE))
        if top <= 0:
            top = float(response.max())
        # a flat field (a blanked beam, a detector's offset) has a flat response (the discrete
        # kernel's small non-zero sum times the level): every pixel ties as a maximum, and a 96 px
        # frame of constant 3 counts gave 336 atoms before this check
        if float(np.ptp(response)) <= _FLAT_RESPONSE * max(float(np.abs(img).max()), _TINY):
            return np.zeros((0, 2)), np.zeros(0)
        rows, cols = np.nonzero(local_max & (response > self.threshold * top))
        keep = suppress_close(np.stack([rows, cols], axis=1), response[rows, cols], self.min_separation_A / pixel_size_A)
        rows, cols = rows[keep], cols[keep]
        strength = response[rows, cols]
        if self.refine == "gaussian":
            smooth = ndimage.gaussian_filter(img - min(0.0, float(img.min())), sigma=max(0.5, 0.5 * sigma_px), mode="nearest")
            dr, dc = log_parabola_offsets(smooth, rows, cols)
        elif self.refine == "centroid":
            dr, dc = centroid_offsets(img, rows, cols, max(1, int(round(sigma_px))))
        else:
            dr = dc = np.zeros(len(rows))
        rc = np.stack([rows + dr, cols + dc], axis=1)
        return rc, strength

    def find(self, frame: Frame) -> Atoms:
        geom = frame.geometry
        px = float(np.mean(geom.pixel_size_A))
        rc, strength = self.find_pixels(frame.image, px)
        positions = geom.pixel_to_sample(rc) if len(rc) else np.zeros((0, 2))
        if len(strength):
            scale = float(np.percentile(strength, 90)) + _TINY
            confidence = np.clip(strength / scale, 0.0, 1.0)
            # Poisson-limited width of a Gaussian spot: sigma / sqrt(counts in the spot)
            peak = np.asarray(frame.image, dtype=np.float64)[
                np.clip(np.rint(rc[:, 0]).astype(int), 0, geom.shape_px[0] - 1),
                np.clip(np.rint(rc[:, 1]).astype(int), 0, geom.shape_px[1] - 1),
            ]
            counts = np.maximum(peak * 2 * np.pi * (self.sigma_A / px) ** 2, 1.0)
            uncertainty = self.sigma_A / np.sqrt(counts)
            times = frame.time_at_pixel(rc)
        else:
            confidence = uncertainty = times = np.zeros(0)
        return Atoms(
            positions_A=positions,
            classes=np.zeros(len(rc), dtype=np.int64),
            confidence=confidence,
            frame_index=frame.index,
            class_names=self.class_names,
            uncertainty_A=uncertainty,
            times_s=times,
        )
