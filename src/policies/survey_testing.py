"""A synthetic survey field: observations for the survey policy without a twin or a segmenter.

:class:`PointField` holds target positions (e.g. dopants) in a square field. It renders a cheap
overview (Poisson counts: a flat background plus a Gaussian spot per target, seeded) and answers
a sub-scan with the targets inside it as :class:`~stemagent.types.Atoms` of class ``"Si"``
among ``("C", "Si")``. Used by the tests and as a worked example of the policy's inputs; the
physical twin (``stemagent.simulators``) is the real test bed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stemagent.stages import Observation
from stemagent.types import Atoms, ScanGeometry


@dataclass
class PointField:
    """Targets ``(n, 2)`` (x, y) Å in the square of half width ``half_width_A`` around the origin."""

    targets_A: np.ndarray
    half_width_A: float
    seed: int = 0
    background: float = 2.0
    spot_counts: float = 6.0
    spot_sigma_A: float = 0.7
    _frame: int = field(default=0, init=False)

    def overview(self, shape_px: int = 256) -> Observation:
        """A noisy overview of the whole field; pixels in ``features["image"]``."""
        fov = 2.0 * self.half_width_A
        g = ScanGeometry(center_A=(0.0, 0.0), fov_A=(fov, fov), shape_px=(shape_px, shape_px), dwell_s=1e-6)
        rng = np.random.default_rng(self.seed)
        rc = g.sample_to_pixel(self.targets_A)
        px = g.pixel_size_A[0]
        rr, cc = np.mgrid[0:shape_px, 0:shape_px]
        lam = np.full((shape_px, shape_px), self.background)
        s = self.spot_sigma_A / px
        for r, c in rc:
            lo_r, hi_r = int(max(r - 4 * s - 1, 0)), int(min(r + 4 * s + 2, shape_px))
            lo_c, hi_c = int(max(c - 4 * s - 1, 0)), int(min(c + 4 * s + 2, shape_px))
            sub = (slice(lo_r, hi_r), slice(lo_c, hi_c))
            lam[sub] += self.spot_counts * np.exp(-((rr[sub] - r) ** 2 + (cc[sub] - c) ** 2) / (2 * s * s))
        image = rng.poisson(lam).astype(np.float32)
        return self._observation(g, Atoms(np.zeros((0, 2)), np.zeros(0), np.zeros(0), self._frame, ("C", "Si")), {"image": image})

    def subscan(self, geometry: ScanGeometry) -> Observation:
        """The targets inside ``geometry`` as Si atoms (confidence 1)."""
        inside = geometry.contains(self.targets_A) if len(self.targets_A) else np.zeros(0, dtype=bool)
        pos = self.targets_A[inside]
        atoms = Atoms(pos, np.ones(len(pos), dtype=np.int64), np.ones(len(pos)), self._frame, ("C", "Si"))
        return self._observation(geometry, atoms, {})

    def _observation(self, g: ScanGeometry, atoms: Atoms, features: dict[str, np.ndarray]) -> Observation:
        obs = Observation(frame_index=self._frame, time_s=float(self._frame), geometry=g, atoms=atoms, features=features)
        self._frame += 1
        return obs


def clustered_targets(rng: np.random.Generator, n: int, centres_A: np.ndarray, sigma_A: float, half_width_A: float) -> np.ndarray:
    """``n`` points ``(n, 2)`` around ``centres_A`` (Gaussian, ``sigma_A``), kept inside the field."""
    which = rng.integers(0, len(centres_A), size=n)
    pts = np.asarray(centres_A)[which] + rng.normal(0.0, sigma_A, size=(n, 2))
    return np.clip(pts, -half_width_A + 1.0, half_width_A - 1.0)
