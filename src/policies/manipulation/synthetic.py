"""A synthetic hop environment: the manipulation policy's test double, no microscope and no twin.

A perfect graphene lattice with one dopant; a hop-rate function of the beam's bond-frame
offset ``rate_fn(along_A, across_A) -> 1/s`` (the same for every bond); parks drawn as a
continuous-time Markov chain over the dopant's bonds (hops to any neighbour, hops back);
a park signal that steps when the dopant moves (shot noise on a level that rises as the dopant
nears the beam) and confirmation "frames" that return the atoms inside the field with their
classes (position noise, no misses). It speaks the policy's language: :class:`Observation`,
:class:`ParkResult`. Deterministic given its seed.

Used by the unit tests and to tune the policy quickly; the digital twin (``stemagent.simulators``)
is the physical benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from stemagent.policies.manipulation.lattice import GRAPHENE_BOND_A
from stemagent.stages import Observation
from stemagent.types import Atoms, Park, ParkResult, ScanGeometry, ScanRegion

RateFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def graphene_sites(size_A: float) -> np.ndarray:
    """``(n, 2)`` graphene site positions filling a square of side ``size_A`` centred at the origin
    (a site at the origin)."""
    a = GRAPHENE_BOND_A * math.sqrt(3.0)
    a1 = np.array([a, 0.0])
    a2 = np.array([a / 2.0, a * math.sqrt(3.0) / 2.0])
    n = int(size_A / a) + 4
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    base = i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2
    pts = np.concatenate([base, base + np.array([a / 2.0, a / (2.0 * math.sqrt(3.0))])])
    return pts[np.all(np.abs(pts) <= size_A / 2.0, axis=1)]


def bump_rate(peak_per_s: float, along_A: float, across_A: float, width_A: float, floor_per_s: float = 0.0) -> RateFn:
    """A Gaussian bump of hop rate at ``(along_A, across_A)`` plus a constant floor."""

    def fn(along: np.ndarray, across: np.ndarray) -> np.ndarray:
        r2 = (np.asarray(along) - along_A) ** 2 + (np.asarray(across) - across_A) ** 2
        return floor_per_s + peak_per_s * np.exp(-r2 / (2.0 * width_A**2))

    return fn


@dataclass
class SyntheticHopEnv:
    rate_fn: RateFn
    seed: int = 0
    size_A: float = 40.0
    sample_interval_s: float = 1e-3
    counts_far: float = 300.0  # park signal per sample with the dopant far from the beam
    counts_near: float = 900.0  # extra signal with the dopant under the beam
    position_noise_A: float = 0.03
    dose_per_s: float = 1.5e8
    sites_A: np.ndarray = field(init=False)
    dopant: int = field(init=False)
    hops: list[tuple[float, int, int]] = field(default_factory=list, init=False)  # (time, from, to)
    time_s: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.sites_A = graphene_sites(self.size_A)
        self.dopant = int(np.argmin(np.linalg.norm(self.sites_A, axis=1)))
        d = np.linalg.norm(self.sites_A[:, None, :] - self.sites_A[None, :, :], axis=2)
        self.neighbours = [np.flatnonzero((r > 0.5) & (r < GRAPHENE_BOND_A + 0.3)) for r in d]

    # --- what the policy sees -------------------------------------------------------------------
    def _atoms(self, geometry: ScanGeometry) -> Atoms:
        inside = np.flatnonzero(geometry.contains(self.sites_A))
        pos = self.sites_A[inside] + self.rng.normal(0.0, self.position_noise_A, (len(inside), 2))
        classes = (inside == self.dopant).astype(np.int64)
        return Atoms(pos, classes, np.ones(len(inside)), 0, class_names=("C", "Si", "vacancy"))

    def observe(self, geometry: ScanGeometry) -> Observation:
        """A frame of ``geometry``: the atoms inside it, as a segmenter with classes would report them."""
        return Observation(frame_index=0, time_s=self.time_s, geometry=geometry, atoms=self._atoms(geometry))

    def survey(self, fov_A: float = 20.0) -> Observation:
        g = ScanGeometry(center_A=(0.0, 0.0), fov_A=(fov_A, fov_A), shape_px=(100, 100), dwell_s=1e-6)
        return self.observe(g)

    # --- the physics ---------------------------------------------------------------------------
    def rates(self, beam_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of the dopant and the hop rate (1/s) to each with the beam at ``beam_A``."""
        s = self.dopant
        nb = self.neighbours[s]
        u = self.sites_A[nb] - self.sites_A[s]
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        d = np.asarray(beam_A, float)[None, :] - self.sites_A[nb]
        along = (d * u).sum(axis=1)
        across = -d[:, 0] * u[:, 1] + d[:, 1] * u[:, 0]
        return nb, np.maximum(self.rate_fn(along, across), 0.0)

    def park(self, position_A: tuple[float, float], dwell_s: float) -> ParkResult:
        beam = np.asarray(position_A, float)
        n = max(1, int(round(dwell_s / self.sample_interval_s)))
        dt = dwell_s / n
        t_samples = (np.arange(n) + 0.5) * dt
        level = np.empty(n)
        t = 0.0
        start = self.time_s
        while True:
            nb, r = self.rates(beam)
            total = float(r.sum())
            t_next = t + (self.rng.exponential(1.0 / total) if total > 0 else math.inf)
            seg = (t_samples >= t) & (t_samples < min(t_next, dwell_s))
            dist = np.linalg.norm(self.sites_A[self.dopant] - beam)
            level[seg] = self.counts_far + self.counts_near * math.exp(-(dist**2) / (2 * 0.45**2))
            if t_next >= dwell_s:
                break
            k = int(self.rng.choice(len(nb), p=r / total))
            self.hops.append((start + t_next, self.dopant, int(nb[k])))
            self.dopant = int(nb[k])
            t = t_next
        self.time_s = start + dwell_s
        signal = self.rng.poisson(level).astype(np.float64)
        return ParkResult(position_A=(float(beam[0]), float(beam[1])), dwell_s=float(dwell_s), start_time_s=start,
                          sample_interval_s=dt, signal=signal, dose_e_per_A2=self.dose_per_s * dwell_s)


def drive(policy: object, env: SyntheticHopEnv, max_commands: int = 10000, survey_fov_A: float = 20.0) -> int:
    """Run ``policy`` (a :class:`~stemagent.policies.manipulation.ManipulationPolicy`) against
    ``env`` until it blanks or ``max_commands`` are spent; returns the number of commands."""
    decision = policy.decide(env.survey(survey_fov_A))  # type: ignore[attr-defined]
    for k in range(max_commands):
        cmd = decision.command
        if isinstance(cmd, Park):
            decision = policy.observe_park(env.park(cmd.position_A, cmd.dwell_s))  # type: ignore[attr-defined]
        elif isinstance(cmd, ScanRegion):
            decision = policy.decide(env.observe(cmd.geometry))  # type: ignore[attr-defined]
        else:
            return k
    return max_commands
