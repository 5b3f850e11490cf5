"""Atom-centred patches: where they sit, how big they are, and the checks on their input.

A patch of ``P x P`` pixels is anchored at the integer pixel ``anchor`` (its top-left corner) so
that the atom lies within half a pixel of the patch centre ``anchor + (P - 1) / 2``; the
remainder is the atom's *offset* (row, col) in [-0.5, 0.5] px, which the Zernike moments take
into account exactly (:mod:`~stemagent.encoding.zernike`), so nothing is interpolated.

The patch radius comes from the lattice: a fixed multiple of the median nearest-neighbour
distance between the atoms, so a patch holds an atom and its first neighbour shell whatever the
material and the sampling.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial import cKDTree

from stemagent.errors import InputError


def nearest_neighbour_distance(positions: np.ndarray) -> float:
    """Median distance from each point ``(N, 2)`` to its nearest other point (same units)."""
    pts = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 2:
        raise InputError("atoms", len(pts), "need at least 2 atoms to measure the nearest-neighbour distance")
    if not np.all(np.isfinite(pts)):
        raise InputError("atoms.positions_A", pts[~np.all(np.isfinite(pts), axis=1)][0].tolist(), "must be finite")
    d, _ = cKDTree(pts).query(pts, k=2)
    nn = d[:, 1]
    nn = nn[nn > 1e-9]
    if len(nn) == 0:
        raise InputError("atoms.positions_A", "all coincident", "need distinct atom positions")
    return float(np.median(nn))


def patch_geometry(radius_px: float, max_radius_px: float) -> tuple[int, float, int]:
    """``(bin, radius, patch_px)`` for a disk of ``radius_px`` frame pixels: when the radius exceeds
    ``max_radius_px`` the frame is binned by the smallest integer ``bin`` that brings it under
    (``radius`` is then in binned pixels). The patch is the smallest even square holding the disk
    and its soft rim."""
    if not (math.isfinite(radius_px) and radius_px > 0):
        raise InputError("radius_px", radius_px, "must be a positive radius")
    radius = float(radius_px)
    binning = max(1, int(math.ceil(radius / max_radius_px - 1e-9)))
    radius /= binning
    if radius < 2.0:
        raise InputError("radius_px", radius, "patch disk under 2 px: the frame is too coarsely sampled for this lattice")
    patch = 2 * int(math.ceil(radius + 1.0))
    return binning, radius, patch


def patch_anchors(
    centres_rc: torch.Tensor, patch_px: int, image_shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer anchors ``(N, 2)`` (top-left pixel) and sub-pixel offsets ``(N, 2)`` in [-0.5, 0.5]
    of patches centred on ``centres_rc`` (row, col). Raises :class:`InputError` for non-finite
    centres or a patch that leaves the image."""
    if centres_rc.ndim != 2 or centres_rc.shape[1] != 2:
        raise InputError("centres_rc.shape", tuple(centres_rc.shape), "must be (N, 2)")
    if not bool(torch.isfinite(centres_rc).all()):
        bad = int(torch.nonzero(~torch.isfinite(centres_rc).all(dim=1))[0, 0])
        raise InputError(f"centres_rc[{bad}]", centres_rc[bad].tolist(), "must be finite")
    half = (patch_px - 1) / 2.0
    anchors = torch.round(centres_rc - half)
    offsets = centres_rc - (anchors + half)
    anchors = anchors.long()
    h, w = image_shape
    outside = (anchors[:, 0] < 0) | (anchors[:, 1] < 0) | (anchors[:, 0] + patch_px > h) | (anchors[:, 1] + patch_px > w)
    if bool(outside.any()):
        bad = int(torch.nonzero(outside)[0, 0])
        raise InputError(
            f"centres_rc[{bad}]", [round(v, 2) for v in centres_rc[bad].tolist()],
            f"a {patch_px} px patch around it leaves the {h}x{w} image",
        )
    return anchors, offsets


def inside_mask(centres_rc: np.ndarray, patch_px: int, image_shape: tuple[int, int]) -> np.ndarray:
    """Which centres ``(N, 2)`` have their whole patch inside the image ``(N,)`` bool (NaN: False)."""
    c = np.asarray(centres_rc, dtype=np.float64).reshape(-1, 2)
    half = (patch_px - 1) / 2.0
    with np.errstate(invalid="ignore"):
        a = np.round(c - half)
        ok = np.all(np.isfinite(c), axis=1) & (a[:, 0] >= 0) & (a[:, 1] >= 0)
        ok &= (a[:, 0] + patch_px <= image_shape[0]) & (a[:, 1] + patch_px <= image_shape[1])
    return ok


def extract_patches(image: torch.Tensor, centres_rc: torch.Tensor, patch_px: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches ``(N, P, P)`` of ``image`` ``(H, W)`` around ``centres_rc`` ``(N, 2)`` and the atoms'
    offsets ``(N, 2)`` from the patch centres (see :func:`patch_anchors`)."""
    if image.ndim != 2:
        raise InputError("image.shape", tuple(image.shape), "must be (rows, cols)")
    anchors, offsets = patch_anchors(centres_rc, patch_px, (int(image.shape[0]), int(image.shape[1])))
    windows = image.unfold(0, patch_px, 1).unfold(1, patch_px, 1)
    return windows[anchors[:, 0], anchors[:, 1]], offsets


def check_image(image: np.ndarray, name: str = "frame.image") -> None:
    """Raise :class:`InputError` unless ``image`` is a 2D array of finite numbers."""
    a = np.asarray(image)
    if a.ndim != 2 or a.shape[0] < 4 or a.shape[1] < 4:
        raise InputError(f"{name}.shape", a.shape, "must be a 2D image of at least 4x4 pixels")
    if not np.issubdtype(a.dtype, np.number):
        raise InputError(f"{name}.dtype", str(a.dtype), "must be numeric")
    finite = np.isfinite(a)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        raise InputError(f"{name}[{r}, {c}]", a[r, c], "must be finite (NaN or inf in the image)")
