"""Placeholder acquisition policies: a raster over the allowed area, and seeded random fields.

Both ignore what they observe; they exist so the closed loop walks end to end. They keep
every field of view inside the allowed square so the safety gate never has to refuse them.
"""

from __future__ import annotations

import math

import numpy as np

from stemagent.config import ScanConfig
from stemagent.stages import Observation
from stemagent.types import Decision, ScanRegion


MAX_FIELDS_PER_SIDE = 1000


def _field_centres(area_center_A: tuple[float, float], area_half_width_A: float, fov_A: float, overlap: float) -> np.ndarray:
    """Centres ``(N, 2)`` of a serpentine grid of fields covering the allowed square."""
    usable = 2 * area_half_width_A - fov_A
    if usable <= 0:
        return np.array([area_center_A], dtype=np.float64)
    step = fov_A * (1.0 - overlap)
    n = int(math.floor(usable / step)) + 1
    if n > MAX_FIELDS_PER_SIDE:
        raise ValueError(
            f"area_half_width_A={area_half_width_A}: a raster of fov_A={fov_A} would need {n}x{n} fields "
            f"(at most {MAX_FIELDS_PER_SIDE} per side); use a larger field or a smaller area"
        )
    offsets = np.linspace(-usable / 2, usable / 2, n) if n > 1 else np.zeros(1)
    centres: list[tuple[float, float]] = []
    for j, oy in enumerate(offsets):
        row = offsets if j % 2 == 0 else offsets[::-1]
        centres.extend((area_center_A[0] + ox, area_center_A[1] + oy) for ox in row)
    return np.asarray(centres)


class RasterPolicy:
    """Visit a serpentine grid of fields of view, then start over."""

    name = "raster"

    def __init__(self, scan: ScanConfig, area_center_A: tuple[float, float], area_half_width_A: float, overlap: float = 0.1) -> None:
        self.scan = scan
        self.centres = _field_centres(area_center_A, area_half_width_A, max(scan.fov_A), overlap)
        self._next = 1  # field 0 is the agent's initial survey scan

    def decide(self, observation: Observation) -> Decision:
        i = self._next % len(self.centres)
        self._next += 1
        centre = (float(self.centres[i][0]), float(self.centres[i][1]))
        return Decision(
            command=ScanRegion(self.scan.geometry(center_A=centre)),
            policy=self.name,
            reason=f"field {i + 1} of {len(self.centres)} in the raster",
            scores={"field": float(i)},
        )


class RandomPolicy:
    """Scan fields at uniformly random centres inside the allowed square (seeded)."""

    name = "random"

    def __init__(self, scan: ScanConfig, area_center_A: tuple[float, float], area_half_width_A: float, rng: np.random.Generator) -> None:
        self.scan = scan
        self.area_center_A = area_center_A
        self.half_range_A = max(0.0, area_half_width_A - max(scan.fov_A) / 2.0)
        self.rng = rng

    def decide(self, observation: Observation) -> Decision:
        off = self.rng.uniform(-self.half_range_A, self.half_range_A, size=2)
        centre = (self.area_center_A[0] + float(off[0]), self.area_center_A[1] + float(off[1]))
        return Decision(
            command=ScanRegion(self.scan.geometry(center_A=centre)),
            policy=self.name,
            reason="uniformly random field centre",
            scores={"n_atoms_seen": float(len(observation.atoms))},
        )
