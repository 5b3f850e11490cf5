"""Lattice registration of one sublattice of atomic columns: indices and local displacements.

Given the positions of the columns of one square sublattice (e.g. the A-site columns of a
perovskite), find the two lattice vectors, give every column its integer indices ``(i, j)``
and measure how far it sits from where its neighbours say it should be. The reference is a
smooth model of the lattice (origin, two vectors and quadratic terms in ``i, j`` that absorb
scan distortion and slow drift) corrected by the median residual of the neighbours within
``neighbourhood_cells`` (which absorbs the rest); columns flagged as displaced in a first pass
are left out of their neighbours' reference in the second.

The lattice vector ``a1`` is the one closest to the +x axis of the input frame and ``a2`` is
``a1`` turned by +90° (so lattice steps E, N, W, S are +a1, +a2, -a1, -a2).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from stemagent.errors import InputError


@dataclass
class LatticeRegistration:
    """``a1_A``, ``a2_A`` ``(2,)``; ``ij`` ``(N, 2)`` int indices relative to the column nearest the
    centre; ``indexed`` ``(N,)`` False for points that could not be indexed (a second point on an
    occupied index; their displacement is NaN); ``displacement_A`` ``(N, 2)``
    observed minus reference position; ``sigma_A`` robust rms of one displacement component of
    undisplaced columns; ``model_A`` ``(N, 2)`` the smooth lattice model at each point's index."""

    a1_A: np.ndarray
    a2_A: np.ndarray
    ij: np.ndarray
    indexed: np.ndarray
    displacement_A: np.ndarray
    sigma_A: float
    model_A: np.ndarray

    @property
    def spacing_A(self) -> float:
        return float(0.5 * (np.linalg.norm(self.a1_A) + np.linalg.norm(self.a2_A)))

    def to_lattice_frame(self, vectors_A: np.ndarray) -> np.ndarray:
        """Components ``(N, 2)`` of vectors along the unit vectors of ``a1`` and ``a2``."""
        u1 = self.a1_A / np.linalg.norm(self.a1_A)
        u2 = self.a2_A / np.linalg.norm(self.a2_A)
        v = np.asarray(vectors_A, dtype=np.float64).reshape(-1, 2)
        return np.stack([v @ u1, v @ u2], axis=1)


def _design(ij: np.ndarray) -> np.ndarray:
    i, j = ij[:, 0].astype(np.float64), ij[:, 1].astype(np.float64)
    return np.stack([np.ones_like(i), i, j, i * i, i * j, j * j], axis=1)


def lattice_vectors(points_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two lattice vectors of a square point lattice from nearest-neighbour vectors."""
    pts = np.asarray(points_A, dtype=np.float64)
    tree = cKDTree(pts)
    d, idx = tree.query(pts, k=5)
    nn = float(np.median(d[:, 1]))
    vec = (pts[idx[:, 1:]] - pts[:, None, :]).reshape(-1, 2)
    length = np.linalg.norm(vec, axis=1)
    vec = vec[(length > 0.75 * nn) & (length < 1.25 * nn)]
    if len(vec) < 8:
        raise InputError("points_A", len(pts), "too few neighbour pairs to find a square lattice")
    theta = np.arctan2(vec[:, 1], vec[:, 0])
    phi = float(np.angle(np.mean(np.exp(4j * theta)))) / 4.0  # orientation mod 90°, in (-45°, 45°]
    u1 = np.array([np.cos(phi), np.sin(phi)])
    u2 = np.array([-u1[1], u1[0]])
    p1, p2 = vec @ u1, vec @ u2
    along1 = np.abs(p1) > np.abs(p2)
    l1 = float(np.median(np.abs(p1[along1])))
    l2 = float(np.median(np.abs(p2[~along1]))) if np.any(~along1) else l1
    return l1 * u1, l2 * u2


def _masked_median(values: np.ndarray, neigh: np.ndarray, usable: np.ndarray, min_count: int = 1) -> np.ndarray:
    """Median of ``values[neigh]`` over the usable neighbours of each point, ``(N, 2)``; 0 where
    fewer than ``min_count`` are usable. ``neigh`` ``(N, K)`` holds ``len(values)`` for padding."""
    if neigh.shape[1] == 0:
        return np.zeros_like(values)
    padded = np.vstack([values, np.full((1, 2), np.nan)])
    vals = np.where(usable[:, :, None], padded[neigh], np.nan)
    with warnings.catch_warnings():  # points with no usable neighbour: reference 0
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nan_to_num(np.nanmedian(vals, axis=1))
    return np.where((usable.sum(axis=1) >= min_count)[:, None], med, 0.0)


def _scan_line_neighbours(scan_rc_px: np.ndarray, half_width_px: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``k`` points imaged on the same scan lines (|d row| <= 1 px) within ``half_width_px``
    along the fast axis: ``(neighbours (N, K) padded with N, valid (N, K))``."""
    rc = np.asarray(scan_rc_px, dtype=np.float64)
    scaled = np.stack([rc[:, 0] * half_width_px, rc[:, 1]], axis=1)  # |d row| <= 1 <=> |d scaled row| <= half width
    dist, idx = cKDTree(scaled).query(scaled, k=min(k + 1, len(rc)), p=np.inf, distance_upper_bound=half_width_px)
    return idx[:, 1:], np.isfinite(dist[:, 1:])


def _pixels_per_A(pts: np.ndarray, rc: np.ndarray) -> float:
    """Image scale from the points and their pixel positions (least squares)."""
    d_a = np.linalg.norm(pts - pts.mean(axis=0), axis=1)
    d_px = np.linalg.norm(rc - rc.mean(axis=0), axis=1)
    return float(d_px @ d_a / max(d_a @ d_a, 1e-12))


def register_lattice(points_A: np.ndarray, neighbourhood_cells: float = 2.6, flag_sigmas: float = 6.0,
                     scan_rc_px: np.ndarray | None = None) -> LatticeRegistration:
    """Index the points of a square sublattice and measure their local displacements.

    ``scan_rc_px``: where each point is in the image ``(N, 2)`` (row, col). When given, errors
    shared by the columns imaged on the same scan lines (line jitter, a jump of the scan) are
    removed too: after the neighbourhood reference, each column's displacement is taken relative
    to the median of the columns on its scan lines (within 8 lattice spacings along the line)."""
    pts = np.asarray(points_A, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 9:
        raise InputError("points_A", len(pts), "need at least 9 columns to register a lattice")
    a1, a2 = lattice_vectors(pts)
    ref = int(np.argmin(np.linalg.norm(pts - pts.mean(axis=0), axis=1)))
    basis = np.stack([a1, a2], axis=1)
    ij = np.rint(np.linalg.solve(basis, (pts - pts[ref]).T).T).astype(np.int64)
    coef = np.zeros((6, 2))
    for _ in range(4):  # fit the smooth model, re-index with it
        coef, *_ = np.linalg.lstsq(_design(ij), pts, rcond=None)
        lin = np.stack([coef[1], coef[2]], axis=1)
        guess = np.rint(np.linalg.solve(lin, (pts - coef[0] - (_design(ij)[:, 3:] @ coef[3:])).T).T).astype(np.int64)
        if np.array_equal(guess, ij):
            break
        ij = guess
    a1, a2 = coef[1], coef[2]
    # one point per index: keep the closest to the model
    model = _design(ij) @ coef
    resid = pts - model
    order = np.argsort(np.linalg.norm(resid, axis=1))
    _, first = np.unique(ij[order], axis=0, return_index=True)
    keep = np.zeros(len(pts), dtype=bool)
    keep[order[first]] = True
    # local reference: median residual of the neighbours (twice: without flagged columns)
    spacing = float(0.5 * (np.linalg.norm(a1) + np.linalg.norm(a2)))
    k_max = int(np.ceil(np.pi * (neighbourhood_cells + 1) ** 2)) + 1
    dist, neigh = cKDTree(pts).query(pts, k=min(k_max, len(pts)), distance_upper_bound=neighbourhood_cells * spacing)
    neigh, valid = neigh[:, 1:], np.isfinite(dist[:, 1:])  # without the point itself
    line_neigh = line_valid = None
    if scan_rc_px is not None:
        rc = np.asarray(scan_rc_px, dtype=np.float64).reshape(-1, 2)
        if rc.shape != pts.shape:
            raise InputError("scan_rc_px.shape", rc.shape, f"must be {pts.shape}, one (row, col) per point")
        span_px = 8.0 * spacing * _pixels_per_A(pts, rc)
        line_neigh, line_valid = _scan_line_neighbours(rc, span_px, 24)
    use = keep.copy()
    disp = resid.copy()
    sigma = float("nan")
    for _ in range(2):
        disp = resid - _masked_median(resid, neigh, valid & np.append(use, False)[neigh])
        if line_neigh is not None and line_valid is not None:
            disp = disp - _masked_median(disp, line_neigh, line_valid & np.append(use, False)[line_neigh], min_count=4)
        sigma = float(1.4826 * np.median(np.abs(disp[keep] - np.median(disp[keep], axis=0)))) or 1e-3
        use = keep & (np.linalg.norm(disp, axis=1) < flag_sigmas * sigma)
    disp[~keep] = np.nan
    return LatticeRegistration(a1_A=np.asarray(a1), a2_A=np.asarray(a2), ij=ij, indexed=keep, displacement_A=disp, sigma_A=sigma, model_A=model)
