"""The safety gate: every command passes here before it reaches a driver.

Rules, each named in a refusal:
- ``area``: scans and parks stay inside the allowed square of the specimen;
- ``fov`` / ``pixels`` / ``dwell`` / ``park_dwell``: instrument limits of the run;
- ``dose``: a cumulative dose map over the allowed area (cells of ``dose_cell_A``) may not go
  past the dose budget anywhere;
- ``rate``: at most ``max_commands_per_s`` commands within any one-second window.
The watchdog (no reply within the expected time plus ``watchdog_s``) is enforced by the agent's
timeouts on every driver call.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from stemagent.config import SafetyConfig
from stemagent.types import ELECTRON_CHARGE_C, Blank, BeamCommand, Park, ScanRegion

MAX_CELLS = 1024
PROBE_AREA_A2 = 1.0  # area a parked probe's dose is spread over for the budget (about the probe's size)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: str = ""
    detail: str = ""


ALLOW = Verdict(True)


class SafetyGate:
    def __init__(self, config: SafetyConfig, beam_current_pA: float, dose_cell_A: float = 2.0) -> None:
        self.config = config
        self.beam_current_pA = beam_current_pA
        self.dose_budget_e_per_A2 = config.max_total_dose_e_per_A2
        # the map never exceeds MAX_CELLS per side: large areas get coarser cells
        self.cell_A = max(dose_cell_A, 2 * config.area_half_width_A / MAX_CELLS)
        n = max(1, int(math.ceil(2 * config.area_half_width_A / self.cell_A)))
        self.dose_map = np.zeros((n, n))  # e/Å², rows along y, cols along x
        self._recent: deque[float] = deque()

    # --- geometry helpers ------------------------------------------------------------------
    def _in_area(self, xy: np.ndarray) -> bool:
        c = np.asarray(self.config.area_center_A)
        return bool(np.all(np.abs(np.asarray(xy).reshape(-1, 2) - c) <= self.config.area_half_width_A + 1e-9))

    def _cells(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(self.config.area_center_A)
        lo = c - self.config.area_half_width_A
        ij = np.floor((np.asarray(xy).reshape(-1, 2) - lo) / self.cell_A).astype(int)
        n = self.dose_map.shape[0]
        return np.clip(ij[:, 1], 0, n - 1), np.clip(ij[:, 0], 0, n - 1)

    def _scan_footprint(self, cmd: ScanRegion) -> tuple[np.ndarray, np.ndarray]:
        """Dose-map cells covered by a scan (cell centres inside the scanned area).

        Only cells within the scan's bounding box are tested, so the cost follows the field's
        size, not the size of the allowed area.
        """
        g = cmd.geometry
        rows, cols = g.shape_px
        corners = g.pixel_to_sample(np.array([[0, 0], [0, cols - 1], [rows - 1, 0], [rows - 1, cols - 1]]))
        r_lo, c_lo = self._cells(corners.min(axis=0))
        r_hi, c_hi = self._cells(corners.max(axis=0))
        lo = np.asarray(self.config.area_center_A) - self.config.area_half_width_A
        r_idx = np.arange(r_lo[0], r_hi[0] + 1)
        c_idx = np.arange(c_lo[0], c_hi[0] + 1)
        cc, rr = np.meshgrid(c_idx, r_idx)
        pts = np.stack([lo[0] + (cc.ravel() + 0.5) * self.cell_A, lo[1] + (rr.ravel() + 0.5) * self.cell_A], axis=1)
        inside = g.contains(pts)
        if not inside.any():  # a field smaller than a cell still doses the cell it sits in
            return self._cells(np.asarray(g.center_A))
        return rr.ravel()[inside], cc.ravel()[inside]

    def _dose_of(self, cmd: BeamCommand) -> tuple[tuple[np.ndarray, np.ndarray], float]:
        if isinstance(cmd, ScanRegion):
            g = cmd.geometry
            px, py = g.pixel_size_A
            dose = self.beam_current_pA * 1e-12 * g.dwell_s / ELECTRON_CHARGE_C / (px * py)
            return self._scan_footprint(cmd), dose
        if isinstance(cmd, Park):
            dose = self.beam_current_pA * 1e-12 * cmd.dwell_s / ELECTRON_CHARGE_C / PROBE_AREA_A2
            return self._cells(np.asarray(cmd.position_A)), dose
        return (np.zeros(0, int), np.zeros(0, int)), 0.0

    # --- the gate ------------------------------------------------------------------------------
    def check(self, cmd: BeamCommand, now_s: float) -> Verdict:
        """Decide whether ``cmd`` may be sent now. Does not record it; call :meth:`record` after sending."""
        cfg = self.config
        if isinstance(cmd, Blank):
            return ALLOW  # blanking is always allowed
        window = [t for t in self._recent if now_s - t < 1.0]
        if len(window) >= cfg.max_commands_per_s:
            return Verdict(False, "rate", f"{len(window)} commands in the last second; limit max_commands_per_s={cfg.max_commands_per_s}")
        if isinstance(cmd, ScanRegion):
            g = cmd.geometry
            if max(g.fov_A) > cfg.max_fov_A:
                return Verdict(False, "fov", f"fov_A={max(g.fov_A)} exceeds max_fov_A={cfg.max_fov_A}")
            if max(g.shape_px) > cfg.max_shape_px:
                return Verdict(False, "pixels", f"shape_px={g.shape_px} exceeds max_shape_px={cfg.max_shape_px}")
            if not cfg.min_dwell_s <= g.dwell_s <= cfg.max_dwell_s:
                return Verdict(False, "dwell", f"dwell_s={g.dwell_s} outside [{cfg.min_dwell_s}, {cfg.max_dwell_s}]")
            rows, cols = g.shape_px
            corners = g.pixel_to_sample(np.array([[0, 0], [0, cols - 1], [rows - 1, 0], [rows - 1, cols - 1]]))
            if not self._in_area(corners):
                return Verdict(False, "area", f"scan centred at {tuple(round(v, 3) for v in g.center_A)} Å with fov {g.fov_A} Å leaves the allowed area")
        elif isinstance(cmd, Park):
            if cmd.dwell_s > cfg.max_park_s:
                return Verdict(False, "park_dwell", f"dwell_s={cmd.dwell_s} exceeds max_park_s={cfg.max_park_s}")
            if not self._in_area(np.asarray(cmd.position_A)):
                return Verdict(False, "area", f"park position {cmd.position_A} Å is outside the allowed area")
        cells, dose = self._dose_of(cmd)
        if len(cells[0]):
            worst = float(self.dose_map[cells].max()) + dose
            if worst > self.dose_budget_e_per_A2:
                return Verdict(False, "dose", f"dose would reach {worst:.3g} e/Å² > budget {self.dose_budget_e_per_A2:.3g} e/Å²")
        return ALLOW

    def record(self, cmd: BeamCommand, now_s: float) -> float:
        """Account for a command that was sent; returns the dose it added (e/Å²)."""
        if isinstance(cmd, Blank):
            return 0.0
        self._recent.append(now_s)
        while self._recent and now_s - self._recent[0] >= 1.0:
            self._recent.popleft()
        cells, dose = self._dose_of(cmd)
        if len(cells[0]):
            self.dose_map[cells] += dose
        return dose

    def set_dose_budget(self, value_e_per_A2: float) -> None:
        if not (math.isfinite(value_e_per_A2) and value_e_per_A2 > 0):
            raise ValueError(f"value={value_e_per_A2!r}: dose budget must be a positive number of e/Å²")
        self.dose_budget_e_per_A2 = float(value_e_per_A2)

    @property
    def max_dose_e_per_A2(self) -> float:
        return float(self.dose_map.max())
