"""Per-atom Zernike features of one frame: patches around every atom, their moments, the
rotation-invariant magnitudes, the complex moments in the sample frame and n-fold symmetry scores.

The patch disk is ``radius_factor`` times the lattice's nearest-neighbour distance (an atom and its
first neighbour shell). When that disk would exceed ``max_radius_px`` pixels the frame is first
binned by an integer factor (sums of ``b x b`` pixels, so counts stay counts) — the moments of a
finely sampled frame cost no more than those of a coarse one. Atoms whose patch would leave the
frame are not encoded (``inside`` False, features NaN).

Magnitudes are divided by the frame's median ``|a_00|`` (the mean signal in an atom's disk), so
they do not depend on dose, gain or dwell and can be compared across frames. Complex moments are
rotated into the sample frame (``a_nm exp(-i m rotation)``), so their phases mean the same thing
whatever the scan rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from stemagent.encoding.patches import check_image, inside_mask, nearest_neighbour_distance, patch_geometry
from stemagent.encoding.zernike import ZernikeBasis, rotate_moments, symmetry_scores, zernike_moments_at
from stemagent.errors import InputError

SYMMETRY_FOLDS = (2, 3, 4, 6)


@dataclass
class FrameFeatures:
    """Zernike features of the atoms of one frame (numpy, host memory).

    ``moments`` ``(N, K)`` complex, sample frame; ``magnitudes`` ``(N, K)`` ``|a_nm|`` divided by
    ``scale``; ``symmetry`` ``(N, len(folds))`` n-fold scores; ``inside`` ``(N,)`` which atoms were
    encoded (the rest hold NaN); ``n``, ``m`` ``(K,)`` the orders; ``radius_A`` the disk radius;
    ``binning`` the frame binning used; ``scale`` the frame's median ``|a_00|``.
    """

    moments: np.ndarray
    magnitudes: np.ndarray
    symmetry: np.ndarray
    inside: np.ndarray
    n: np.ndarray
    m: np.ndarray
    folds: tuple[int, ...]
    radius_A: float
    binning: int
    scale: float


class ZernikeEncoder:
    """Computes :class:`FrameFeatures`; keeps one :class:`ZernikeBasis` per patch geometry (the
    basis tables cost a few hundred ms to build, the moments of 500 atoms about a millisecond)."""

    def __init__(self, n_max: int = 10, radius_factor: float = 1.3, max_radius_px: float = 20.0,
                 subpixel_steps: int = 8, correction: str = "none", device: str | torch.device | None = None) -> None:
        self.n_max = int(n_max)
        self.radius_factor = float(radius_factor)
        self.max_radius_px = float(max_radius_px)
        self.subpixel_steps = int(subpixel_steps)
        self.correction = correction
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._bases: dict[tuple[int, int, float], ZernikeBasis] = {}

    def basis(self, patch_px: int, radius_px: float) -> ZernikeBasis:
        key = (min(self.n_max, int(radius_px)), patch_px, round(radius_px, 3))
        b = self._bases.get(key)
        if b is None:
            b = ZernikeBasis(key[0], patch_px, key[2], subpixel_steps=self.subpixel_steps, correction=self.correction)
            self._bases[key] = b
        return b

    def radius_for(self, positions_A: np.ndarray) -> float:
        """Disk radius (Å) for atoms at ``positions_A`` ``(N, 2)``: ``radius_factor`` x their median
        nearest-neighbour distance."""
        return self.radius_factor * nearest_neighbour_distance(positions_A)

    def encode(self, image: np.ndarray, centres_rc: np.ndarray, pixel_A: float, radius_A: float,
               rotation_rad: float = 0.0) -> FrameFeatures:
        """Features of the atoms at ``centres_rc`` ``(N, 2)`` (fractional row, col) of ``image``.

        ``pixel_A``: pixel size; ``radius_A``: disk radius (``radius_factor`` x the lattice's
        nearest-neighbour distance, see :meth:`radius_for`).
        """
        check_image(image)
        c = np.asarray(centres_rc, dtype=np.float64).reshape(-1, 2)
        if len(c) == 0:
            raise InputError("atoms", 0, "no atoms to encode")
        if not np.all(np.isfinite(c)):
            bad = int(np.flatnonzero(~np.all(np.isfinite(c), axis=1))[0])
            raise InputError(f"atoms.positions_A[{bad}]", c[bad].tolist(), "must be finite")
        binning, radius_px, patch_px = patch_geometry(radius_A / pixel_A, self.max_radius_px)
        img = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32, device=self.device)
        if binning > 1:
            img = F.avg_pool2d(img[None, None], binning)[0, 0] * float(binning * binning)
            c = (c + 0.5) / binning - 0.5
        inside = inside_mask(c, patch_px, (int(img.shape[0]), int(img.shape[1])))
        basis = self.basis(patch_px, radius_px)
        k = len(basis.n)
        moments = np.full((len(c), k), np.nan + 0j, dtype=np.complex128)
        symmetry = np.full((len(c), len(SYMMETRY_FOLDS)), np.nan)
        if inside.any():
            mom = zernike_moments_at(img, torch.as_tensor(c[inside], dtype=torch.float32, device=self.device), basis)
            mom = torch.as_tensor(rotate_moments(mom, basis.m, float(rotation_rad)))
            symmetry[inside] = symmetry_scores(mom, basis.m, SYMMETRY_FOLDS).cpu().numpy()
            moments[inside] = mom.cpu().numpy()
        mag = np.abs(moments)
        scale = float(np.nanmedian(mag[:, 0])) if inside.any() else 1.0
        if not (np.isfinite(scale) and scale > 0):
            scale = 1.0
        return FrameFeatures(
            moments=moments, magnitudes=mag / scale, symmetry=symmetry, inside=inside, n=basis.n.copy(),
            m=basis.m.copy(), folds=SYMMETRY_FOLDS, radius_A=float(radius_A), binning=binning, scale=scale,
        )
