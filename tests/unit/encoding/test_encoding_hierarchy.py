"""Motif-cells: the count on a perfect lattice equals the tiling; defects make rare cells."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stemagent.encoding.hierarchy import EMPTY, motif_cells
from stemagent.errors import InputError

A = 2.46


def honeycomb(n1: int, n2: int, a: float = A) -> tuple[np.ndarray, np.ndarray]:
    """A ``n1 x n2`` parallelogram of honeycomb cells: positions ``(2 n1 n2, 2)`` and sublattice."""
    a1 = np.array([a, 0.0])
    a2 = np.array([a / 2, a * math.sqrt(3) / 2])
    b = np.array([a / 2, a / (2 * math.sqrt(3))])
    pts, sub = [], []
    for i in range(n1):
        for j in range(n2):
            o = i * a1 + j * a2
            pts += [o, o + b]
            sub += [0, 1]
    return np.asarray(pts), np.asarray(sub)


@pytest.mark.parametrize("n1,n2", [(12, 9), (7, 15)])
def test_cell_count_on_a_perfect_lattice_equals_the_tiling(n1: int, n2: int) -> None:
    xy, _ = honeycomb(n1, n2)
    rng = np.random.default_rng(0)
    xy = xy + 0.02 * rng.normal(size=xy.shape)  # thermal jitter must not matter
    rot = 0.4
    xy = xy @ np.array([[math.cos(rot), math.sin(rot)], [-math.sin(rot), math.cos(rot)]])
    cells = motif_cells(xy, np.zeros(len(xy), dtype=int))
    assert cells.n_complete == n1 * n2
    assert len(cells.types) == 1 and cells.counts[0] == n1 * n2
    assert len(cells.basis_A) == 2
    assert abs(np.linalg.norm(cells.basis_A[1]) - A / math.sqrt(3)) < 0.05  # a cell is a bonded pair
    assert sorted(np.round(np.linalg.norm(cells.lattice_A, axis=1), 2)) == [A, A]
    assert np.all(cells.cell_of_atom >= 0) and not cells.rare_atom.any()


def test_two_motif_lattice_tiles_with_mixed_cells() -> None:
    xy, sub = honeycomb(10, 10, a=3.16)  # MoS2-like: metal and chalcogen sublattices
    cells = motif_cells(xy, sub)
    assert cells.n_complete == 100
    assert cells.types == [(0, 1)] or cells.types == [(1, 0)]


def test_defects_make_rare_cells_and_flag_their_atoms() -> None:
    xy, _ = honeycomb(14, 14)
    labels = np.zeros(len(xy), dtype=int)
    si = 2 * (7 * 14 + 7)  # a dopant in the middle
    labels[si] = 1
    vac = 2 * (3 * 14 + 9) + 1  # and a vacancy elsewhere
    keep = np.ones(len(xy), dtype=bool)
    keep[vac] = False
    cells = motif_cells(xy[keep], labels[keep], rare_fraction=0.05, motif_names={0: "C", 1: "Si"})
    sigs = {tuple(sorted(t)): int(c) for t, c in zip(cells.types, cells.counts)}
    assert sigs[(0, 0)] == 14 * 14 - 2
    assert sigs[(0, 1)] == 1 and sigs[(EMPTY, 0)] == 1
    flagged = np.flatnonzero(cells.rare_atom)
    si_new = si - (1 if vac < si else 0)
    assert si_new in flagged and len(flagged) == 3  # the Si, its partner, the vacancy's partner
    names = {tuple(sorted(t["members"])) for t in cells.tree["types"] if t["rare"]}
    assert names == {("C", "Si"), ("C", "empty")}


def test_bad_input_is_refused() -> None:
    with pytest.raises(InputError, match="atoms"):
        motif_cells(np.zeros((2, 2)), np.zeros(2, dtype=int))
    xy, _ = honeycomb(3, 3)
    with pytest.raises(InputError, match="labels.shape"):
        motif_cells(xy, np.zeros(3, dtype=int))
