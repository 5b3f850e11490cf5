"""Synthetic atom detections under a known drift: a test double for the segmenter.

No image is formed: a lattice of sample-frame positions is "scanned" with a raster geometry,
each atom is seen at the time the beam passes it (``X + d(t)`` under the beam, the twin's
convention), and its detected position gets Gaussian noise of a known sigma. Frames carry a
blank image (a zero-stride array, no memory) so that the stage sees real :class:`Frame`\\s.

Used by the unit tests and the examples; the benchmark uses the real twin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from stemagent.types import Atoms, Frame, ScanGeometry

DriftFn = Callable[[np.ndarray], np.ndarray]  # t (n,) -> d (n, 2), Å


def hexagonal_lattice_A(size_A: float, spacing_A: float = 1.42, center_A: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Honeycomb (graphene-like) sites ``(N, 2)`` with nearest-neighbour ``spacing_A`` over a square of ``size_A``."""
    a = spacing_A * np.sqrt(3.0)
    a1 = np.array([a, 0.0])
    a2 = np.array([a / 2.0, a * np.sqrt(3.0) / 2.0])
    n = int(np.ceil(size_A / a)) * 2 + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    base = i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2
    pts = np.concatenate([base, base + np.array([0.0, spacing_A])])
    half = size_A / 2.0
    keep = (np.abs(pts[:, 0]) <= half) & (np.abs(pts[:, 1]) <= half)
    return pts[keep] + np.asarray(center_A)


@dataclass
class SyntheticScan:
    """Scans ``sites_A`` ``(N, 2)`` under ``drift`` with ``geometry``; ``sigma_A`` detection noise."""

    sites_A: np.ndarray
    drift: DriftFn
    geometry: ScanGeometry
    sigma_A: float = 0.02
    gap_s: float = 0.0  # dead time between frames
    dose_e_per_A2: float = 0.0  # the frames' dose per Å² (the stage compares frames by it)

    def frame(self, index: int, start_s: float, rng: np.random.Generator, present: np.ndarray | None = None,
              missing_fraction: float = 0.0, report_sigma: bool = True) -> tuple[Frame, Atoms, np.ndarray]:
        """One frame starting at ``start_s``: ``(Frame, Atoms, site index of each detection (n,))``.

        ``present`` ``(N,)`` bool: which sites hold an atom; ``missing_fraction``: detections
        dropped at random (missed by the finder).
        """
        g = self.geometry
        X = self.sites_A
        ids = np.arange(len(X)) if present is None else np.flatnonzero(present)
        # when the beam passes each site: fixed point on the scan timing
        line_times = g.line_start_times_s(start_s)
        t = np.full(len(ids), start_s + g.frame_time_s / 2.0)
        for _ in range(4):
            rc = g.sample_to_pixel(X[ids] + self.drift(t))
            r = np.clip(np.rint(rc[:, 0]), 0, g.shape_px[0] - 1).astype(np.int64)
            t = line_times[r] + np.clip(rc[:, 1], 0, g.shape_px[1] - 1) * g.dwell_s
        y = X[ids] + self.drift(t)
        seen = g.contains(y)
        if missing_fraction > 0:
            seen &= rng.random(len(ids)) >= missing_fraction
        ids, y, t = ids[seen], y[seen], t[seen]
        y = y + rng.normal(0.0, self.sigma_A, size=y.shape)
        frame = Frame(
            image=np.broadcast_to(np.float32(0.0), g.shape_px),
            geometry=g,
            line_times_s=line_times,
            index=index,
            dose_e_per_A2=self.dose_e_per_A2,
            source="synthetic",
        )
        atoms = Atoms(
            positions_A=y,
            classes=np.zeros(len(ids), dtype=np.int64),
            confidence=np.ones(len(ids)),
            frame_index=index,
            uncertainty_A=np.full(len(ids), self.sigma_A) if report_sigma else None,
            times_s=t,
        )
        return frame, atoms, ids

    def start_time_s(self, index: int, t0_s: float = 0.0) -> float:
        return t0_s + index * (self.geometry.frame_time_s + self.gap_s)


def linear_drift(v_A_per_s: tuple[float, float]) -> DriftFn:
    v = np.asarray(v_A_per_s, dtype=np.float64)
    return lambda t: np.asarray(t, dtype=np.float64)[:, None] * v[None, :]


def sinusoidal_drift(amplitude_A: tuple[float, float], period_s: float, v_A_per_s: tuple[float, float] = (0.0, 0.0)) -> DriftFn:
    amp = np.asarray(amplitude_A, dtype=np.float64)
    v = np.asarray(v_A_per_s, dtype=np.float64)
    w = 2 * np.pi / period_s
    return lambda t: np.asarray(t, dtype=np.float64)[:, None] * v[None, :] + np.sin(w * np.asarray(t)[:, None] + np.array([0.0, 1.0])) * amp


def random_walk_drift(diffusion_A_per_sqrt_s: float, duration_s: float, rng: np.random.Generator, step_s: float = 0.01,
                      v_A_per_s: tuple[float, float] = (0.0, 0.0)) -> DriftFn:
    """A Brownian path (linearly interpolated between knots ``step_s`` apart) plus a steady drift."""
    n = int(np.ceil(duration_s / step_s)) + 2
    knots = np.concatenate([np.zeros((1, 2)), np.cumsum(rng.normal(0, diffusion_A_per_sqrt_s * np.sqrt(step_s), (n - 1, 2)), axis=0)])
    tk = np.arange(n) * step_s
    v = np.asarray(v_A_per_s, dtype=np.float64)

    def d(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return np.stack([np.interp(t, tk, knots[:, 0]), np.interp(t, tk, knots[:, 1])], axis=1) + t[:, None] * v[None, :]

    return d
