"""Perovskite columns (ABO3 down [001]) without a trained network: LoG columns, classes by intensity.

The shipped U-Net was trained on graphene and TMDs only, so a perovskite frame gets the LoG
finder's columns, and each column's class comes from its integrated intensity (ADF: the
heavier the column, the brighter): the A columns (Sr, Ba, Pb, Bi, La: the heaviest cations
in common perovskites) are the brightest level, the B-O columns the next, the pure O columns
the dimmest. A per-frame 1-D k-means on the columns' background-subtracted disk sums finds
the levels; O is reported only where the signal allows, i.e. when its level stands apart
from the B level by ``o_separation`` of their pooled spread; otherwise the dim columns are
dropped and only A and B are reported. How it fails: a frame with fewer than ``min_columns``
columns gets them all as "A" (no levels to split), and says so in ``last_report``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from stemagent.segmentation.classical import LoGFinder, check_image
from stemagent.types import Atoms, Frame

PEROVSKITE_CLASS_NAMES = ("A", "B", "O")


def _kmeans_1d(x: np.ndarray, k: int, iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(N,)`` (0 = brightest) and centres ``(k,)`` (descending) of a 1-D k-means."""
    centres = np.quantile(x, np.linspace(0.9, 0.1, k))
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iterations):
        labels = np.argmin(np.abs(x[:, None] - centres[None, :]), axis=1)
        new = np.array([x[labels == j].mean() if np.any(labels == j) else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    order = np.argsort(-centres)
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return rank[labels], centres[order]


@dataclass
class PerovskiteFinder:
    """A / B / O columns of a perovskite frame (see the module docstring). Lengths in Å."""

    sigma_A: float = 0.5
    min_separation_A: float = 1.4
    aperture_A: float = 0.6
    o_separation: float = 3.0
    min_columns: int = 6
    class_names: tuple[str, ...] = PEROVSKITE_CLASS_NAMES
    last_report: dict[str, Any] = field(default_factory=dict)

    def find(self, frame: Frame) -> Atoms:
        img = check_image(frame.image)
        atoms = LoGFinder(sigma_A=self.sigma_A, min_separation_A=self.min_separation_A, threshold=0.05).find(frame)
        n = len(atoms)
        if n < self.min_columns:
            self.last_report = {"specimen": "perovskite", "levels": f"too few columns ({n} < {self.min_columns}): all called A"}
            return Atoms(atoms.positions_A, np.zeros(n, np.int64), atoms.confidence, atoms.frame_index, self.class_names,
                         atoms.uncertainty_A, atoms.times_s)
        px = float(np.mean(frame.geometry.pixel_size_A))
        rc = frame.geometry.sample_to_pixel(atoms.positions_A)
        # disk sums minus the frame's dark level (a low quantile of a light smoothing)
        dark = float(np.quantile(ndimage.gaussian_filter(img, 1.0), 0.02))
        r = max(1, int(round(self.aperture_A / px)))
        off = np.arange(-r, r + 1)
        disk = (off[:, None] ** 2 + off[None, :] ** 2) <= r * r
        rr = np.clip(np.rint(rc[:, 0]).astype(int)[:, None, None] + off[None, :, None], 0, img.shape[0] - 1)
        cc = np.clip(np.rint(rc[:, 1]).astype(int)[:, None, None] + off[None, None, :], 0, img.shape[1] - 1)
        intensity = ((img[rr, cc] - dark) * disk[None]).sum(axis=(1, 2))
        # levels from the columns whose disk lies inside the frame; every column takes the nearest level
        inner = (rc[:, 0] >= r) & (rc[:, 0] <= img.shape[0] - 1 - r) & (rc[:, 1] >= r) & (rc[:, 1] <= img.shape[1] - 1 - r)
        fit = intensity[inner] if inner.sum() >= self.min_columns else intensity
        lab3, centres = _kmeans_1d(fit, 3)
        spread = float(np.sqrt(np.mean([np.var(fit[lab3 == j]) for j in range(3) if np.sum(lab3 == j) > 1] or [0.0])))
        gaps = -np.diff(centres)
        o_apart = bool(min(np.bincount(lab3, minlength=3)) >= 2 and np.all(gaps >= self.o_separation * max(spread, 1e-12)))
        if not o_apart:  # no O level the signal resolves: A and B only
            _, centres = _kmeans_1d(fit, 2)
        labels = np.argmin(np.abs(intensity[:, None] - centres[None, :]), axis=1)
        keep = np.ones(n, dtype=bool)
        self.last_report = {
            "specimen": "perovskite",
            "levels": {c: round(float(v), 4) for c, v in zip(self.class_names, centres)},
            "o_resolved": o_apart,
        }
        return Atoms(
            positions_A=atoms.positions_A[keep],
            classes=labels[keep],
            confidence=atoms.confidence[keep],
            frame_index=atoms.frame_index,
            class_names=self.class_names,
            uncertainty_A=None if atoms.uncertainty_A is None else atoms.uncertainty_A[keep],
            times_s=None if atoms.times_s is None else atoms.times_s[keep],
        )
