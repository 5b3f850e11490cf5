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

The swap rate is pluggable (:mod:`.hop_rates`): with ``swap_rate`` set, a swap's rate is that
model's probability per electron for the beam's offset from the struck C and the Si–C bond
direction (and its raster cross-section during scans) instead of ``sigma * P(r)``; ``None``
keeps the physical default.

Common random numbers (``event_clocks``, off by default): with a :class:`ChannelClocks` set, the
events are not drawn from the caller's generator but from per-channel clocks (the modified next
reaction method of Anderson, J. Chem. Phys. 127 (2007) 214107): every channel, named by its
*sites* (a swap of the Si on site ``a`` into site ``b``; a knock-on at site ``a``), accumulates
its integrated rate (the hazard, ``∫ rate dt`` during parks and idle beam, ``sigma * dose``
during scans) and fires when that passes a unit-exponential threshold; the ``n``-th threshold of
a channel is drawn from a generator seeded by ``(seed, kind, a, b, n)``. The process has the same
law (each channel is a Poisson process in its own integrated rate, the time of the first firing
is the Gillespie time), but two runs of the same twin seed under different beam policies now
face the *same* thresholds: a policy that puts the same hazard on the same bond gets the same
hop, whatever else it did in between. That pairs the comparison of policies within a seed
(``TwinConfig.common_random_numbers``); shot noise and scan jitter stay on the caller's generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.ndimage import map_coordinates
from scipy.spatial import cKDTree

from stemagent.simulators.elements import mass_u
from stemagent.simulators.hop_rates import SwapRateModel, bond_offsets
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


_KIND_CODE = {"swap": 0, "knock_on": 1, "sputter": 2}


@dataclass
class ChannelClocks:
    """Per-channel unit-rate clocks: the common random numbers of the event draws (module docstring).

    ``state[key] = [hazard, threshold, firings]`` with ``key = (kind code, site a, site b + 1)``
    (``b = -1`` for single-atom events); a channel fires when its hazard reaches its threshold,
    which then grows by the next unit exponential of that channel's own stream."""

    seed: int
    state: dict[tuple[int, int, int], list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= int(self.seed) < 2**63:
            raise ValueError(f"seed={self.seed!r}: must be an integer in [0, 2**63)")

    def _threshold(self, key: tuple[int, int, int], n: int) -> float:
        return float(np.random.default_rng([int(self.seed), *key, n]).exponential())

    def key(self, specimen: Specimen, kind: str, struck: int, partner: int) -> tuple[int, int, int]:
        """The channel's key by sites: a swap is the Si's site (``partner``) into the C's site (``struck``)."""
        site = specimen.site_of_atom
        if partner >= 0:
            return _KIND_CODE[kind], int(site[partner]), int(site[struck]) + 1
        return _KIND_CODE[kind], int(site[struck]), 0

    def get(self, keys: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Hazards and thresholds of ``keys`` (new channels start at hazard 0 with their first threshold)."""
        h, p = np.empty(len(keys)), np.empty(len(keys))
        for i, k in enumerate(keys):
            st = self.state.get(k)
            if st is None:
                st = self.state[k] = [0.0, self._threshold(k, 0), 0]
            h[i], p[i] = st[0], st[1]
        return h, p

    def put(self, keys: list[tuple[int, int, int]], hazards: np.ndarray) -> None:
        for k, v in zip(keys, hazards):
            self.state[k][0] = float(v)

    def fire(self, key: tuple[int, int, int]) -> float:
        """Record a firing of ``key``; returns its next threshold (past its hazard)."""
        st = self.state[key]
        while st[1] <= st[0]:
            st[2] += 1
            st[1] += self._threshold(key, int(st[2]))
        return st[1]


@dataclass
class BeamDynamics:
    """Samples and applies beam-induced events to a :class:`Specimen` (mutated in place)."""

    optics: ProbeOptics
    beam_current_pA: float
    cross_sections: CrossSections = field(default_factory=CrossSections)
    enabled: bool = True
    reach_A: float = 4.0  # atoms farther than this from a parked beam are ignored
    neighbour_cutoff_A: float = 1.75
    swap_rate: SwapRateModel | None = None  # None: the physical sigma * P(r)
    event_clocks: ChannelClocks | None = None  # common random numbers for the events; None: draw from the rng
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
        sig = np.array([self._sigma(k, int(specimen.numbers[a])) for k, a, _ in chans])
        if self.swap_rate is not None:
            sw = np.array([k == "swap" for k, _, _ in chans])
            if sw.any():
                swapped = np.array([a for k, a, _ in chans if k == "swap"])
                sig[sw] = self.swap_rate.scan_cross_section_A2(specimen.site_of_atom[swapped])
        if self.event_clocks is not None:
            keys = [self.event_clocks.key(specimen, k, a, b) for k, a, b in chans]
            h, thr = self.event_clocks.get(keys)
            h = h + sig * dose_e_per_A2
            self.event_clocks.put(keys, h)
            hit = h >= thr
            for j in np.flatnonzero(hit):
                self.event_clocks.fire(keys[j])
        else:
            p = -np.expm1(-sig * dose_e_per_A2)
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
        if self.event_clocks is not None:
            return self._park_events_clocked(specimen, beam_sample_A, times_s, during)
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
                rates = self._park_rates(specimen, chans, b, flux)
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

    def _park_events_clocked(self, specimen: Specimen, beam_sample_A: np.ndarray, times_s: np.ndarray,
                             during: str) -> list[Event]:
        """:meth:`park_events` on the channel clocks (common random numbers): within each interval
        the next event is the channel whose hazard reaches its threshold first at the current rates."""
        clocks = self.event_clocks
        assert clocks is not None
        events: list[Event] = []
        flux = self.electrons_per_s
        chans: list[tuple[str, int, int]] = []
        keys: list[tuple[int, int, int]] = []
        centre_of_chans: np.ndarray | None = None

        def load(b: np.ndarray) -> None:
            nonlocal chans, keys
            near = specimen.in_box(tuple(b - self.reach_A), tuple(b + self.reach_A))
            chans = self._channels(specimen, near)
            keys = [clocks.key(specimen, k, a, p) for k, a, p in chans]

        for k in range(len(times_s) - 1):
            b = beam_sample_A[k]
            if centre_of_chans is None or np.linalg.norm(b - centre_of_chans) > 0.5:
                load(b)
                centre_of_chans = b.copy()
            t, t_end = float(times_s[k]), float(times_s[k + 1])
            while chans:
                rates = self._park_rates(specimen, chans, b, flux)
                h, thr = clocks.get(keys)
                with np.errstate(divide="ignore"):
                    wait = np.where(rates > 0, (thr - h) / np.where(rates > 0, rates, 1.0), np.inf)
                j = int(np.argmin(wait))
                if not t + wait[j] < t_end:
                    clocks.put(keys, h + rates * (t_end - t))
                    break
                h = h + rates * wait[j]
                h[j] = thr[j]  # exactly at its threshold (no rounding short of it)
                clocks.put(keys, h)
                clocks.fire(keys[j])
                t = t + float(wait[j])
                kind, s, partner = chans[j]
                events.append(self._apply(specimen, kind, s, partner, t, (float(b[0]), float(b[1])), during))
                load(b)
        return events

    def _park_rates(self, specimen: Specimen, chans: list[tuple[str, int, int]], b: np.ndarray, flux: float) -> np.ndarray:
        """Rate (1/s) of each channel with the beam at ``b`` (sample frame)."""
        struck = np.array([c[1] for c in chans])
        sig = np.array([self._sigma(c[0], int(specimen.numbers[c[1]])) for c in chans])
        rates = sig * flux * self.probe_density(specimen.positions_A[struck, :2] - b)
        if self.swap_rate is not None:
            sw = np.flatnonzero([c[0] == "swap" for c in chans])
            if len(sw):
                c_ids = struck[sw]
                si_ids = np.array([chans[j][2] for j in sw])
                off, unit = bond_offsets(b, specimen.positions_A[si_ids, :2], specimen.positions_A[c_ids, :2])
                rates[sw] = flux * self.swap_rate.per_electron(off, unit, specimen.site_of_atom[c_ids])
        return rates
