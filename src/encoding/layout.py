"""Force-relaxed layout of a k-nearest-neighbour graph: feature vectors to a 2D map whose
clusters are the motif classes.

1. Graph: each point's ``k`` nearest neighbours (scikit-learn ``NearestNeighbors``), weighted
   ``exp(-(d - rho_i) / sigma_i)`` with ``rho_i`` the distance to the nearest neighbour and
   ``sigma_i`` chosen (bisection, all points at once) so each point's weights sum to ``log2 k``;
   symmetrised as a fuzzy union ``w + w^T - w * w^T``.
2. Start: the first two principal components, scaled to +-10.
3. Relaxation, two stages with the learning rate falling linearly to zero in each. Every edge
   pulls its ends together with ``alpha * w * delta / (|delta|^a + 1)``; every point is pushed
   away from ``negatives`` random points with ``beta * delta / (|delta|^b + 1)`` times the mean
   number of edges per point (the published method samples negatives per edge: about the same
   balance, far more samples); each step is clipped to +-4 per axis. Stage one (``a = 0, b = 2``: linear springs against long-range
   repulsion) spreads the graph's components apart; stage two (``a = 2, b = 4``: saturating
   attraction, short-range repulsion) contracts each component into a tight cluster.

All updates of an iteration are computed from the same positions and applied together
(vectorised over edges; the published implementation updates one edge at a time in a compiled
loop), which is what makes 5,000 points take well under a second. Randomness comes from the
``seed`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from sklearn.neighbors import NearestNeighbors

from stemagent.errors import InputError


@dataclass(frozen=True)
class ForceParams:
    """``alpha / (|d|^a + 1)`` attraction and ``beta / (|d|^b + 1)`` repulsion."""

    a: float
    b: float
    alpha: float
    beta: float


REPULSION_STAGE = ForceParams(a=0.0, b=2.0, alpha=1.0, beta=1.0)
ATTRACTION_STAGE = ForceParams(a=2.0, b=4.0, alpha=5.0, beta=2.0)


def knn_graph(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuzzy kNN graph of ``x`` ``(N, d)``: symmetric edge list ``(rows, cols, weights)``."""
    n = len(x)
    k = min(k, n - 1)
    nn = NearestNeighbors(n_neighbors=k + 1).fit(x)
    dist, ind = nn.kneighbors(x)
    dist, ind = dist[:, 1:], ind[:, 1:]
    rho = dist[:, :1]
    d = np.maximum(dist - rho, 0.0)
    target = math.log2(k) if k > 1 else 1.0
    lo = np.zeros((n, 1))
    hi = np.full((n, 1), np.inf)
    beta = np.ones((n, 1))
    for _ in range(64):  # bisection on 1 / sigma, every row at once
        s = np.exp(-d * beta).sum(axis=1, keepdims=True)
        too_big = s > target
        lo = np.where(too_big, beta, lo)
        hi = np.where(too_big, hi, beta)
        beta = np.where(np.isinf(hi), beta * 2.0, 0.5 * (lo + hi))
    w = np.exp(-d * beta)
    p = sparse.csr_matrix((w.ravel(), ind.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))
    p = p + p.T - p.multiply(p.T)
    p = p.tocoo()
    return p.row.astype(np.int64), p.col.astype(np.int64), p.data.astype(np.float64)


def pca_start(x: np.ndarray) -> np.ndarray:
    """First two principal components of ``x``, scaled so the largest coordinate is 10."""
    xc = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    y = xc @ vt[:2].T
    if y.shape[1] < 2:
        y = np.concatenate([y, np.zeros((len(y), 2 - y.shape[1]))], axis=1)
    scale = np.abs(y).max()
    return y / scale * 10.0 if scale > 0 else y


def _inverse_power(dist2: torch.Tensor, exponent: float) -> torch.Tensor:
    """``1 / (d^exponent + 1)`` from squared distances (no square root for even exponents)."""
    if exponent == 0:
        return torch.full_like(dist2, 0.5)
    if exponent == 2:
        return 1.0 / (dist2 + 1.0)
    if exponent == 4:
        return 1.0 / (dist2 * dist2 + 1.0)
    return 1.0 / (dist2.pow(exponent / 2.0) + 1.0)


def _relax(
    y: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    w: torch.Tensor,
    params: ForceParams,
    iterations: int,
    lr0: float,
    negatives: int,
    gen: torch.Generator,
) -> None:
    """``iterations`` synchronous steps. Repulsion: each point is pushed away from ``negatives``
    random points, scaled by the mean degree, so the balance between pull and push is about that
    of ``negatives`` samples per edge at a fraction of the cost."""
    n = y.shape[0]
    degree = (torch.bincount(rows, minlength=n) + torch.bincount(cols, minlength=n)).to(y.dtype)
    src_neg = torch.arange(n, device=y.device).repeat_interleave(negatives)
    weight_neg = degree.mean()  # a uniform push: the average number of edges per point
    index = torch.cat([rows, cols, src_neg, src_neg])  # one scatter per step
    for it in range(iterations):
        lr = lr0 * (1.0 - it / iterations)
        delta = y[rows] - y[cols]
        pull = (delta * (params.alpha * _inverse_power((delta * delta).sum(1, keepdim=True), params.a))).clamp_(-4.0, 4.0)
        pull *= w[:, None] * lr
        neg = torch.randint(0, n, (src_neg.shape[0],), generator=gen, device=y.device)
        delta_n = y[src_neg] - y[neg]
        push = (delta_n * (params.beta * _inverse_power((delta_n * delta_n).sum(1, keepdim=True), params.b))).clamp_(-4.0, 4.0)
        push *= weight_neg * lr
        step = torch.zeros_like(y)
        step.index_add_(0, index, torch.cat([-pull, pull, push, push]))
        y += step


def force_layout(
    x: np.ndarray,
    n_neighbors: int = 10,
    iterations: int = 100,
    negatives: int = 3,
    learning_rate: float = 0.5,
    split: float = 0.5,
    seed: int = 0,
    stages: tuple[ForceParams, ForceParams] = (REPULSION_STAGE, ATTRACTION_STAGE),
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """2D layout ``(N, 2)`` of feature vectors ``x`` ``(N, d)``.

    ``split`` of the ``iterations`` go to the repulsion stage, the rest to the attraction stage.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 3:
        raise InputError("features.shape", x.shape, "need at least 3 feature vectors (N, d) to lay out")
    if not np.all(np.isfinite(x)):
        raise InputError("features", "non-finite", "feature vectors must be finite")
    rows, cols, w = knn_graph(x, n_neighbors)
    once = rows < cols  # each undirected edge once, pulling with the weight of both directions
    rows, cols, w = rows[once], cols[once], 2.0 * w[once]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    y = torch.as_tensor(pca_start(x), dtype=torch.float32, device=device)
    t_rows = torch.as_tensor(rows, device=device)
    t_cols = torch.as_tensor(cols, device=device)
    t_w = torch.as_tensor(w, dtype=torch.float32, device=device)
    if torch.device(device).type != "cpu":
        gen = torch.Generator(device=device).manual_seed(int(seed))
    n1 = int(round(iterations * split))
    _relax(y, t_rows, t_cols, t_w, stages[0], n1, learning_rate, negatives, gen)
    _relax(y, t_rows, t_cols, t_w, stages[1], iterations - n1, learning_rate, negatives, gen)
    return y.cpu().numpy().astype(np.float64)
