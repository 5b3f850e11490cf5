"""Atom tracking: which detection of a new frame is which atom of the reference lattice.

The stage predicts where each tracked atom must appear in the new frame (its reference
position plus the drift forecast at the time the beam passes it) and this module assigns the
detections to those predictions:

1. the lattice's nearest-neighbour spacing ``a`` is measured on the detections;
2. a common residual shift (a forecast that is off, e.g. after a pause) is taken out as the
   median of the nearest-prediction displacements shorter than ``a / 2``;
3. candidate pairs are those within the gate ``gate_fraction * a`` (< ``a / 2``, so a
   prediction can never be matched to a neighbour's detection and a hop to a neighbouring site
   is a disappearance plus a new atom, never a displacement);
4. each connected group of candidates is solved as a rectangular assignment problem
   (:func:`scipy.optimize.linear_sum_assignment`, Hungarian) on squared distances; almost all
   groups are one prediction and one detection.

Unmatched predictions are atoms missing from this frame (a vacancy, a detection miss, an atom
that left the field); unmatched detections are atoms new to the tracker (entering the field,
a hop's destination). Positions are ``(N, 2)`` (x, y) in Å.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree


@dataclass
class Matches:
    """Result of :func:`match`: ``pred`` ``(M,)`` indices into the predictions, ``det`` ``(M,)``
    into the detections, ``shift_A`` the common shift taken out first, ``spacing_A`` the
    nearest-neighbour spacing, ``gate_A`` the gate used."""

    pred: np.ndarray
    det: np.ndarray
    shift_A: np.ndarray
    spacing_A: float
    gate_A: float


def nearest_neighbour_spacing_A(points_A: np.ndarray, tree: cKDTree | None = None) -> float:
    """Median distance from each point to its nearest neighbour (nan with fewer than 2 points).
    ``tree``: a KD-tree of ``points_A`` when the caller has one."""
    if len(points_A) < 2:
        return float("nan")
    d, _ = (cKDTree(points_A) if tree is None else tree).query(points_A, k=2)
    return float(np.median(d[:, 1]))


def match(
    predicted_A: np.ndarray,
    detected_A: np.ndarray,
    gate_fraction: float = 0.4,
    spacing_A: float | None = None,
    max_shift_A: float | None = None,
) -> Matches:
    """Assign ``detected_A`` ``(D, 2)`` to ``predicted_A`` ``(P, 2)`` with gating (see module doc).

    ``spacing_A``: the lattice's nearest-neighbour spacing (measured on the detections when None).
    ``max_shift_A``: the largest common shift to look for (default: half the spacing).
    """
    predicted_A = np.asarray(predicted_A, dtype=np.float64).reshape(-1, 2)
    detected_A = np.asarray(detected_A, dtype=np.float64).reshape(-1, 2)
    det_tree = cKDTree(detected_A) if len(detected_A) else None
    a = nearest_neighbour_spacing_A(detected_A, det_tree) if spacing_A is None else float(spacing_A)
    empty = Matches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(2), a, float("nan"))
    if len(predicted_A) == 0 or det_tree is None or not np.isfinite(a) or a <= 0:
        return empty
    tree = cKDTree(predicted_A)
    reach = 0.5 * a if max_shift_A is None else min(float(max_shift_A), 0.5 * a)
    d, j = tree.query(detected_A, k=1, distance_upper_bound=reach)
    ok = np.isfinite(d)
    shift = np.median(detected_A[ok] - predicted_A[j[ok]], axis=0) if ok.sum() >= 3 else np.zeros(2)
    gate = gate_fraction * a
    shifted = cKDTree(predicted_A + shift)
    pairs = shifted.sparse_distance_matrix(det_tree, gate, output_type="ndarray")
    if len(pairs) == 0:
        return Matches(empty.pred, empty.det, shift, a, gate)
    pi = pairs["i"].astype(np.int64)
    di = pairs["j"].astype(np.int64)
    cost = pairs["v"] ** 2
    n_p, n_d = len(predicted_A), len(detected_A)
    if np.bincount(pi, minlength=n_p).max() == 1 and np.bincount(di, minlength=n_d).max() == 1:
        # no conflicts (the usual frame): every candidate pair is its own group, and the
        # assignment is the pairs themselves, in the groups' order (by prediction)
        order = np.argsort(pi, kind="stable")
        return Matches(pi[order], di[order], shift, a, gate)
    # connected groups of candidate pairs: nodes 0..n_p-1 predictions, n_p.. detections
    graph = coo_matrix((np.ones(len(pi)), (pi, n_p + di)), shape=(n_p + n_d, n_p + n_d))
    _, label = connected_components(graph, directed=False)
    group = label[pi]
    order = np.argsort(group, kind="stable")
    pi, di, cost, group = pi[order], di[order], cost[order], group[order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], len(group)]
    single = (ends - starts) == 1
    out_p = [pi[starts[single]]]
    out_d = [di[starts[single]]]
    for s, e in zip(starts[~single], ends[~single]):
        up, inv_p = np.unique(pi[s:e], return_inverse=True)
        ud, inv_d = np.unique(di[s:e], return_inverse=True)
        big = np.full((len(up), len(ud)), 1e6 * gate * gate + 1.0)
        big[inv_p, inv_d] = cost[s:e]
        r, c = linear_sum_assignment(big)
        keep = big[r, c] <= gate * gate
        out_p.append(up[r[keep]])
        out_d.append(ud[c[keep]])
    return Matches(np.concatenate(out_p), np.concatenate(out_d), shift, a, gate)
