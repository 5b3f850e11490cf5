"""Perovskite projections: SrTiO3 [001] and a ferroelectric film with domain walls.

Both use one column per projected site (A cation, B cation + apical O, pure O) with
``n_cells`` atoms of each kind stacked along the beam, labels ``("A", "B", "O", "vacancy")``.

The ferroelectric film is PbTiO3-like: the B (Ti) and O columns are displaced along ``y`` by
``+-displacement`` according to the local polarisation ``p(x, y)`` in ``[-1, 1]``. Vertical
180-degree domain walls separate up and down domains. Along each wall, every unit-cell row
gets a *motif* (how the wall looks in that row: sharp, broad, kinked left or right), drawn by a
:class:`MotifChain` — a pluggable object; the default :class:`MarkovMotifChain` is a first-order
Markov chain over motifs. The motif-analysis issue's domain-boundary model can replace it by
implementing the same two members (``motifs`` and ``sample``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from stemagent.simulators.elements import atomic_number
from stemagent.simulators.specimen import Specimen

PEROVSKITE_CLASSES = ("A", "B", "O", "vacancy")


@dataclass(frozen=True)
class WallMotif:
    """One row's wall geometry: shift of the wall (in unit cells) from the previous row, and the
    half-width of its polarisation profile ``tanh(dx / width)`` in unit cells."""

    shift_cells: int = 0
    width_cells: float = 0.4


@runtime_checkable
class MotifChain(Protocol):
    """Generates the sequence of wall motifs along a wall, one per unit-cell row."""

    motifs: Mapping[str, WallMotif]

    def sample(self, n: int, rng: np.random.Generator) -> Sequence[str]:
        """``n`` motif names (keys of ``motifs``), in row order."""
        ...


def _default_motifs() -> dict[str, WallMotif]:
    return {
        "sharp": WallMotif(0, 0.4),
        "broad": WallMotif(0, 1.5),
        "kink_left": WallMotif(-1, 0.6),
        "kink_right": WallMotif(1, 0.6),
    }


@dataclass
class MarkovMotifChain:
    """First-order Markov chain over wall motifs.

    ``names`` order the rows/columns of ``transition`` (row-stochastic) and ``initial``.
    """

    motifs: dict[str, WallMotif] = field(default_factory=_default_motifs)
    names: tuple[str, ...] = ("sharp", "broad", "kink_left", "kink_right")
    transition: np.ndarray = field(
        default_factory=lambda: np.array(
            [
                [0.80, 0.10, 0.05, 0.05],
                [0.30, 0.60, 0.05, 0.05],
                [0.50, 0.10, 0.40, 0.00],
                [0.50, 0.10, 0.00, 0.40],
            ]
        )
    )
    initial: np.ndarray = field(default_factory=lambda: np.array([0.7, 0.2, 0.05, 0.05]))

    def __post_init__(self) -> None:
        t = np.asarray(self.transition, dtype=np.float64)
        k = len(self.names)
        if t.shape != (k, k) or np.any(t < 0) or not np.allclose(t.sum(axis=1), 1.0):
            raise ValueError(f"transition={t.tolist()!r}: must be a row-stochastic {k}x{k} matrix")
        if any(n not in self.motifs for n in self.names):
            raise ValueError(f"names={self.names!r}: every name needs a motif in motifs")
        self.transition = t
        self.initial = np.asarray(self.initial, dtype=np.float64) / np.sum(self.initial)

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        out: list[str] = []
        state = int(rng.choice(len(self.names), p=self.initial))
        for _ in range(n):
            out.append(self.names[state])
            state = int(rng.choice(len(self.names), p=self.transition[state]))
        return out


def _perovskite_columns(a: float, size_A: tuple[float, float], center_A: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column sites ``(M, 2)``, role ``(M,)`` (0 A, 1 B, 2 O) and cell row index ``(M,)``."""
    w, h = size_A
    nx = int(math.floor(w / a))
    ny = int(math.floor(h / a))
    i, j = np.meshgrid(np.arange(nx), np.arange(ny), indexing="xy")
    i = i.reshape(-1)
    j = j.reshape(-1)
    origin = np.asarray(center_A) - np.array([nx * a, ny * a]) / 2.0 + a / 4.0
    cell = np.stack([i, j], axis=1) * a + origin
    offsets = np.array([[0.0, 0.0], [0.5, 0.5], [0.5, 0.0], [0.0, 0.5]]) * a
    roles = np.array([0, 1, 2, 2])
    sites = (cell[:, None, :] + offsets[None]).reshape(-1, 2)
    role = np.tile(roles, len(cell))
    rows = np.repeat(j, 4)
    return sites, role, rows


def _stack_columns(
    sites: np.ndarray,
    role: np.ndarray,
    a: float,
    n_cells: int,
    a_number: int,
    b_number: int,
    o_number: int,
    u_rms: dict[int, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atoms of the columns: positions ``(N, 3)``, numbers ``(N,)``, site index ``(N,)``."""
    pos_l: list[np.ndarray] = []
    num_l: list[np.ndarray] = []
    site_l: list[np.ndarray] = []
    zc = np.arange(n_cells) * a
    for r, species in ((0, [(a_number, 0.0)]), (1, [(b_number, 0.5), (o_number, 0.0)]), (2, [(o_number, 0.5)])):
        idx = np.flatnonzero(role == r)
        for z_num, dz in species:
            p = np.zeros((len(idx), n_cells, 3))
            p[:, :, :2] = sites[idx][:, None, :]
            p[:, :, 2] = zc[None, :] + dz * a
            pos_l.append(p.reshape(-1, 3))
            num_l.append(np.full(len(idx) * n_cells, z_num, dtype=np.int64))
            site_l.append(np.repeat(idx, n_cells))
    return np.concatenate(pos_l), np.concatenate(num_l), np.concatenate(site_l)


def _finish(
    kind: str,
    sites: np.ndarray,
    role: np.ndarray,
    pos: np.ndarray,
    numbers: np.ndarray,
    site_of: np.ndarray,
    a_number: int,
    b_number: int,
    o_number: int,
    n_cells: int,
    u_rms: dict[int, float],
    size_A: tuple[float, float],
    center_A: tuple[float, float],
    rng: np.random.Generator,
    oxygen_vacancy_fraction: float,
    extras: dict,
) -> Specimen:
    present = np.ones(len(numbers), dtype=bool)
    if oxygen_vacancy_fraction > 0:
        ox = np.flatnonzero(numbers == o_number)
        present[ox[rng.random(len(ox)) < oxygen_vacancy_fraction]] = False
    host = np.where(role == 0, a_number, np.where(role == 1, b_number, o_number)).astype(np.int64)
    count = np.where(role == 1, 2 * n_cells, n_cells).astype(np.int64)
    u = np.array([u_rms.get(int(z), 0.08) for z in numbers])
    w, h = size_A
    return Specimen(
        kind=kind,
        positions_A=pos,
        numbers=numbers,
        present=present,
        site_of_atom=site_of,
        sites_A=sites,
        site_role=role.astype(np.int64),
        u_rms_A=u,
        class_names=PEROVSKITE_CLASSES,
        host_number=host,
        host_count=count,
        extent_A=(center_A[0] - w / 2, center_A[0] + w / 2, center_A[1] - h / 2, center_A[1] + h / 2),
        extras=extras,
    )


def srtio3(
    size_A: tuple[float, float] = (100.0, 100.0),
    center_A: tuple[float, float] = (0.0, 0.0),
    rng: np.random.Generator | None = None,
    n_cells: int = 10,
    oxygen_vacancy_fraction: float = 0.0,
) -> Specimen:
    """SrTiO3 viewed along [001], ``n_cells`` unit cells thick (a = 3.905 Å)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    a = 3.905
    sr, ti, o = atomic_number("Sr"), atomic_number("Ti"), atomic_number("O")
    u = {sr: 0.08, ti: 0.07, o: 0.09}
    sites, role, _ = _perovskite_columns(a, size_A, center_A)
    pos, num, site_of = _stack_columns(sites, role, a, n_cells, sr, ti, o, u)
    return _finish("srtio3", sites, role, pos, num, site_of, sr, ti, o, n_cells, u, size_A, center_A, rng,
                   oxygen_vacancy_fraction, {"lattice_A": a, "n_cells": n_cells})


def ferroelectric_film(
    size_A: tuple[float, float] = (120.0, 120.0),
    center_A: tuple[float, float] = (0.0, 0.0),
    rng: np.random.Generator | None = None,
    n_cells: int = 8,
    domain_width_A: float = 30.0,
    displacement_A: float = 0.3,
    motif_chain: MotifChain | None = None,
    oxygen_vacancy_fraction: float = 0.0,
    polarization_variants: Sequence[tuple[float, float]] | None = None,
) -> Specimen:
    """PbTiO3-like film with vertical 180-degree walls every ``domain_width_A`` along x.

    ``polarization_variants``: unit directions ``(dx, dy)`` of the B-site displacement; domain ``k``
    (counted from the left) takes variant ``k % len(variants)`` and the walls blend neighbouring
    variants with the wall motif's profile. None (the default) keeps the up/down film exactly as
    before (variants ``(0, 1), (0, -1)``).

    Ground truth extras: ``polarization`` ``(M,)`` (p in [-1, 1] at B sites, 0 elsewhere: the
    y component of the displacement direction), ``wall_motifs`` (list per wall of motif names per
    cell row), ``wall_x_A`` ``(walls, rows)``, ``row_y_A`` ``(rows,)``; per site (all columns of a
    cell share them): ``domain`` ``(M,)`` the stripe index (0 = leftmost), ``variant`` ``(M,)`` the
    polarisation variant of that stripe (index into ``variant_vectors``), ``polarization_vector``
    ``(M, 2)`` the blended unit displacement direction, and ``polarization_strength`` ``(M,)`` in
    [0, 1] (1 inside a domain, 0 at the centre of a wall).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    chain: MotifChain = motif_chain if motif_chain is not None else MarkovMotifChain()
    a = 3.9
    pb, ti, o = atomic_number("Pb"), atomic_number("Ti"), atomic_number("O")
    u = {pb: 0.09, ti: 0.07, o: 0.09}
    sites, role, rows = _perovskite_columns(a, size_A, center_A)
    n_rows = int(rows.max()) + 1
    w = size_A[0]
    x0 = center_A[0] - w / 2.0
    n_walls = max(1, int(w // domain_width_A))
    base_x = x0 + (np.arange(n_walls) + 0.5) * (w / n_walls)
    wall_x = np.zeros((n_walls, n_rows))
    wall_w = np.zeros((n_walls, n_rows))
    wall_motifs: list[list[str]] = []
    for k in range(n_walls):
        names = list(chain.sample(n_rows, rng))
        wall_motifs.append(names)
        off = 0
        for j, name in enumerate(names):
            m = chain.motifs[name]
            off = int(np.clip(off + m.shift_cells, -3, 3))  # walls wander at most 3 cells
            wall_x[k, j] = base_x[k] + off * a
            wall_w[k, j] = m.width_cells * a
    # polarisation: product of tanh profiles, alternating sign across walls
    xs = sites[:, 0]
    p = np.ones(len(sites))
    for k in range(n_walls):
        dx = xs - wall_x[k, rows]
        p *= -np.tanh(dx / wall_w[k, rows])
    # left of every wall each factor is +1: the leftmost domain points up (+y)
    # domain membership of every site: stripe k lies between walls k-1 and k
    right = np.stack([0.5 * (1.0 + np.tanh((xs - wall_x[k, rows]) / wall_w[k, rows])) for k in range(n_walls)])
    member = np.empty((n_walls + 1, len(sites)))
    left_of = np.ones(len(sites))
    for k in range(n_walls + 1):
        past = right[k] if k < n_walls else np.zeros(len(sites))
        member[k] = left_of * (1.0 - past)
        left_of = left_of * past
    vectors = np.asarray(polarization_variants if polarization_variants is not None else ((0.0, 1.0), (0.0, -1.0)), dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[1] != 2 or len(vectors) < 1:
        raise ValueError(f"polarization_variants={polarization_variants!r}: must be a list of (dx, dy) directions")
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    stripe_variant = np.arange(n_walls + 1) % len(vectors)
    domain = np.argmax(member, axis=0)
    pos, num, site_of = _stack_columns(sites, role, a, n_cells, pb, ti, o, u)
    shift = np.zeros(len(sites))
    shift[role == 1] = displacement_A
    shift[role == 2] = 1.5 * displacement_A
    sites = sites.copy()
    if polarization_variants is None:
        pol_vec = np.stack([np.zeros(len(sites)), p], axis=1)
        strength = np.abs(p)
        pos[:, 1] += (p * shift)[site_of]
        sites[:, 1] += p * shift
    else:
        pol_vec = member.T @ vectors[stripe_variant]  # (M, 2) blended direction
        strength = 2.0 * member.max(axis=0) - 1.0
        p = pol_vec[:, 1]
        pos[:, :2] += (pol_vec * shift[:, None])[site_of]
        sites += pol_vec * shift[:, None]
    y0 = center_A[1] - n_rows * a / 2.0 + a / 4.0
    extras = {
        "lattice_A": a,
        "n_cells": n_cells,
        "polarization": np.where(role == 1, p, 0.0),
        "wall_motifs": wall_motifs,
        "wall_x_A": wall_x,
        "row_y_A": y0 + np.arange(n_rows) * a,
        "domain": domain.astype(np.int64),
        "variant": stripe_variant[domain].astype(np.int64),
        "variant_vectors": vectors,
        "polarization_vector": pol_vec,
        "polarization_strength": np.clip(strength, 0.0, 1.0),
    }
    return _finish("film", sites, role, pos, num, site_of, pb, ti, o, n_cells, u, size_A, center_A, rng,
                   oxygen_vacancy_fraction, extras)
