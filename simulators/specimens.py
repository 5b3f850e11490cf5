"""Specimens with complete ground truth: every atom's species, position and identity.

A :class:`Specimen` holds atoms (index = identity, never reused) and the lattice *sites* they
occupy. Atoms are never created or deleted: a sputtered atom keeps its row with
``present = False``; a Si-C swap exchanges the two atoms' positions and sites. Positions are
``(x, y, z)`` in Å in the sample frame; ``z`` is along the beam (used by multislice only).

Each site has a role (e.g. metal or chalcogen column) and a class label computed from what
occupies it now (:meth:`Specimen.site_labels`), which is the ground truth a segmenter learns.
The data model is :mod:`stemagent.simulators.specimen` (re-exported here).

Built-in specimens (this module and :mod:`stemagent.simulators.perovskites`):
``graphene`` (C with substitutional Si and vacancies), ``mos2`` / ``ws2`` (2H monolayers with
chalcogen vacancies and Se substitutions), ``srtio3`` ([001] projection), ``film`` (a
ferroelectric PbTiO3 film with domain walls; see perovskites). Specimens may be much larger than
a field of view; the scan centre selects what is seen.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from stemagent.simulators.elements import atomic_number, symbol
from stemagent.simulators import perovskites
from stemagent.simulators.boundary_film import boundary_film
from stemagent.simulators.specimen import TMD_LATTICE_A, Specimen

GRAPHENE_A = 2.46
GRAPHENE_CLASSES = ("C", "Si", "vacancy")
TMD_CLASSES = ("metal", "chalcogen", "substituted", "vacancy")
TMD_CHALCOGEN_Z_A = 1.56  # half the S-S distance along the beam


def specimen_from_atoms(
    xy_A: np.ndarray,
    numbers: np.ndarray,
    u_rms_A: float = 0.08,
    kind: str = "atoms",
    z_A: np.ndarray | None = None,
) -> Specimen:
    """A specimen of isolated atoms, one site each, labelled by element (for tests and calibration)."""
    xy = np.asarray(xy_A, dtype=np.float64).reshape(-1, 2)
    zs = np.asarray(numbers, dtype=np.int64).reshape(-1)
    n = len(zs)
    pos = np.zeros((n, 3))
    pos[:, :2] = xy
    if z_A is not None:
        pos[:, 2] = z_A
    uniq = sorted(set(zs.tolist()))
    lo = xy.min(axis=0) if n else np.zeros(2)
    hi = xy.max(axis=0) if n else np.zeros(2)
    return Specimen(
        kind=kind,
        positions_A=pos,
        numbers=zs.copy(),
        present=np.ones(n, dtype=bool),
        site_of_atom=np.arange(n),
        sites_A=xy.copy(),
        site_role=np.asarray([uniq.index(int(z)) for z in zs], dtype=np.int64),
        u_rms_A=np.full(n, u_rms_A),
        class_names=tuple(symbol(z) for z in uniq) + ("vacancy",),
        host_number=zs.copy(),
        host_count=np.ones(n, dtype=np.int64),
        extent_A=(float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])),
    )


# --- lattice helpers ---------------------------------------------------------------------


def _hex_lattice_points(a: float, width: float, height: float, center: tuple[float, float]) -> np.ndarray:
    """Points ``i a1 + j a2`` of a hexagonal lattice (a1 along x) covering the box, ``(K, 2)``."""
    a1 = np.array([a, 0.0])
    a2 = np.array([a / 2.0, a * math.sqrt(3.0) / 2.0])
    nj = int(math.ceil(height / a2[1])) + 2
    ni = int(math.ceil(width / a)) + nj + 2
    i, j = np.meshgrid(np.arange(-ni, ni + 1), np.arange(-nj, nj + 1), indexing="ij")
    pts = i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2
    half = np.array([width / 2.0 + a, height / 2.0 + a])
    keep = np.all(np.abs(pts) <= half, axis=1)
    return pts[keep] + np.asarray(center, dtype=np.float64)


def _clip_box(xy: np.ndarray, width: float, height: float, center: tuple[float, float]) -> np.ndarray:
    d = xy - np.asarray(center)
    return (np.abs(d[:, 0]) <= width / 2.0) & (np.abs(d[:, 1]) <= height / 2.0)


def _pick_separated(rng: np.random.Generator, candidates: np.ndarray, xy: np.ndarray, n: int, min_sep_A: float) -> np.ndarray:
    """Pick up to ``n`` candidate indices at random, pairwise at least ``min_sep_A`` apart."""
    order = rng.permutation(candidates)
    chosen: list[int] = []
    for idx in order:
        if len(chosen) >= n:
            break
        if chosen and np.min(np.linalg.norm(xy[chosen] - xy[idx], axis=1)) < min_sep_A:
            continue
        chosen.append(int(idx))
    return np.asarray(chosen, dtype=np.int64)


def thomas_cluster_points(
    rng: np.random.Generator, n: int, n_clusters: int, sigma_A: float, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """``n`` points ``(n, 2)`` of a Thomas cluster process inside the box ``[lo, hi]``.

    ``n_clusters`` parents are uniform in the box; each point picks a parent with weights drawn
    from a flat Dirichlet (so clusters are uneven in size) and is displaced from it by an
    isotropic Gaussian of ``sigma_A`` per axis; points falling outside are drawn again.
    """
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if n <= 0:
        return np.zeros((0, 2))
    parents = rng.uniform(lo, hi, size=(max(1, n_clusters), 2))
    weights = rng.dirichlet(np.ones(len(parents)))
    out = np.empty((0, 2))
    for _ in range(100):
        need = n - len(out)
        if need <= 0:
            break
        which = rng.choice(len(parents), size=need, p=weights)
        pts = parents[which] + rng.normal(0.0, sigma_A, size=(need, 2))
        inside = np.all((pts >= lo) & (pts <= hi), axis=1)
        out = np.concatenate([out, pts[inside]])
    return out[:n]


def _snap_separated(targets: np.ndarray, candidates: np.ndarray, xy: np.ndarray, min_sep_A: float) -> np.ndarray:
    """For each target position (in order) the nearest candidate site at least ``min_sep_A`` from
    the sites already taken (searching outwards); returns the taken site indices."""
    if len(targets) == 0 or len(candidates) == 0:
        return np.zeros(0, dtype=np.int64)
    tree = cKDTree(xy[candidates])
    chosen: list[int] = []
    k = min(len(candidates), 2048)  # a dense cluster may push a dopant some way out
    for t in targets:
        _, near = tree.query(t, k=k)
        for j in np.atleast_1d(near):
            idx = int(candidates[j])
            if chosen and np.min(np.linalg.norm(xy[chosen] - xy[idx], axis=1)) < min_sep_A:
                continue
            chosen.append(idx)
            break
    return np.asarray(chosen, dtype=np.int64)


def _drop_near(picked: np.ndarray, xy: np.ndarray, taken: np.ndarray, min_sep_A: float) -> np.ndarray:
    """``picked`` without the sites closer than ``min_sep_A`` to any of ``taken``."""
    if len(picked) == 0 or len(taken) == 0:
        return picked
    d = np.linalg.norm(xy[picked][:, None, :] - xy[taken][None, :, :], axis=2).min(axis=1)
    return picked[d >= min_sep_A]


# --- graphene ----------------------------------------------------------------------------


def graphene(
    size_A: tuple[float, float] = (200.0, 200.0),
    center_A: tuple[float, float] = (0.0, 0.0),
    rng: np.random.Generator | None = None,
    si_per_nm2: float = 0.02,
    vacancy_per_nm2: float = 0.01,
    n_si: int | None = None,
    u_rms_A: float = 0.08,
    min_dopant_separation_A: float = 6.0,
    si_layout: str = "uniform",
    si_clusters_per_nm2: float = 0.0012,
    si_n_clusters: int | None = None,
    si_cluster_sigma_A: float = 12.0,
    si_background_fraction: float = 0.0,
) -> Specimen:
    """Monolayer graphene with substitutional Si dopants and single vacancies.

    ``n_si`` overrides the areal density ``si_per_nm2``. Dopants and vacancies are kept at least
    ``min_dopant_separation_A`` apart so every Si has three C neighbours.

    ``si_layout``: ``"uniform"`` (default: every inner site equally likely) or ``"clustered"``: a
    Thomas cluster process (see :func:`thomas_cluster_points`), ``si_n_clusters`` parents (else
    Poisson with ``si_clusters_per_nm2``) placed uniformly, each dopant assigned to a parent with
    uneven (flat-Dirichlet) weights and displaced from it by a Gaussian of ``si_cluster_sigma_A``
    per axis, then snapped to the nearest free lattice site; ``si_background_fraction`` of the
    dopants stay uniformly scattered. Vacancies stay uniform. The uniform case draws exactly what
    it drew before this option existed.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    w, h = size_A
    a = GRAPHENE_A
    base = _hex_lattice_points(a, w, h, (0.0, 0.0))
    b1 = np.array([a / 2.0, a / (2.0 * math.sqrt(3.0))])
    xy = np.concatenate([base, base + b1]) + np.asarray(center_A)
    xy = xy[_clip_box(xy, w, h, center_A)]
    n = len(xy)
    numbers = np.full(n, 6, dtype=np.int64)
    present = np.ones(n, dtype=bool)
    area_nm2 = w * h / 100.0
    n_si_ = int(n_si) if n_si is not None else int(rng.poisson(si_per_nm2 * area_nm2))
    n_vac = int(rng.poisson(vacancy_per_nm2 * area_nm2))
    # keep defects away from the edge so neighbours exist
    inner = np.flatnonzero(_clip_box(xy, w - 2 * a, h - 2 * a, center_A))
    if si_layout == "uniform":
        picked = _pick_separated(rng, inner, xy, n_si_ + n_vac, min_dopant_separation_A)
        si_idx, vac_idx = picked[:n_si_], picked[n_si_:]
    elif si_layout == "clustered":
        n_bg = int(round(si_background_fraction * n_si_))
        area_inner = (w - 2 * a) * (h - 2 * a) / 100.0
        n_par = int(si_n_clusters) if si_n_clusters is not None else max(1, int(rng.poisson(si_clusters_per_nm2 * area_inner)))
        lo = np.asarray(center_A) - np.array([w / 2 - a, h / 2 - a])
        hi = np.asarray(center_A) + np.array([w / 2 - a, h / 2 - a])
        targets = thomas_cluster_points(rng, n_si_ - n_bg, n_par, si_cluster_sigma_A, lo, hi)
        clustered = _snap_separated(targets, inner, xy, min_dopant_separation_A)
        rest = _pick_separated(rng, np.setdiff1d(inner, clustered), xy, n_bg + n_vac, min_dopant_separation_A)
        rest = _drop_near(rest, xy, clustered, min_dopant_separation_A)
        si_idx = np.concatenate([clustered, rest[:n_bg]])
        vac_idx = rest[n_bg:]
    else:
        raise ValueError(f"si_layout={si_layout!r}: must be 'uniform' or 'clustered'")
    numbers[si_idx] = 14
    present[vac_idx] = False
    pos = np.zeros((n, 3))
    pos[:, :2] = xy
    pos[si_idx, 2] = 0.9  # Si buckles out of plane
    return Specimen(
        kind="graphene",
        positions_A=pos,
        numbers=numbers,
        present=present,
        site_of_atom=np.arange(n),
        sites_A=xy.copy(),
        site_role=np.zeros(n, dtype=np.int64),
        u_rms_A=np.full(n, u_rms_A),
        class_names=GRAPHENE_CLASSES,
        host_number=np.full(n, 6, dtype=np.int64),
        host_count=np.ones(n, dtype=np.int64),
        extent_A=(center_A[0] - w / 2, center_A[0] + w / 2, center_A[1] - h / 2, center_A[1] + h / 2),
    )


# --- transition-metal dichalcogenides -------------------------------------------------------


def tmd(
    kind: str = "mos2",
    size_A: tuple[float, float] = (200.0, 200.0),
    center_A: tuple[float, float] = (0.0, 0.0),
    rng: np.random.Generator | None = None,
    vacancy_fraction: float = 0.02,
    substitution_fraction: float = 0.03,
    substituent: str = "Se",
    u_rms_A: float = 0.07,
) -> Specimen:
    """2H monolayer MX2 (``kind`` mos2, ws2 or mose2) with chalcogen vacancies and substitutions.

    Every chalcogen *atom* independently is missing with ``vacancy_fraction`` or replaced by
    ``substituent`` with ``substitution_fraction``; a column is labelled 'vacancy' when any of
    its two atoms is missing, else 'substituted' when any is a substituent.
    """
    if kind not in TMD_LATTICE_A:
        raise ValueError(f"kind={kind!r}: must be one of {sorted(TMD_LATTICE_A)}")
    rng = rng if rng is not None else np.random.default_rng(0)
    metal = atomic_number({"mos2": "Mo", "ws2": "W", "mose2": "Mo"}[kind])
    chal = atomic_number({"mos2": "S", "ws2": "S", "mose2": "Se"}[kind])
    a = TMD_LATTICE_A[kind]
    w, h = size_A
    base = _hex_lattice_points(a, w, h, (0.0, 0.0))
    b1 = np.array([a / 2.0, a / (2.0 * math.sqrt(3.0))])
    m_xy = base + np.asarray(center_A)
    c_xy = base + b1 + np.asarray(center_A)
    m_xy = m_xy[_clip_box(m_xy, w, h, center_A)]
    c_xy = c_xy[_clip_box(c_xy, w, h, center_A)]
    nm, nc = len(m_xy), len(c_xy)
    sites = np.concatenate([m_xy, c_xy])
    role = np.concatenate([np.zeros(nm, dtype=np.int64), np.ones(nc, dtype=np.int64)])
    # atoms: metals, then top chalcogens, then bottom chalcogens
    pos = np.zeros((nm + 2 * nc, 3))
    pos[:nm, :2] = m_xy
    pos[nm : nm + nc, :2] = c_xy
    pos[nm : nm + nc, 2] = TMD_CHALCOGEN_Z_A
    pos[nm + nc :, :2] = c_xy
    pos[nm + nc :, 2] = -TMD_CHALCOGEN_Z_A
    numbers = np.concatenate([np.full(nm, metal), np.full(2 * nc, chal)]).astype(np.int64)
    site_of = np.concatenate([np.arange(nm), nm + np.arange(nc), nm + np.arange(nc)])
    present = np.ones(len(numbers), dtype=bool)
    u = rng.random(2 * nc)
    chal_atoms = nm + np.arange(2 * nc)
    present[chal_atoms[u < vacancy_fraction]] = False
    numbers[chal_atoms[(u >= vacancy_fraction) & (u < vacancy_fraction + substitution_fraction)]] = atomic_number(substituent)
    host = np.concatenate([np.full(nm, metal), np.full(nc, chal)]).astype(np.int64)
    count = np.concatenate([np.ones(nm, dtype=np.int64), np.full(nc, 2, dtype=np.int64)])
    return Specimen(
        kind=kind,
        positions_A=pos,
        numbers=numbers,
        present=present,
        site_of_atom=site_of,
        sites_A=sites,
        site_role=role,
        u_rms_A=np.full(len(numbers), u_rms_A),
        class_names=TMD_CLASSES,
        host_number=host,
        host_count=count,
        extent_A=(center_A[0] - w / 2, center_A[0] + w / 2, center_A[1] - h / 2, center_A[1] + h / 2),
    )


SPECIMEN_KINDS = ("graphene", "mos2", "ws2", "mose2", "srtio3", "film", "boundary_film")


def build_specimen(
    kind: str,
    size_A: tuple[float, float] = (200.0, 200.0),
    center_A: tuple[float, float] = (0.0, 0.0),
    rng: np.random.Generator | None = None,
    **options: Any,
) -> Specimen:
    """Build a specimen by name (one of :data:`SPECIMEN_KINDS`); ``options`` go to its builder."""
    rng = rng if rng is not None else np.random.default_rng(0)
    if kind == "graphene":
        return graphene(size_A=size_A, center_A=center_A, rng=rng, **options)
    if kind in TMD_LATTICE_A:
        return tmd(kind=kind, size_A=size_A, center_A=center_A, rng=rng, **options)
    if kind == "srtio3":
        return perovskites.srtio3(size_A=size_A, center_A=center_A, rng=rng, **options)
    if kind == "film":
        return perovskites.ferroelectric_film(size_A=size_A, center_A=center_A, rng=rng, **options)
    if kind == "boundary_film":  # boundaries from the 2-motif chain (stemagent.simulators.boundary_film)
        return boundary_film(size_A=size_A, center_A=center_A, rng=rng, **options)
    raise ValueError(f"specimen kind={kind!r}: must be one of {SPECIMEN_KINDS}")
