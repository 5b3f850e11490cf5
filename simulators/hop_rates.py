"""Pluggable Si–C swap rates: how likely a parked beam makes a Si dopant hop, as a function of
where the beam sits relative to the Si–C bond.

A swap channel is a (Si, C neighbour) pair; the struck atom is the C. Its rate with the beam at
``b`` is ``electrons_per_s * q(b - C, u) * site_factor``: ``q`` is a probability per electron
(a cross-section weighted by where the beam is) of the beam's offset ``b - C`` (sample frame)
and the unit bond vector ``u`` from the Si to the C. Models of the bond's own response use the
*bond frame*: ``along = (b - C)·u`` (positive: beyond the C, away from the Si) and ``across``
on ``u`` turned by +90° (:func:`to_bond_frame`); the physical model uses the sample-frame offset
(an astigmatic probe is not turned with the bond). Every model also gives the raster-scan cross-section (the integral of ``q`` over offsets), so
a scan that spreads its dose evenly stays consistent with the park rates.

Models:

- :class:`PhysicalSwapRate`: ``q = sigma(E) * P(offset)`` with ``P`` the probe intensity; this is
  what :class:`~stemagent.simulators.dynamics.BeamDynamics` does when no model is plugged in.
- :class:`EmpiricalSwapRate`: a smooth bump in offset, peaking a little beyond the C along the
  bond and wider across it: the shape of the hop-probability maps reported for 60 keV beams
  parked near a Si–C bond (stylised; the parameters are fields, not fitted values).
- :class:`RandomBumpSwapRate`: a mixture of Gaussian bumps at random places in offset space with
  random widths and weights plus a small probe-shaped part, sampled per seed by
  :func:`sample_random_swap_rate`: a rate function no policy can know in advance.

Every model can carry site-to-site variation: a log-normal factor per lattice site of the struck
C, drawn from ``(seed, site)`` so it is the same whenever that site is struck again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import numpy as np

ProbeDensity = Callable[[np.ndarray], np.ndarray]  # (n, 2) offsets in Å -> (n,) probe intensity in 1/Å²


def to_bond_frame(offset_A: np.ndarray, bond_unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(along, across)`` ``(n,)`` of sample-frame offsets ``(n, 2)`` for unit bond vectors ``(n, 2)``."""
    d = np.asarray(offset_A, float).reshape(-1, 2)
    u = np.asarray(bond_unit, float).reshape(-1, 2)
    return d[:, 0] * u[:, 0] + d[:, 1] * u[:, 1], -d[:, 0] * u[:, 1] + d[:, 1] * u[:, 0]


def from_bond_frame(along_A: np.ndarray, across_A: np.ndarray, bond_unit: np.ndarray) -> np.ndarray:
    """Sample-frame offsets ``(n, 2)`` of bond-frame ``(along, across)`` for unit bond vectors ``(n, 2)``."""
    u = np.asarray(bond_unit, float).reshape(-1, 2)
    a = np.asarray(along_A, float).reshape(-1, 1)
    c = np.asarray(across_A, float).reshape(-1, 1)
    return a * u + c * np.stack([-u[:, 1], u[:, 0]], axis=1)


@runtime_checkable
class SwapRateModel(Protocol):
    """Probability per electron of a Si–C swap for a beam offset from the struck C."""

    def per_electron(self, offset_A: np.ndarray, bond_unit: np.ndarray, sites: np.ndarray) -> np.ndarray:
        """``(n,)`` swap probability per beam electron (dimensionless) for beam offsets ``b - C``
        ``(n, 2)`` (sample frame, Å), unit Si→C bond vectors ``(n, 2)`` and the struck C's lattice
        site indices ``sites`` ``(n,)``."""
        ...

    def scan_cross_section_A2(self, sites: np.ndarray) -> np.ndarray:
        """``(n,)`` swap cross-section (Å²) under a raster that gives the C an even areal dose."""
        ...

    def describe(self) -> dict:
        """The model and its parameters as a plain mapping (for ground truth and logs)."""
        ...


@dataclass
class SiteVariation:
    """A log-normal factor per lattice site, ``exp(sigma * z)`` with ``z ~ N(0, 1)`` from ``(seed, site)``."""

    sigma: float = 0.0
    seed: int = 0
    _cache: dict[int, float] = field(default_factory=dict, init=False, repr=False)

    def __call__(self, sites: np.ndarray) -> np.ndarray:
        s = np.asarray(sites, dtype=np.int64).reshape(-1)
        if self.sigma <= 0:
            return np.ones(len(s))
        out = np.empty(len(s))
        for k, site in enumerate(s.tolist()):
            v = self._cache.get(site)
            if v is None:
                z = float(np.random.default_rng([self.seed, 7919, site]).standard_normal())
                v = self._cache[site] = math.exp(self.sigma * z)
            out[k] = v
        return out


@dataclass
class PhysicalSwapRate:
    """``q = sigma * P(offset)``: the struck C is pushed out of plane by the electrons that hit it."""

    sigma_A2: float
    probe_density: ProbeDensity
    site_variation: SiteVariation = field(default_factory=SiteVariation)

    def per_electron(self, offset_A: np.ndarray, bond_unit: np.ndarray, sites: np.ndarray) -> np.ndarray:
        return self.sigma_A2 * self.probe_density(-np.asarray(offset_A, float).reshape(-1, 2)) * self.site_variation(sites)

    def scan_cross_section_A2(self, sites: np.ndarray) -> np.ndarray:
        return self.sigma_A2 * self.site_variation(sites)

    def in_bond_frame(self, along_A: np.ndarray, across_A: np.ndarray) -> np.ndarray:
        """``q`` at bond-frame offsets for a bond along +x, without site factors (for plots and oracles)."""
        off = np.stack([np.asarray(along_A, float).reshape(-1), np.asarray(across_A, float).reshape(-1)], axis=1)
        return self.sigma_A2 * self.probe_density(-off)

    def describe(self) -> dict:
        return {"model": "physical", "sigma_A2": self.sigma_A2, "site_sigma": self.site_variation.sigma}


@dataclass
class Bump:
    """One Gaussian bump in bond-frame offset space: weight, centre (Å) and widths (Å)."""

    weight: float
    along_A: float
    across_A: float
    width_along_A: float
    width_across_A: float

    def __call__(self, along: np.ndarray, across: np.ndarray) -> np.ndarray:
        return self.weight * np.exp(
            -0.5 * ((along - self.along_A) / self.width_along_A) ** 2 - 0.5 * ((across - self.across_A) / self.width_across_A) ** 2
        )

    @property
    def area_A2(self) -> float:
        return self.weight * 2.0 * math.pi * self.width_along_A * self.width_across_A


@dataclass
class BumpSwapRate:
    """``q = peak * (floor * P(offset) / P(0) + sum_k bump_k(offset))``; ``peak`` is a probability per electron."""

    peak_per_electron: float
    bumps: tuple[Bump, ...]
    probe_density: ProbeDensity
    floor: float = 0.0
    name: str = "bumps"
    site_variation: SiteVariation = field(default_factory=SiteVariation)

    def _shape(self, along: np.ndarray, across: np.ndarray) -> np.ndarray:
        out = np.zeros_like(along)
        for b in self.bumps:
            out = out + b(along, across)
        if self.floor > 0:
            p0 = float(self.probe_density(np.zeros((1, 2)))[0])
            out = out + self.floor * self.probe_density(np.stack([along, across], axis=1)) / p0
        return out

    def per_electron(self, offset_A: np.ndarray, bond_unit: np.ndarray, sites: np.ndarray) -> np.ndarray:
        a, c = to_bond_frame(offset_A, bond_unit)
        return self.peak_per_electron * self._shape(a, c) * self.site_variation(sites)

    def in_bond_frame(self, along_A: np.ndarray, across_A: np.ndarray) -> np.ndarray:
        """``q`` at bond-frame offsets, without site factors (for plots and oracles)."""
        return self.peak_per_electron * self._shape(np.asarray(along_A, float).reshape(-1), np.asarray(across_A, float).reshape(-1))

    def scan_cross_section_A2(self, sites: np.ndarray) -> np.ndarray:
        area = sum(b.area_A2 for b in self.bumps)
        if self.floor > 0:
            area += self.floor / float(self.probe_density(np.zeros((1, 2)))[0])
        return self.peak_per_electron * area * self.site_variation(sites)

    def describe(self) -> dict:
        return {
            "model": self.name,
            "peak_per_electron": self.peak_per_electron,
            "floor": self.floor,
            "bumps": [b.__dict__.copy() for b in self.bumps],
            "site_sigma": self.site_variation.sigma,
        }


def EmpiricalSwapRate(
    peak_per_electron: float,
    probe_density: ProbeDensity,
    along_A: float = 0.3,
    width_along_A: float = 0.35,
    width_across_A: float = 0.5,
    site_variation: SiteVariation | None = None,
) -> BumpSwapRate:
    """The stylised empirical map: one bump ``along_A`` beyond the C, wider across the bond than along it."""
    return BumpSwapRate(
        peak_per_electron=peak_per_electron,
        bumps=(Bump(1.0, along_A, 0.0, width_along_A, width_across_A),),
        probe_density=probe_density,
        floor=0.0,
        name="empirical",
        site_variation=site_variation or SiteVariation(),
    )


def sample_random_swap_rate(
    rng: np.random.Generator,
    peak_per_electron: float,
    probe_density: ProbeDensity,
    site_variation: SiteVariation | None = None,
    max_bumps: int = 3,
    radius_A: float = 1.2,
    min_along_A: float = -0.5,
    width_A: tuple[float, float] = (0.2, 0.45),
    floor: tuple[float, float] = (0.01, 0.1),
    peak_scale: tuple[float, float] = (0.5, 2.0),
) -> BumpSwapRate:
    """A random rate function: 1 to ``max_bumps`` bumps with centres uniform in the disc of
    ``radius_A`` around the C (keeping ``along >= min_along_A``, i.e. not over the Si), widths
    uniform in ``width_A`` along and across, weights 1 for the first and U(0.2, 1) for the rest,
    plus a probe-shaped part with a log-uniform ``floor`` weight; the whole scaled by a
    log-uniform factor in ``peak_scale`` on ``peak_per_electron``."""
    n = int(rng.integers(1, max_bumps + 1))
    bumps = []
    for k in range(n):
        while True:
            r = radius_A * math.sqrt(float(rng.random()))
            phi = 2 * math.pi * float(rng.random())
            a, c = r * math.cos(phi), r * math.sin(phi)
            if a >= min_along_A:
                break
        w = 1.0 if k == 0 else float(rng.uniform(0.2, 1.0))
        bumps.append(Bump(w, a, c, float(rng.uniform(*width_A)), float(rng.uniform(*width_A))))
    fl = math.exp(float(rng.uniform(math.log(floor[0]), math.log(floor[1]))))
    scale = math.exp(float(rng.uniform(math.log(peak_scale[0]), math.log(peak_scale[1]))))
    return BumpSwapRate(
        peak_per_electron=peak_per_electron * scale,
        bumps=tuple(bumps),
        probe_density=probe_density,
        floor=fl,
        name="random",
        site_variation=site_variation or SiteVariation(),
    )


def bond_offsets(beam_A: np.ndarray, si_A: np.ndarray, c_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets ``b - C`` ``(n, 2)`` of a beam position ``(2,)`` (or ``(n, 2)``) from the C of each bond
    ``si_A``/``c_A`` ``(n, 2)``, and the unit Si→C vectors ``(n, 2)``."""
    s = np.asarray(si_A, float).reshape(-1, 2)
    c = np.asarray(c_A, float).reshape(-1, 2)
    u = c - s
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    return np.asarray(beam_A, float).reshape(-1, 2) - c, u
