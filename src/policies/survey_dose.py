"""The survey's own account of local dose, on the safety gate's model (:mod:`stemagent.dose`).

The policy plans within the run's local dose budget (``safety.dose_budget_e_per_A2``: the most
dose any one place may receive) with the same map and footprints the gate uses: a
:class:`~stemagent.dose.DoseMap` over the allowed area plus a probe's reach, in cells of
``dose_cell_A``, each scan adding its peak dose over its field grown by the probe's reach (and its
flybacks unless the instrument blanks them). So a sub-scan the policy thinks fits, the gate
accepts too, except for what only the gate sees (the unblanked beam idling between commands);
the gate stays the last word.

Candidate footprints are computed once per candidate set; checking all of them is a slice, an add
and a max each.
"""

from __future__ import annotations

import math

import numpy as np

from stemagent import dose
from stemagent.types import ScanGeometry

#: the gate's cap on map cells per side (agent/safety.py's MAX_CELLS): the same cells, the same bound
MAX_CELLS = 1024


class LocalDoseLedger:
    """Upper bound of the dose received in each cell, and whether a sub-scan still fits the budget.

    ``budget_e_per_A2`` infinite: nothing is tracked (every check passes)."""

    def __init__(self, area_center_A: tuple[float, float], area_half_width_A: float, budget_e_per_A2: float,
                 beam_current_pA: float, probe_fwhm_A: float = 0.8, dose_cell_A: float = 1.0,
                 flyback_blanked: bool = False) -> None:
        self.budget_e_per_A2 = float(budget_e_per_A2)
        self.beam_current_pA = float(beam_current_pA)
        self.probe_fwhm_A = float(probe_fwhm_A)
        self.flyback_blanked = bool(flyback_blanked)
        reach = dose.probe_reach_A(self.probe_fwhm_A)
        margin = math.ceil((reach + dose_cell_A) / dose_cell_A) * dose_cell_A
        self.map = (dose.DoseMap(area_center_A, area_half_width_A + margin, dose_cell_A, MAX_CELLS)
                    if math.isfinite(self.budget_e_per_A2) else None)
        self._candidates: list[dose.Increment] = []
        self._n_candidates = 0

    @property
    def tracking(self) -> bool:
        return self.map is not None

    def footprint(self, geometry: ScanGeometry) -> dose.Increment:
        assert self.map is not None
        return dose.scan_footprint(self.map, geometry, self.beam_current_pA, self.probe_fwhm_A,
                                   flyback_blanked=self.flyback_blanked).increment

    def add(self, geometry: ScanGeometry) -> None:
        """A scan that was made (the overview or a sub-scan)."""
        if self.map is not None:
            self.map.add(self.footprint(geometry))

    def peak_with(self, geometry: ScanGeometry) -> float:
        """The most dose any place would have after one more scan of ``geometry`` (0 when not tracking)."""
        return 0.0 if self.map is None else self.map.peak_with(self.footprint(geometry))

    def set_candidates(self, geometries: list[ScanGeometry]) -> None:
        self._candidates = [self.footprint(g) for g in geometries] if self.map is not None else []
        self._n_candidates = len(geometries)

    def candidates_fit(self) -> np.ndarray:
        """``(n,)`` bool: each candidate's sub-scan keeps every place within the budget."""
        if self.map is None:
            return np.ones(self._n_candidates, dtype=bool)
        return np.array([self.map.peak_with(inc) <= self.budget_e_per_A2 for inc in self._candidates], dtype=bool)

    def candidate_peaks(self) -> np.ndarray:
        """``(n,)`` the peak dose after each candidate's sub-scan (zeros when not tracking)."""
        if self.map is None:
            return np.zeros(self._n_candidates)
        return np.array([self.map.peak_with(inc) for inc in self._candidates])
