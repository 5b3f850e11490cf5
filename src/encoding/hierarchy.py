"""Motif hierarchy: from per-atom motif labels and the neighbour graph to the repeating
*motif-cells* that tile the lattice, their counts, a composition tree, and rare cells flagged.

1. Translations: the shortest two non-parallel vectors ``a1``, ``a2`` that carry most atoms onto
   an atom of the *same motif* (candidates are the displacements between same-motif atoms up to
   three neighbour distances; a vector scores the share of atoms it maps correctly; it must reach
   ``0.8`` of the best score). They span the lattice of the labelled pattern (e.g. graphene's
   hexagonal lattice, not its bonds, which map only one sublattice onto the other).
2. Basis: the atoms' positions modulo that lattice fall into ``B`` sites (graphene 2, a TMD 2,
   a perovskite projection 4 ...).
3. Cells: every atom on the most populated basis site starts a cell; each other basis site joins
   it through the shortest vector between the two sites, so a cell is a connected group of
   neighbours (a graphene bond, a Mo-S2 pair, a perovskite cell). A member missing where the
   lattice says an atom should be, inside the field, is an empty site (label ``EMPTY``); cells
   that reach beyond the field or hold an atom without a motif are incomplete and left out.
4. Cell types are the tuples of member motifs; their counts and the share of each, the tree
   lattice -> cell types -> member motifs, and ``rare`` types (share below ``rare_fraction``),
   whose atoms are flagged as candidate defects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from stemagent.encoding.patches import nearest_neighbour_distance
from stemagent.errors import InputError

EMPTY = -2  # a lattice site inside the field with no atom on it


@dataclass
class MotifCells:
    """Result of :func:`motif_cells` (see the module docstring).

    ``lattice_A`` ``(2, 2)`` rows ``a1``, ``a2``; ``basis_A`` ``(B, 2)`` member offsets from the
    cell's first member; ``cells`` ``(C, B)`` atom index per member (-1: empty site); ``complete``
    ``(C,)``; ``cell_type`` ``(C,)`` index into ``types`` (-1 for incomplete cells); ``types`` list
    of member-motif tuples; ``counts`` ``(T,)``; ``rare`` ``(T,)``; ``cell_of_atom`` ``(N,)``
    (-1: in no complete cell); ``rare_atom`` ``(N,)``; ``tree`` the composition tree.
    """

    lattice_A: np.ndarray
    basis_A: np.ndarray
    cells: np.ndarray
    complete: np.ndarray
    cell_type: np.ndarray
    types: list[tuple[int, ...]]
    counts: np.ndarray
    rare: np.ndarray
    cell_of_atom: np.ndarray
    rare_atom: np.ndarray
    tree: dict[str, Any] = field(default_factory=dict)

    @property
    def n_complete(self) -> int:
        return int(self.complete.sum())


def _translation_score(tree: cKDTree, xy: np.ndarray, labels: np.ndarray, t: np.ndarray, tol: float) -> float:
    """Share of atoms that ``t`` carries onto an atom of the same motif."""
    d, j = tree.query(xy + t, distance_upper_bound=tol)
    ok = np.isfinite(d)
    return float(np.mean(ok & (labels[np.where(ok, j, 0)] == labels)))


def _translation_lattice(xy: np.ndarray, labels: np.ndarray, nn: float, rng: np.random.Generator) -> np.ndarray:
    tree = cKDTree(xy)
    sample = rng.choice(len(xy), size=min(len(xy), 200), replace=False)
    pairs = tree.query_ball_point(xy[sample], 3.2 * nn)
    src = np.repeat(sample, [len(p) for p in pairs])
    dst = np.fromiter((j for p in pairs for j in p), dtype=np.int64, count=len(src))
    keep = (dst != src) & (labels[dst] == labels[src])
    if not keep.any():
        raise InputError("atoms", len(xy), "no repeating arrangement of motifs found (too few atoms)")
    v = xy[dst[keep]] - xy[src[keep]]
    q = np.round(v / (0.2 * nn)).astype(np.int64)
    keys, inv, cnt = np.unique(q, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    reps = np.stack([v[inv == k].mean(axis=0) for k in range(len(keys))])
    reps = reps[cnt >= max(3, 0.05 * cnt.max())]
    scores_a = np.asarray([_translation_score(tree, xy, labels, t, 0.3 * nn) for t in reps])
    good = reps[scores_a >= 0.8 * scores_a.max()]
    good = good[np.argsort(np.linalg.norm(good, axis=1))]
    a1 = good[0]
    for t in good[1:]:
        cross = abs(a1[0] * t[1] - a1[1] * t[0])
        if cross > 0.3 * np.linalg.norm(a1) * np.linalg.norm(t):
            return np.stack([a1, t])
    raise InputError("atoms", len(xy), "the motif pattern repeats along one direction only")


def _basis_sites(frac: np.ndarray, lattice: np.ndarray, tol: float, max_sites: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Cluster wrapped fractional coordinates ``(N, 2)``: site index per atom and site centres
    (the first unassigned atom founds a site and takes every atom within ``tol`` Å of it, modulo
    the lattice; after ``max_sites`` sites the rest join the nearest)."""
    shifts = np.array([[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=np.float64)

    def dist(c: np.ndarray, f: np.ndarray) -> np.ndarray:
        delta = ((f - c)[:, None, :] + shifts[None]) @ lattice  # (n, 9, 2)
        return np.sqrt(np.min(np.einsum("nsk,nsk->ns", delta, delta), axis=1))

    site = np.full(len(frac), -1, dtype=np.int64)
    centres: list[np.ndarray] = []
    while (site < 0).any() and len(centres) < max_sites:
        first = int(np.flatnonzero(site < 0)[0])
        c = frac[first].copy()
        free = np.flatnonzero(site < 0)
        site[free[dist(c, frac[free]) < tol]] = len(centres)
        centres.append(c)
    rest = np.flatnonzero(site < 0)
    if len(rest):
        d = np.stack([dist(c, frac[rest]) for c in centres], axis=1)
        site[rest] = np.argmin(d, axis=1)
    return site, np.asarray(centres)


def motif_cells(
    positions_A: np.ndarray,
    labels: np.ndarray,
    rare_fraction: float = 0.05,
    min_basis_share: float = 0.2,
    seed: int = 0,
    motif_names: dict[int, str] | None = None,
    lattice_A: np.ndarray | None = None,
    nn_A: float | None = None,
) -> MotifCells:
    """Motif-cells of atoms at ``positions_A`` ``(N, 2)`` with motif ``labels`` ``(N,)`` (-1: none).

    ``lattice_A`` ``(2, 2)``: translations found on an earlier frame of the same specimen; they
    are kept when they still carry at least 70 % of the atoms onto their own motif, otherwise
    searched again. ``nn_A``: the nearest-neighbour distance when known (else measured)."""
    xy = np.asarray(positions_A, dtype=np.float64).reshape(-1, 2)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(xy) < 4:
        raise InputError("atoms", len(xy), "need at least 4 atoms for motif-cells")
    if lab.shape != (len(xy),):
        raise InputError("labels.shape", lab.shape, f"must be ({len(xy)},)")
    nn = float(nn_A) if nn_A is not None else nearest_neighbour_distance(xy)
    rng = np.random.default_rng(seed)
    tree = cKDTree(xy)
    lattice = None
    if lattice_A is not None:
        cand = np.asarray(lattice_A, dtype=np.float64).reshape(2, 2)
        if min(_translation_score(tree, xy, lab, t, 0.3 * nn) for t in cand) >= 0.7:
            lattice = cand
    if lattice is None:
        lattice = _translation_lattice(xy, lab, nn, rng)
    origin = xy[np.argmin(np.linalg.norm(xy - np.median(xy, axis=0), axis=1))]
    frac = (xy - origin) @ np.linalg.inv(lattice)
    frac -= np.floor(frac)
    site, centres = _basis_sites(frac, lattice, 0.3 * nn)
    share = np.bincount(site) / len(site)
    keep_sites = np.flatnonzero(share >= min_basis_share * share.max())
    order = keep_sites[np.argsort(-share[keep_sites], kind="stable")]
    ref = order[0]
    shifts = np.array([[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=np.float64)
    coordination = np.asarray(tree.query_ball_point(xy, 1.2 * nn, return_length=True)) - 1
    z_full = int(np.median(coordination))
    starts = np.flatnonzero(site == ref)
    basis = [np.zeros(2)]
    for s in order[1:]:
        vecs = ((centres[s] - centres[ref])[None, :] + shifts) @ lattice
        length = np.linalg.norm(vecs, axis=1)
        best, best_found = vecs[np.argmin(length)], -1
        for v in vecs[length <= 1.05 * length.min()]:  # equivalent shortest links: keep the one that tiles most
            found = int(np.isfinite(tree.query(xy[starts] + v, distance_upper_bound=0.35 * nn)[0]).sum())
            if found > best_found:
                best, best_found = v, found
        basis.append(best)
    basis_a = np.asarray(basis)
    n_cells, n_basis = len(starts), len(basis_a)
    cells = np.full((n_cells, n_basis), -1, dtype=np.int64)
    member_lab = np.full((n_cells, n_basis), -1, dtype=np.int64)
    complete = np.ones(n_cells, dtype=bool)
    cells[:, 0] = starts
    member_lab[:, 0] = lab[starts]
    for b in range(1, n_basis):
        want = xy[starts] + basis_a[b]
        d, j = tree.query(want, distance_upper_bound=0.35 * nn)
        found = np.isfinite(d)
        cells[found, b] = j[found]
        member_lab[found, b] = lab[j[found]]
        # an empty site inside the lattice has as many neighbours as an atom there would
        around = np.asarray(tree.query_ball_point(want[~found], 1.2 * nn, return_length=True), dtype=np.int64).reshape(-1)
        inside = np.zeros(n_cells, dtype=bool)
        inside[np.flatnonzero(~found)] = around >= z_full
        member_lab[~found & inside, b] = EMPTY
        complete &= found | inside
    complete &= np.all(member_lab != -1, axis=1)
    cell_type = np.full(n_cells, -1, dtype=np.int64)
    if complete.any():
        rows = member_lab[complete] - EMPTY  # >= 0
        base = int(rows.max()) + 1
        keys = rows @ (base ** np.arange(n_basis - 1, -1, -1, dtype=np.int64))
        uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
        cell_type[complete] = inv.reshape(-1)
        types = [tuple(int(v) + EMPTY for v in rows[i]) for i in first]
    else:
        types = []
    counts = np.bincount(cell_type[cell_type >= 0], minlength=len(types))
    total = max(1, int(counts.sum()))
    rare = counts / total < rare_fraction
    cell_of_atom = np.full(len(xy), -1, dtype=np.int64)
    rare_atom = np.zeros(len(xy), dtype=bool)
    ci = np.repeat(np.arange(n_cells), n_basis).reshape(n_cells, n_basis)
    member = (cells >= 0) & complete[:, None]
    cell_of_atom[cells[member]] = ci[member]
    cell_rare = np.zeros(n_cells, dtype=bool)
    cell_rare[cell_type >= 0] = rare[cell_type[cell_type >= 0]]
    in_rare = member & cell_rare[:, None]
    rare_atom[cells[in_rare]] = True
    names = motif_names or {}

    def name(v: int) -> str:
        return "empty" if v == EMPTY else names.get(v, f"motif {v}")

    tree_doc = {
        "lattice_A": lattice.round(4).tolist(),
        "basis_A": basis_a.round(4).tolist(),
        "cells": total,
        "incomplete_cells": int((~complete).sum()),
        "types": [
            {
                "members": [name(v) for v in t],
                "count": int(counts[i]),
                "share": float(counts[i] / total),
                "rare": bool(rare[i]),
                "motifs": {name(v): int(t.count(v)) for v in sorted(set(t))},
            }
            for i, t in sorted(enumerate(types), key=lambda it: -counts[it[0]])
        ],
    }
    return MotifCells(lattice, basis_a, cells, complete, cell_type, types, counts, rare, cell_of_atom, rare_atom, tree_doc)
