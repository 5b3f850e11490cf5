"""Electron dose: the one place that turns beam current, times and geometry into e/Å².

The safety gate, the digital twin and the run log all take their dose figures from here.

The model
---------
* A beam current ``I`` (pA) delivers ``I * 1e-12 / e`` electrons per second.
* The probe's intensity is a **Gaussian** of full width at half maximum ``probe_fwhm_A``
  (``sigma = fwhm / 2.3548``): a beam held at one place for ``t`` gives a point at distance ``d``
  the dose ``N P(d)``, ``N = I t / e``, ``P(d) = exp(-d^2 / 2 sigma^2) / (2 pi sigma^2)``. Its
  peak density ``P0 = 1 / (2 pi sigma^2)`` is the probe's; a device that knows its probe reports
  its FWHM (:attr:`~stemagent.types.Capabilities.probe_fwhm_A`) and the narrower probe wins.
  The probe **reaches** ``3 sigma`` (``probe_reach_A``); what it puts beyond (1 % of its
  electrons) is not counted.
* A **raster scan** holds the probe ``dwell_s`` on every pixel centre. Its *areal* dose, what a
  frame reports, is ``N / (px py)`` (:func:`scan_dose_e_per_A2`). Its **peak** dose, the most any
  one point gets, is ``N P0 theta(px) theta(py)`` with ``theta(p) = sum_k exp(-k^2 p^2 / 2 sigma^2)``
  (a Gaussian summed over a lattice is largest on a lattice point): the areal dose when pixels
  are finer than the probe, the probe's own peak ``N P0`` when they are coarser
  (:func:`scan_peak_dose_e_per_A2`). The scan reaches every point within ``3 sigma`` of its field.
* **Flyback**: after every line the beam returns and settles for ``flyback_s`` at the start of a
  line (unless the instrument blanks it): the start edge gets ``I flyback / e * P0 theta(py)``.
* **Park** and **idle** (an unblanked beam left where a command ended): ``N P0`` within reach.

:class:`DoseMap` keeps, on square cells, an upper bound of the dose any point of a cell has
received: a footprint adds its peak dose to *every* cell it touches, however small the overlap.
Weighting a cell by the overlapped fraction would give the cell's mean dose, which under-counts a
spot inside the cell that several small fields overlap; the bound never does (tested against a
fine-grid evaluation of the same model with hypothesis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

ELECTRON_CHARGE_C = 1.602176634e-19
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548
REACH_SIGMAS = 3.0


# --- physics ------------------------------------------------------------------------------


def electrons(beam_current_pA: float, seconds: float) -> float:
    """Electrons a beam of ``beam_current_pA`` delivers in ``seconds``."""
    return beam_current_pA * 1e-12 * seconds / ELECTRON_CHARGE_C


def dose_e_per_A2(beam_current_pA: float, dwell_s: float, area_A2: float) -> float:
    """``I t / (e A)``: the electrons of one dwell spread evenly over ``area_A2``."""
    return electrons(beam_current_pA, dwell_s) / area_A2


def probe_sigma_A(probe_fwhm_A: float) -> float:
    return probe_fwhm_A / FWHM_PER_SIGMA


def probe_peak_density_per_A2(probe_fwhm_A: float) -> float:
    """``P0 = 1 / (2 pi sigma^2)``: the probe's intensity at its centre, per Å²."""
    return 1.0 / (2.0 * math.pi * probe_sigma_A(probe_fwhm_A) ** 2)


def probe_fwhm_for_peak_density(peak_density_per_A2: float) -> float:
    """The FWHM of the Gaussian probe with peak density ``P0`` (1/Å²), e.g. a simulated probe's."""
    return FWHM_PER_SIGMA / math.sqrt(2.0 * math.pi * peak_density_per_A2)


def probe_reach_A(probe_fwhm_A: float) -> float:
    """How far the counted part of the probe reaches (``3 sigma``)."""
    return REACH_SIGMAS * probe_sigma_A(probe_fwhm_A)


def _theta(spacing_A: float, sigma_A: float) -> float:
    """``sum_k exp(-k^2 spacing^2 / 2 sigma^2)`` over all integers k: a Gaussian summed over a
    line of points is largest on a point, where it equals this."""
    q = (spacing_A / sigma_A) ** 2 / 2.0
    k_max = int(math.ceil(math.sqrt(40.0 / q))) if q > 0 else 0
    k = np.arange(1, k_max + 1, dtype=np.float64)
    return float(1.0 + 2.0 * np.exp(-q * k * k).sum())


def scan_dose_e_per_A2(beam_current_pA: float, geometry: Any) -> float:
    """Areal dose of one raster frame (what a frame reports): electrons per pixel / pixel area."""
    px, py = geometry.pixel_size_A
    return dose_e_per_A2(beam_current_pA, geometry.dwell_s, px * py)


def scan_peak_dose_e_per_A2(beam_current_pA: float, geometry: Any, probe_fwhm_A: float) -> float:
    """The most dose any one point gets from one frame's pixel dwells (flyback excluded)."""
    px, py = geometry.pixel_size_A
    s = probe_sigma_A(probe_fwhm_A)
    p0 = probe_peak_density_per_A2(probe_fwhm_A)
    return electrons(beam_current_pA, geometry.dwell_s) * p0 * _theta(px, s) * _theta(py, s)


def flyback_peak_dose_e_per_A2(beam_current_pA: float, geometry: Any, probe_fwhm_A: float) -> float:
    """The most dose a point on the scan's start edge gets from one frame's flybacks."""
    if geometry.flyback_s <= 0:
        return 0.0
    py = geometry.pixel_size_A[1]
    s = probe_sigma_A(probe_fwhm_A)
    return electrons(beam_current_pA, geometry.flyback_s) * probe_peak_density_per_A2(probe_fwhm_A) * _theta(py, s)


def park_dose_e_per_A2(beam_current_pA: float, dwell_s: float, probe_fwhm_A: float) -> float:
    """Peak dose of a beam held ``dwell_s`` at one place (a park, or an idle unblanked beam)."""
    return electrons(beam_current_pA, dwell_s) * probe_peak_density_per_A2(probe_fwhm_A)


def scan_end_position_A(geometry: Any) -> tuple[float, float]:
    """Where the beam is when a frame ends: the last pixel of the last line."""
    rows, cols = geometry.shape_px
    xy = geometry.pixel_to_sample(np.array([[rows - 1, cols - 1]], dtype=np.float64))[0]
    return (float(xy[0]), float(xy[1]))


# --- the map -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Increment:
    """Dose to add on the block of cells ``[r0:r0+rows, c0:c0+cols]`` (e/Å², upper bounds)."""

    r0: int
    c0: int
    values: np.ndarray  # (rows, cols)

    @property
    def empty(self) -> bool:
        return self.values.size == 0

    def scaled(self, factor: float) -> "Increment":
        return Increment(self.r0, self.c0, self.values * factor)


EMPTY = Increment(0, 0, np.zeros((0, 0)))


class DoseMap:
    """Upper bound of the dose received anywhere in each cell of a square area.

    ``values[i, j]`` covers ``x`` in ``[x0 + j cell, x0 + (j + 1) cell)`` and ``y`` likewise with
    ``i``, ``(x0, y0) = center - half_width``. Footprints reaching past the map are clipped (the
    gate refuses commands that leave the allowed area, which the map covers with a margin).
    """

    def __init__(self, center_A: tuple[float, float], half_width_A: float, cell_A: float, max_cells: int = 1024) -> None:
        if not (math.isfinite(half_width_A) and half_width_A > 0 and math.isfinite(cell_A) and cell_A > 0):
            raise ValueError(f"half_width_A={half_width_A!r}, cell_A={cell_A!r}: must be positive and finite")
        self.cell_A = max(float(cell_A), 2.0 * half_width_A / max_cells)
        n = max(1, int(math.ceil(2.0 * half_width_A / self.cell_A)))
        self.origin_A = (float(center_A[0]) - half_width_A, float(center_A[1]) - half_width_A)
        self.values = np.zeros((n, n))

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.values.shape[0]), int(self.values.shape[1]))

    @property
    def peak(self) -> float:
        return float(self.values.max())

    def _block(self, lo: np.ndarray, hi: np.ndarray) -> tuple[int, int, int, int] | None:
        """Row/col index range ``[r0, r1) x [c0, c1)`` of the cells meeting the box ``lo..hi`` (x, y)."""
        n_r, n_c = self.values.shape
        c0 = int(math.floor((lo[0] - self.origin_A[0]) / self.cell_A))
        c1 = int(math.floor((hi[0] - self.origin_A[0]) / self.cell_A)) + 1
        r0 = int(math.floor((lo[1] - self.origin_A[1]) / self.cell_A))
        r1 = int(math.floor((hi[1] - self.origin_A[1]) / self.cell_A)) + 1
        c0, r0 = max(c0, 0), max(r0, 0)
        c1, r1 = min(c1, n_c), min(r1, n_r)
        if c1 <= c0 or r1 <= r0:
            return None
        return r0, r1, c0, c1

    def _cell_corners(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        xs = self.origin_A[0] + np.arange(c0, c1 + 1) * self.cell_A  # cell edges
        ys = self.origin_A[1] + np.arange(r0, r1 + 1) * self.cell_A
        return xs, ys

    def rectangle(self, center_A: Any, size_A: tuple[float, float], rotation_rad: float, grow_A: float) -> Increment:
        """Cells touched by a rectangle (``size_A`` along its own u, v axes, rotated by
        ``rotation_rad`` about ``center_A``) grown by ``grow_A`` on every side: a 0/1 mask."""
        c = np.asarray(center_A, dtype=np.float64)
        hu, hv = 0.5 * size_A[0] + grow_A, 0.5 * size_A[1] + grow_A
        cos, sin = math.cos(rotation_rad), math.sin(rotation_rad)
        ex = abs(cos) * hu + abs(sin) * hv  # half extent of the bounding box
        ey = abs(sin) * hu + abs(cos) * hv
        block = self._block(c - (ex, ey), c + (ex, ey))
        if block is None:
            return EMPTY
        r0, r1, c0, c1 = block
        xs, ys = self._cell_corners(r0, r1, c0, c1)
        # separating axes: the box's own axes are satisfied by the block; test the rectangle's u and v
        du0, du1 = (xs[:-1] - c[0]) * cos, (xs[1:] - c[0]) * cos
        dv0, dv1 = -(xs[:-1] - c[0]) * sin, -(xs[1:] - c[0]) * sin
        eu0, eu1 = (ys[:-1] - c[1]) * sin, (ys[1:] - c[1]) * sin
        ev0, ev1 = (ys[:-1] - c[1]) * cos, (ys[1:] - c[1]) * cos
        u_lo = np.minimum(eu0, eu1)[:, None] + np.minimum(du0, du1)[None, :]
        u_hi = np.maximum(eu0, eu1)[:, None] + np.maximum(du0, du1)[None, :]
        v_lo = np.minimum(ev0, ev1)[:, None] + np.minimum(dv0, dv1)[None, :]
        v_hi = np.maximum(ev0, ev1)[:, None] + np.maximum(dv0, dv1)[None, :]
        touch = (u_lo <= hu) & (u_hi >= -hu) & (v_lo <= hv) & (v_hi >= -hv)
        return Increment(r0, c0, touch.astype(np.float64))

    def disk(self, center_A: Any, radius_A: float) -> Increment:
        """Cells a closed disk touches: a 0/1 mask."""
        c = np.asarray(center_A, dtype=np.float64)
        block = self._block(c - radius_A, c + radius_A)
        if block is None:
            return EMPTY
        r0, r1, c0, c1 = block
        xs, ys = self._cell_corners(r0, r1, c0, c1)
        dx = np.maximum(np.maximum(xs[:-1] - c[0], c[0] - xs[1:]), 0.0)  # distance to each cell along x
        dy = np.maximum(np.maximum(ys[:-1] - c[1], c[1] - ys[1:]), 0.0)
        touch = dy[:, None] ** 2 + dx[None, :] ** 2 <= radius_A**2
        return Increment(r0, c0, touch.astype(np.float64))

    def peak_with(self, inc: Increment) -> float:
        """The map's largest value over ``inc``'s cells once ``inc`` is added (0 if empty)."""
        if inc.empty:
            return 0.0
        rows, cols = inc.values.shape
        return float((self.values[inc.r0 : inc.r0 + rows, inc.c0 : inc.c0 + cols] + inc.values).max())

    def add(self, inc: Increment) -> None:
        if inc.empty:
            return
        rows, cols = inc.values.shape
        self.values[inc.r0 : inc.r0 + rows, inc.c0 : inc.c0 + cols] += inc.values

    def value_at(self, xy_A: np.ndarray) -> np.ndarray:
        """Map values at sample points ``(N, 2)`` (x, y); points off the map read 0."""
        xy = np.asarray(xy_A, dtype=np.float64).reshape(-1, 2)
        j = np.floor((xy[:, 0] - self.origin_A[0]) / self.cell_A).astype(np.int64)
        i = np.floor((xy[:, 1] - self.origin_A[1]) / self.cell_A).astype(np.int64)
        n_r, n_c = self.values.shape
        ok = (i >= 0) & (i < n_r) & (j >= 0) & (j < n_c)
        out = np.zeros(len(xy))
        out[ok] = self.values[i[ok], j[ok]]
        return out


def combine(*parts: tuple[Increment, float]) -> Increment:
    """Sum of masks times doses, on the smallest block holding all of them."""
    parts = tuple((m, d) for m, d in parts if not m.empty and d > 0)
    if not parts:
        return EMPTY
    r0 = min(m.r0 for m, _ in parts)
    c0 = min(m.c0 for m, _ in parts)
    r1 = max(m.r0 + m.values.shape[0] for m, _ in parts)
    c1 = max(m.c0 + m.values.shape[1] for m, _ in parts)
    out = np.zeros((r1 - r0, c1 - c0))
    for m, d in parts:
        rows, cols = m.values.shape
        out[m.r0 - r0 : m.r0 - r0 + rows, m.c0 - c0 : m.c0 - c0 + cols] += m.values * d
    return Increment(r0, c0, out)


# --- footprints of commands --------------------------------------------------------------------


@dataclass(frozen=True)
class Footprint:
    """What a command is predicted to deliver: the increment to the map, the areal dose a frame
    or park should report for it (for reconciliation), and where the beam rests afterwards."""

    increment: Increment
    reported_e_per_A2: float
    peak_e_per_A2: float
    end_position_A: tuple[float, float] | None


def scan_footprint(dose_map: DoseMap, geometry: Any, beam_current_pA: float, probe_fwhm_A: float, *,
                   flyback_blanked: bool = False) -> Footprint:
    """The map increment of one raster frame: the pixel dwells over the field grown by the probe's
    reach, plus (unless blanked) the flybacks along the start edge."""
    reach = probe_reach_A(probe_fwhm_A)
    body = dose_map.rectangle(geometry.center_A, geometry.fov_A, geometry.rotation_rad, reach)
    body_dose = scan_peak_dose_e_per_A2(beam_current_pA, geometry, probe_fwhm_A)
    parts = [(body, body_dose)]
    fly_dose = 0.0 if flyback_blanked else flyback_peak_dose_e_per_A2(beam_current_pA, geometry, probe_fwhm_A)
    if fly_dose > 0:
        rows = geometry.shape_px[0]
        ends = geometry.pixel_to_sample(np.array([[0.0, 0.0], [rows - 1.0, 0.0]]))
        mid = ends.mean(axis=0)
        length = float(np.hypot(*(ends[1] - ends[0])))
        # the start edge: a segment along the slow axis (v), zero width along u
        parts.append((dose_map.rectangle(mid, (0.0, length), geometry.rotation_rad, reach), fly_dose))
    inc = combine(*parts)
    return Footprint(inc, scan_dose_e_per_A2(beam_current_pA, geometry), body_dose + fly_dose, scan_end_position_A(geometry))


def park_footprint(dose_map: DoseMap, position_A: Any, dwell_s: float, beam_current_pA: float,
                   probe_fwhm_A: float) -> Footprint:
    d = park_dose_e_per_A2(beam_current_pA, dwell_s, probe_fwhm_A)
    inc = combine((dose_map.disk(position_A, probe_reach_A(probe_fwhm_A)), d))
    pos = (float(position_A[0]), float(position_A[1]))
    return Footprint(inc, d, d, pos)
