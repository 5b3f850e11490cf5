"""Beam-induced dynamics, driven by where the beam actually dwells.

Each process is an electron-nucleus event with a cross-section ``sigma`` (barn, 1 b = 1e-8 Å²)
at the struck atom; its rate is ``sigma * j(r)`` where ``j(r) = (I / e) * P(r - r_beam)`` is the
local current density (electrons / Å² / s) from the probe intensity ``P``. During a raster scan
every atom in the field receives the frame's areal dose (``P`` integrates to one over the
raster), so the event probability is ``1 - exp(-sigma * dose)`` and the event happens when the
beam passes the struck atom. During a park the rates are evaluated from the probe intensity at
each atom and events are drawn with a Gillespie scheme (rates piecewise-constant per sample
interval, drift included).

Processes:

- ``swap``: a Si dopant in graphene exchanges places with one of its three C neighbours; the
  struck atom is the *neighbour* (a C atom hit by the beam is pushed out of plane and the Si
  relaxes into its site; Susi et al. PRL 113 (2014) 115501; Tripathi et al. Nano Lett. 18 (2018)
  5319). Default about 0.1 barn at 60 keV.
- ``knock_on``: a C atom in graphene is displaced, leaving a vacancy (tiny below 80 keV).
- ``sputter``: a chalcogen atom in a TMD is ejected (Komsa et al. PRL 109 (2012) 035503).

Energy dependence: the head-on energy transfer ``T_max(E)`` to the struck nucleus sets the rate
through a thermally broadened threshold, ``sigma(E) = sigma_ref * exp((T_max(E) - T_max(E_ref)) / T_scale)``
(the sub-threshold tail from lattice vibrations, as in Meyer et al. PRL 108 (2012) 196102).
Every default is a field of :class:`CrossSections`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.ndimage import map_coordinates
from scipy.spatial import cKDTree

from stemagent.simulators.elements import mass_u
from stemagent.simulators.optics import ProbeOptics, max_energy_transfer_eV
from stemagent.simulators.specimens import TMD_LATTICE_A, Specimen
from stemagent.types import ELECTRON_CHARGE_C

BARN_A2 = 1e-8


@dataclass(frozen=True)
class CrossSections:
    """Cross-sections (barn) at a reference energy, and the thermal threshold width (eV)."""

    si_swap_barn: float = 0.1
    si_swap_ref_keV: float = 60.0
    c_knock_on_barn: float = 1e-5
    c_knock_on_ref_keV: float = 60.0
    chalcogen_sputter_barn: float = 0.3
    chalcogen_sputter_ref_keV: float = 80.0
    threshold_width_eV: float = 1.0

    def at_energy(self, process: str, energy_keV: float, struck_z: int) -> float:
        """Cross-section in Å² for ``process`` at ``energy_keV`` on an atom of atomic number ``struck_z``."""
        sigma, ref = {
            "swap": (self.si_swap_barn, self.si_swap_ref_keV),
            "knock_on": (self.c_knock_on_barn, self.c_knock_on_ref_keV),
            "sputter": (self.chalcogen_sputter_barn, self.chalcogen_sputter_ref_keV),
        }[process]
        if sigma <= 0:
            return 0.0
        m = mass_u(struck_z)
        dt = max_energy_transfer_eV(energy_keV, m) - max_energy_transfer_eV(ref, m)
        return sigma * BARN_A2 * math.exp(dt / self.threshold_width_eV)


@dataclass(frozen=True)
class Event:
    """One beam-induced event, as recorded in ground truth."""

    time_s: float
    kind: str  # "swap" | "knock_on" | "sputter"
    atoms: tuple[int, ...]  # atom ids: (si, c) for a swap, (atom,) otherwise
    positions_before_A: tuple[tuple[float, float], ...]
    positions_after_A: tuple[tuple[float, float], ...]
    beam_A: tuple[float, float] | None  # beam position in the sample frame (park) or None (scan)
    during: str  # "scan" | "park" | "idle"

    def to_dict(self) -> dict:
        return {
            "time_s": self.time_s,
            "kind": self.kind,
            "atoms": list(self.atoms),
            "positions_before_A": [list(p) for p in self.positions_before_A],
            "positions_after_A": [list(p) for p in self.positions_after_A],
            "beam_A": None if self.beam_A is None else list(self.beam_A),
            "during": self.during,
        }


@lru_cache(maxsize=8)
def _probe_table(optics: ProbeOptics, n: int, spacing: float) -> np.ndarray:
    table = optics.intensity((n, n), (spacing, spacing))
    table.setflags(write=False)
    return table


@dataclass
class BeamDynamics:
    """Samples and applies beam-induced events to a :class:`Specimen` (mutated in place)."""

    optics: ProbeOptics
    beam_current_pA: float
    cross_sections: CrossSections = field(default_factory=CrossSections)
    enabled: bool = True
    reach_A: float = 4.0  # atoms farther than this from a parked beam are ignored
    neighbour_cutoff_A: float = 1.75
    _table: np.ndarray | None = field(default=None, init=False, repr=False)
    _table_spacing: float = field(default=0.05, init=False, repr=False)
    _sigma_cache: dict = field(default_factory=dict, init=False, repr=False)

    # --- probe intensity at arbitrary offsets --------------------------------------------
    def probe_density(self, offsets_A: np.ndarray) -> np.ndarray:
        """Probe intensity ``P`` (1/Å²) at ``(n, 2)`` offsets from the beam centre."""
        if self._table is None:
            n = 2 * int(math.ceil((self.reach_A + 0.5) / self._table_spacing))
            self._table = _probe_table(self.optics, n, self._table_spacing)
        n = self._table.shape[0]
        off = np.asarray(offsets_A, dtype=np.float64).reshape(-1, 2)
        coords = np.stack([off[:, 1] / self._table_spacing + n // 2, off[:, 0] / self._table_spacing + n // 2])
        return np.maximum(map_coordinates(self._table, coords, order=1, mode="constant", cval=0.0), 0.0)

    @property
    def electrons_per_s(self) -> float:
        return self.beam_current_pA * 1e-12 / ELECTRON_CHARGE_C

    # --- channels ---------------------------------------------------------------------
    def _channels(self, specimen: Specimen, near: np.ndarray) -> list[tuple[str, int, int]]:
        """Event channels among atoms ``near``: (kind, struck atom, partner atom or -1)."""
        out: list[tuple[str, int, int]] = []
        if not self.enabled or len(near) == 0:
            return out
        e = self.optics.energy_keV
        z = specimen.numbers
        if specimen.kind == "graphene":
            si = near[z[near] == 14]
            if len(si):
                cands = specimen.in_box(
                    tuple(specimen.positions_A[si, :2].min(axis=0) - 2.0), tuple(specimen.positions_A[si, :2].max(axis=0) + 2.0)
                )
                cands = cands[z[cands] == 6]
                tree = cKDTree(specimen.positions_A[cands, :2])
                for s in si:
                    for k in tree.query_ball_point(specimen.positions_A[s, :2], self.neighbour_cutoff_A):
                        out.append(("swap", int(cands[k]), int(s)))
            if self.cross_sections.at_energy("knock_on", e, 6) > 0:
                for c in near[z[near] == 6]:
                    out.append(("knock_on", int(c), -1))
        elif specimen.kind in TMD_LATTICE_A:
            role = specimen.site_role[specimen.site_of_atom[near]]
            for a in near[role == 1]:
                out.append(("sputter", int(a), -1))
        return out

    def _sigma(self, kind: str, struck_z: int) -> float:
        key = (kind, int(struck_z))
        v = self._sigma_cache.get(key)
        if v is None:
            v = self._sigma_cache[key] = self.cross_sections.at_energy(kind, self.optics.energy_keV, int(struck_z))
        return v

    def _apply(self, specimen: Specimen, kind: str, struck: int, partner: int, t: float,
               beam: tuple[float, float] | None, during: str) -> Event:
        pos = specimen.positions_A
        if kind == "swap":
            si, c = partner, struck
            before = (tuple(pos[si, :2]), tuple(pos[c, :2]))
            pos[[si, c], :2] = pos[[c, si], :2]
            specimen.site_of_atom[[si, c]] = specimen.site_of_atom[[c, si]]
            after = (tuple(pos[si, :2]), tuple(pos[c, :2]))
            return Event(t, kind, (si, c), before, after, beam, during)
        specimen.present[struck] = False
        p = (tuple(pos[struck, :2]),)
        return Event(t, kind, (struck,), p, p, beam, during)

    # --- scans ------------------------------------------------------------------------
    def scan_events(self, specimen: Specimen, atom_ids: np.ndarray, atom_times_s: np.ndarray, dose_e_per_A2: float,
                    rng: np.random.Generator) -> list[Event]:
        """Events during a raster that gave every atom in ``atom_ids`` the areal ``dose_e_per_A2``;
        each happens when the beam passes the struck atom (``atom_times_s``). Applied in time order."""
        if not self.enabled or dose_e_per_A2 <= 0 or len(atom_ids) == 0:
            return []
        t_of = dict(zip(atom_ids.tolist(), atom_times_s.tolist()))
        chans = self._channels(specimen, atom_ids)
        drawn: list[tuple[float, str, int, int]] = []
        by_partner: dict[int, list[tuple[float, str, int, int]]] = {}
        chans = [c for c in chans if c[1] in t_of]
        if not chans:
            return []
        p = -np.expm1(-np.array([self._sigma(k, int(specimen.numbers[a])) for k, a, _ in chans]) * dose_e_per_A2)
        hit = rng.random(len(chans)) < p
        for j in np.flatnonzero(hit):
            kind, struck, partner = chans[j]
            item = (t_of[struck], kind, struck, partner)
            if partner >= 0:
                by_partner.setdefault(partner, []).append(item)
            else:
                drawn.append(item)
        for items in by_partner.values():  # one swap per Si per frame: the first neighbour hit
            drawn.append(min(items))
        events: list[Event] = []
        used: set[int] = set()
        for t, kind, struck, partner in sorted(drawn):
            if struck in used or (partner >= 0 and partner in used) or not specimen.present[struck]:
                continue
            used.add(struck)
            if partner >= 0:
                used.add(partner)
            events.append(self._apply(specimen, kind, struck, partner, t, None, "scan"))
        return events

    # --- parks ------------------------------------------------------------------------
    def park_events(self, specimen: Specimen, beam_sample_A: np.ndarray, times_s: np.ndarray,
                    rng: np.random.Generator, during: str = "park") -> list[Event]:
        """Events while the beam sits at ``beam_sample_A[k]`` (sample frame) during
        ``[times_s[k], times_s[k+1])`` for each interval ``k`` (``beam_sample_A`` has one row
        fewer than ``times_s``). Gillespie within piecewise-constant rates."""
        events: list[Event] = []
        if not self.enabled:
            return events
        flux = self.electrons_per_s
        chans: list[tuple[str, int, int]] = []
        rates = np.zeros(0)
        centre_of_chans: np.ndarray | None = None
        for k in range(len(times_s) - 1):
            b = beam_sample_A[k]
            if centre_of_chans is None or np.linalg.norm(b - centre_of_chans) > 0.5:
                near = specimen.in_box(tuple(b - self.reach_A), tuple(b + self.reach_A))
                chans = self._channels(specimen, near)
                centre_of_chans = b.copy()
            t, t_end = float(times_s[k]), float(times_s[k + 1])
            while True:
                if not chans:
                    break
                struck = np.array([c[1] for c in chans])
                sig = np.array([self._sigma(c[0], int(specimen.numbers[c[1]])) for c in chans])
                rates = sig * flux * self.probe_density(specimen.positions_A[struck, :2] - b)
                total = float(rates.sum())
                if total <= 0:
                    break
                t = t + rng.exponential(1.0 / total)
                if t >= t_end:
                    break
                j = int(rng.choice(len(chans), p=rates / total))
                kind, s, partner = chans[j]
                events.append(self._apply(specimen, kind, s, partner, t, (float(b[0]), float(b[1])), during))
                near = specimen.in_box(tuple(b - self.reach_A), tuple(b + self.reach_A))
                chans = self._channels(specimen, near)
        return events
