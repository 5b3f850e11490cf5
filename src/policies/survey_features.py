"""Survey candidates and the overview structure features a survey surrogate learns from.

A survey starts from one coarse overview of the field. This module turns it into:

- the **candidate set**: sub-scan centres ``(n, 2)`` (x, y) Å, on a grid covering the allowed
  square (:func:`candidate_grid`) or at the overview's brightest clusters of spots
  (:func:`peak_candidates`);
- per candidate, a few **structure features** (:class:`OverviewFeatures`) from the pixels of the
  overview (when the observation carries them) or, failing that, from the atoms the segmenter
  found in it; and a small **patch** of the overview's spot map per candidate for the deep-kernel
  surrogate.

The spot map is a matched filter: the overview smoothed by a Gaussian of about the probe's size,
minus its local mean, divided by its local noise (a wide RMS with bright peaks clipped, so the
frame's edges, where the filters' mirrored border raises the noise, read like the middle), so it
reads in standard deviations whatever the detector's gain or offset. Heavy atoms (a Si in graphene
scatters ~4.6x a C) show as positive outliers; a low-dose overview shows single dopants only
weakly, clusters of them more clearly.

Pure functions on numpy arrays; positions in the sample frame (Å); no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.cluster.hierarchy import fcluster, linkage

from stemagent.errors import InputError
from stemagent.types import Atoms, ScanGeometry

IMAGE_FEATURES = ("max_z", "excess", "spots", "spot_density")
ATOM_FEATURES = ("target_atoms", "target_density", "atoms", "target_confidence")


@dataclass(frozen=True)
class OverviewFeatures:
    """Features of every candidate.

    ``candidates_A`` ``(n, 2)`` sub-scan centres (x, y) Å; ``values`` ``(n, k)`` features named by
    ``names``; ``patches`` ``(n, p * p)`` flattened spot-map patches (deep kernel input);
    ``spots_A`` ``(m, 2)`` the overview's spots (image features) or target atoms (atom features);
    ``source``: ``"image"`` or ``"atoms"``.
    """

    candidates_A: np.ndarray
    values: np.ndarray
    names: tuple[str, ...]
    patches: np.ndarray
    spots_A: np.ndarray
    source: str


def candidate_grid(area_center_A: tuple[float, float], area_half_width_A: float, fov_A: float, overlap: float) -> np.ndarray:
    """Centres ``(n, 2)`` of a row-major grid of sub-scans of side ``fov_A`` tiling the allowed
    square with fractional ``overlap``; every sub-scan lies wholly inside the square."""
    if not (math.isfinite(fov_A) and fov_A > 0):
        raise InputError("subscan_fov_A", fov_A, "must be a positive length in Å")
    usable = 2.0 * area_half_width_A - fov_A
    if usable < -1e-9:
        raise InputError("subscan_fov_A", fov_A, f"a sub-scan does not fit in the allowed square of half width {area_half_width_A} Å")
    step = fov_A * (1.0 - overlap)
    n = int(math.ceil(max(usable, 0.0) / step - 1e-9)) + 1  # spacing <= step: no gaps between sub-scans
    if n > 200:
        raise InputError("subscan_fov_A", fov_A, f"gives {n}x{n} candidates over the allowed square (at most 200 per side)")
    off = np.linspace(-usable / 2.0, usable / 2.0, n) if n > 1 else np.zeros(1)
    xx, yy = np.meshgrid(off, off)
    return np.stack([area_center_A[0] + xx.ravel(), area_center_A[1] + yy.ravel()], axis=1)


def spot_map(image: np.ndarray, geometry: ScanGeometry, sigma_A: float = 0.6, background_A: float = 10.0) -> np.ndarray:
    """Matched-filter map ``(rows, cols)`` in robust standard deviations (see the module docstring)."""
    img = np.asarray(image, dtype=np.float64)
    if img.shape != tuple(geometry.shape_px):
        raise InputError("image.shape", img.shape, f"must equal the overview geometry's shape_px {geometry.shape_px}")
    px = float(np.mean(geometry.pixel_size_A))
    s = ndi.gaussian_filter(img, max(sigma_A / px, 0.3))
    w = max(3, int(round(background_A / px)) | 1)
    d = s - ndi.uniform_filter(s, w)
    mad = float(np.median(np.abs(d - np.median(d))))
    scale = 1.4826 * mad if mad > 0 else float(np.std(d)) or 1.0
    # the noise of the filtered image is not uniform: near the frame's edges the mirrored
    # border makes it larger, so the scale is local (a wide RMS of d with bright peaks clipped)
    clipped = np.clip(d, -3.0 * scale, 3.0 * scale)
    local = np.sqrt(np.maximum(ndi.uniform_filter(clipped * clipped, 2 * w + 1), 1e-12 * scale * scale))
    z = (d / local).astype(np.float32)
    b = int(math.ceil(3.0 * sigma_A / px)) + 1  # the outermost pixels see mirrored noise: no spots there
    z[:b] = 0.0
    z[-b:] = 0.0
    z[:, :b] = 0.0
    z[:, -b:] = 0.0
    return z


def find_spots(z: np.ndarray, geometry: ScanGeometry, threshold: float = 4.0, min_separation_A: float = 1.2) -> np.ndarray:
    """Local maxima of the spot map above ``threshold`` as sample positions ``(m, 2)`` Å."""
    px = float(np.mean(geometry.pixel_size_A))
    size = max(3, int(round(min_separation_A / px)) | 1)
    peaks = (z == ndi.maximum_filter(z, size=size)) & (z > threshold)
    rc = np.argwhere(peaks).astype(np.float64)
    return geometry.pixel_to_sample(rc) if len(rc) else np.zeros((0, 2))


def _counts_in_fields(points_A: np.ndarray, centres_A: np.ndarray, half_A: float) -> np.ndarray:
    """How many of ``points_A`` lie in the axis-aligned square of half side ``half_A`` around each centre."""
    if len(points_A) == 0:
        return np.zeros(len(centres_A))
    d = np.abs(points_A[None, :, :] - centres_A[:, None, :])
    return np.sum(np.all(d <= half_A, axis=2), axis=1).astype(np.float64)


def _density_at(points_A: np.ndarray, centres_A: np.ndarray, sigma_A: float, weights: np.ndarray | None = None) -> np.ndarray:
    """Gaussian-weighted count of points around each centre (points per sub-scan area)."""
    if len(points_A) == 0:
        return np.zeros(len(centres_A))
    d2 = np.sum((points_A[None, :, :] - centres_A[:, None, :]) ** 2, axis=2)
    w = np.ones(len(points_A)) if weights is None else weights
    return np.exp(-0.5 * d2 / sigma_A**2) @ w


def _field_pixels(geometry: ScanGeometry, centre_A: np.ndarray, half_A: float) -> tuple[slice, slice]:
    """Row and column slices of the overview covering a sub-scan (clipped to the frame)."""
    rows, cols = geometry.shape_px
    corners = geometry.sample_to_pixel(centre_A + np.array([[-half_A, -half_A], [half_A, half_A], [-half_A, half_A], [half_A, -half_A]]))
    r0 = int(np.clip(np.floor(corners[:, 0].min()), 0, rows - 1))
    r1 = int(np.clip(np.ceil(corners[:, 0].max()), r0 + 1, rows))
    c0 = int(np.clip(np.floor(corners[:, 1].min()), 0, cols - 1))
    c1 = int(np.clip(np.ceil(corners[:, 1].max()), c0 + 1, cols))
    return slice(r0, r1), slice(c0, c1)


def _patch(block: np.ndarray, p: int) -> np.ndarray:
    """Block means of ``block`` on a ``p x p`` grid (flattened)."""
    rows, cols = block.shape
    r_edges = np.linspace(0, rows, p + 1).astype(int)
    c_edges = np.linspace(0, cols, p + 1).astype(int)
    out = np.zeros((p, p))
    for i in range(p):
        for j in range(p):
            b = block[r_edges[i] : max(r_edges[i + 1], r_edges[i] + 1), c_edges[j] : max(c_edges[j + 1], c_edges[j] + 1)]
            out[i, j] = float(b.mean()) if b.size else 0.0
    return out.ravel()


def features_from_image(
    image: np.ndarray,
    geometry: ScanGeometry,
    candidates_A: np.ndarray,
    fov_A: float,
    *,
    spot_sigma_A: float = 0.6,
    spot_threshold: float = 4.0,
    patch_px: int = 8,
) -> OverviewFeatures:
    """Image features (:data:`IMAGE_FEATURES`) of each candidate sub-scan from the overview's pixels.

    ``max_z``: the brightest spot-map value inside the sub-scan (what "brightest spots first"
    ranks by); ``excess``: the spot map summed over its pixels above ``spot_threshold - 1``
    (several weak spots add up); ``spots``: spots (peaks above ``spot_threshold``) inside;
    ``spot_density``: spots around it, Gaussian-weighted with sigma = ``fov_A`` (clusters extend
    past one sub-scan).
    """
    cand = np.asarray(candidates_A, dtype=np.float64).reshape(-1, 2)
    z = spot_map(image, geometry, sigma_A=spot_sigma_A)
    spots = find_spots(z, geometry, threshold=spot_threshold)
    half = fov_A / 2.0
    zpos = np.clip(z, 0.0, None)
    max_z = np.zeros(len(cand))
    excess = np.zeros(len(cand))
    patches = np.zeros((len(cand), patch_px * patch_px))
    for k, c in enumerate(cand):
        rs, cs = _field_pixels(geometry, c, half)
        block = z[rs, cs]
        max_z[k] = float(block.max())
        excess[k] = float(np.clip(block - (spot_threshold - 1.0), 0.0, None).sum())
        patches[k] = _patch(zpos[rs, cs], patch_px)
    values = np.stack(
        [max_z, excess, _counts_in_fields(spots, cand, half), _density_at(spots, cand, fov_A)], axis=1
    )
    return OverviewFeatures(cand, values, IMAGE_FEATURES, patches, spots, "image")


def features_from_atoms(
    atoms: Atoms,
    candidates_A: np.ndarray,
    fov_A: float,
    target_classes: tuple[str, ...],
    *,
    patch_px: int = 8,
) -> OverviewFeatures:
    """Atom features (:data:`ATOM_FEATURES`) of each candidate from the segmenter's atoms in the
    overview (used when the observation carries no pixels): target-class atoms inside and around
    the sub-scan, all atoms inside, and the target atoms' mean confidence."""
    cand = np.asarray(candidates_A, dtype=np.float64).reshape(-1, 2)
    half = fov_A / 2.0
    names = atoms.class_names
    idx = [names.index(c) for c in target_classes if c in names]
    is_target = np.isin(atoms.classes, idx) if idx else np.zeros(len(atoms), dtype=bool)
    tgt = atoms.positions_A[is_target]
    conf = atoms.confidence[is_target]
    n_t = _counts_in_fields(tgt, cand, half)
    conf_sum = np.zeros(len(cand))
    patches = np.zeros((len(cand), patch_px * patch_px))
    for k, c in enumerate(cand):
        inside = np.all(np.abs(tgt - c) <= half, axis=1) if len(tgt) else np.zeros(0, dtype=bool)
        conf_sum[k] = float(conf[inside].sum()) if len(tgt) else 0.0
        if len(tgt) and inside.any():
            rel = (tgt[inside] - (c - half)) / fov_A * patch_px
            ij = np.clip(rel.astype(int), 0, patch_px - 1)
            np.add.at(patches[k], ij[:, 1] * patch_px + ij[:, 0], 1.0)
    values = np.stack(
        [n_t, _density_at(tgt, cand, fov_A), _counts_in_fields(atoms.positions_A, cand, half), conf_sum / np.maximum(n_t, 1.0)],
        axis=1,
    )
    return OverviewFeatures(cand, values, ATOM_FEATURES, patches, tgt, "atoms")


def peak_candidates(
    spots_A: np.ndarray,
    grid_A: np.ndarray,
    fov_A: float,
    area_center_A: tuple[float, float],
    area_half_width_A: float,
) -> np.ndarray:
    """Candidates at overview features: the grid plus one sub-scan centred on each cluster of
    spots (spots merged within ``fov_A / 2``), clipped so the sub-scan stays in the allowed square.
    Returns ``(n, 2)``, grid first."""
    if len(spots_A) == 0:
        return grid_A

    if len(spots_A) == 1:
        centres = spots_A.copy()
    else:
        labels = fcluster(linkage(spots_A, method="single"), t=fov_A / 2.0, criterion="distance")
        centres = np.stack([spots_A[labels == lab].mean(axis=0) for lab in np.unique(labels)])
    lim = area_half_width_A - fov_A / 2.0
    centres = np.clip(centres - np.asarray(area_center_A), -lim, lim) + np.asarray(area_center_A)
    # drop cluster centres that duplicate a grid point
    d = np.min(np.linalg.norm(centres[:, None, :] - grid_A[None, :, :], axis=2), axis=1)
    return np.concatenate([grid_A, centres[d > fov_A * 0.25]])
