"""Motif classes from per-atom feature vectors, with no number of classes given.

Three methods on the same reduced features (the first principal components):

- ``layout``: the force-relaxed kNN layout (:mod:`~stemagent.encoding.layout`), then HDBSCAN
  (scikit-learn) on the 2D map; points HDBSCAN leaves as noise join the cluster of their nearest
  clustered neighbour in the map.
- ``gmm``: scikit-learn Gaussian mixtures with 1..``max_components`` components; the number with
  the lowest BIC wins.
- ``robust``: host modes, then defects as outliers. Defect motifs are rare and sit a few noise
  widths from their host, so neither a density map nor a mixture sees them as clusters of their
  own. HDBSCAN with a large minimum size (``mode_fraction`` of the atoms) finds the host modes
  (e.g. metal and chalcogen columns); in each mode a robust covariance (trimmed, concentration
  steps, rescaled so the median distance matches the chi-square median) measures the photon noise
  of the host, every atom beyond the ``1 - alpha`` chi-square quantile is an outlier, and the
  outliers, whitened by that covariance, are grouped into defect motifs by diagonal Gaussian
  mixtures (number by BIC; a group that is still more than a couple of noise widths wide is split
  again on its own members, :func:`_split_wide`), in two tiers: outliers beyond the ``1 - alpha / 1000`` quantile are
  defects however few (a lone dopant); nearer ones count only as a group of at least
  ``min_cluster_size`` that sits off the host, i.e. whose centre is further from the host than
  its members are from each other (the host's own noise tail is scattered all round it and
  stays host).

:func:`score_labels` compares cluster ids with ground-truth classes after matching them
(many-to-one: each cluster takes the class most of its members have; or one-to-one: the
Hungarian assignment, unmatched clusters count as errors).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import chi2
from sklearn.cluster import HDBSCAN
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors

from stemagent.encoding.layout import force_layout
from stemagent.errors import InputError

WIDE_GROUP_SPREAD = 2.0  # an outlier group wider than this (host noise widths, RMS per feature) is split again ...
SCATTERED_GROUP_SPREAD = 10.0  # ... unless wider than this: odd detections scattered far apart, each its own motif if split


@dataclass
class Clusters:
    """``labels`` ``(N,)`` cluster id per point (0..k-1, every point assigned); ``reduced``
    ``(N, d)`` the features clustered; ``layout`` ``(N, 2)`` the force-relaxed map (``layout``
    method only); ``method``; ``info`` (e.g. the BIC curve)."""

    labels: np.ndarray
    reduced: np.ndarray
    method: str
    layout: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0


def fit_reduction(x: np.ndarray, components: int, standardise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Centre ``(d,)`` and projection ``(d, k)`` onto the first ``k = components`` principal
    components of ``x`` ``(N, d)`` (columns divided by their robust spread when ``standardise``)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise InputError("features.shape", x.shape, "must be (N, d) with N >= 1")
    if not np.all(np.isfinite(x)):
        raise InputError("features", "non-finite", "feature vectors must be finite")
    centre = x.mean(axis=0)
    scale = np.ones(x.shape[1])
    if standardise:
        mad = np.median(np.abs(x - np.median(x, axis=0)), axis=0) * 1.4826
        scale = np.where(mad > 1e-12, mad, np.maximum(x.std(axis=0), 1e-12))
    z = (x - centre) / scale
    k = max(1, min(components, z.shape[1], len(z) - 1))
    evals, evecs = np.linalg.eigh(z.T @ z)  # (d, d): cheaper than an SVD of (N, d)
    top = evecs[:, np.argsort(evals)[::-1][:k]]
    top *= np.where(top[np.argmax(np.abs(top), axis=0), np.arange(k)] < 0, -1.0, 1.0)  # deterministic signs
    return centre, top / scale[:, None]


def reduce_features(x: np.ndarray, components: int, standardise: bool = False) -> np.ndarray:
    """The first ``components`` principal components ``(N, components)`` of ``x``.

    Columns are *not* standardised by default: moments on an orthonormal basis all carry about
    the same photon noise, so raw magnitudes have roughly isotropic noise and the principal
    components rank directions by signal; scaling each column to unit spread would instead blow
    noise-only columns up to the size of the informative ones. ``standardise=True`` divides each
    column by its robust spread (MAD) first."""
    centre, proj = fit_reduction(x, components, standardise)
    return (np.asarray(x, dtype=np.float64) - centre) @ proj


def _assign_noise(y: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Give every noise point (-1) the label of its nearest labelled point."""
    noise = labels < 0
    if not noise.any():
        return labels
    if noise.all():
        return np.zeros_like(labels)
    nn = NearestNeighbors(n_neighbors=1).fit(y[~noise])
    _, idx = nn.kneighbors(y[noise])
    out = labels.copy()
    out[noise] = labels[~noise][idx[:, 0]]
    return out


def _compact(labels: np.ndarray) -> np.ndarray:
    """Relabel to 0..k-1 in order of decreasing cluster size (ties: first occurrence)."""
    uniq, counts = np.unique(labels, return_counts=True)
    order = uniq[np.argsort(-counts, kind="stable")]
    lut = {int(u): i for i, u in enumerate(order)}
    return np.asarray([lut[int(v)] for v in labels], dtype=np.int64)


def cluster_layout(
    z: np.ndarray,
    n_neighbors: int = 10,
    iterations: int = 100,
    min_cluster_size: int = 10,
    min_samples: int = 5,
    seed: int = 0,
    device: str = "cpu",
) -> Clusters:
    """Force-relaxed layout of ``z`` ``(N, d)`` clustered by HDBSCAN (``min_cluster_size``,
    ``min_samples``)."""
    n = len(z)
    if n < 3:
        return Clusters(np.zeros(n, dtype=np.int64), z, "layout", np.zeros((n, 2)))
    y = force_layout(z, n_neighbors=n_neighbors, iterations=iterations, seed=seed, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        raw = HDBSCAN(min_cluster_size=max(2, min(min_cluster_size, n)), min_samples=min(min_samples, n)).fit_predict(y)
    labels = _compact(_assign_noise(y, raw))
    return Clusters(labels, z, "layout", y, {"hdbscan_noise": int((raw < 0).sum())})


def cluster_gmm(z: np.ndarray, max_components: int = 10, covariance_type: str = "full", seed: int = 0) -> Clusters:
    """Gaussian mixtures with 1..``max_components`` components on ``z``; lowest BIC wins."""
    n = len(z)
    best: tuple[float, GaussianMixture] | None = None
    bics = []
    for k in range(1, max(1, min(max_components, n // 2)) + 1):
        g = GaussianMixture(k, covariance_type=covariance_type, random_state=seed, n_init=1, reg_covar=1e-4).fit(z)
        bic = float(g.bic(z))
        bics.append(bic)
        if best is None or bic < best[0]:
            best = (bic, g)
    labels = best[1].predict(z) if best is not None else np.zeros(n, dtype=np.int64)
    return Clusters(_compact(labels), z, "gmm", None, {"bic": bics})


def robust_covariance(z: np.ndarray, keep: float = 0.75, steps: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Location ``(d,)`` and covariance ``(d, d)`` of the bulk of ``z`` ``(n, d)``: the ``keep``
    fraction of points nearest in Mahalanobis distance, refined by concentration steps, the
    covariance rescaled so the median squared distance equals the chi-square median."""
    n, d = z.shape
    h = max(d + 1, int(keep * n))
    loc = np.median(z, axis=0)
    idx = np.argsort(np.linalg.norm(z - loc, axis=1))[:h]
    for _ in range(steps):
        loc = z[idx].mean(axis=0)
        cov = np.cov(z[idx], rowvar=False).reshape(d, d) + 1e-9 * np.eye(d)
        d2 = _mahalanobis2(z, loc, cov)
        idx = np.argsort(d2)[:h]
    loc = z[idx].mean(axis=0)
    cov = np.cov(z[idx], rowvar=False).reshape(d, d) + 1e-9 * np.eye(d)
    cov *= np.median(_mahalanobis2(z, loc, cov)) / chi2.ppf(0.5, d)
    return loc, cov


def _mahalanobis2(z: np.ndarray, loc: np.ndarray, cov: np.ndarray) -> np.ndarray:
    w = np.linalg.solve(np.linalg.cholesky(cov), (z - loc).T).T
    return np.einsum("ij,ij->i", w, w)


def _split_outliers(w: np.ndarray, min_size: int, seed: int, max_groups: int = 8) -> np.ndarray:
    """Groups of outliers ``w`` ``(n, d)`` (whitened by their host's noise): diagonal Gaussian
    mixtures of up to ``n / min_size`` components, number by BIC."""
    n = len(w)
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    kmax = max(1, min(max_groups, n // max(min_size, 2)))
    best: tuple[float, np.ndarray] | None = None
    for k in range(1, kmax + 1):
        g = GaussianMixture(k, covariance_type="diag", random_state=seed, reg_covar=1e-3).fit(w)
        bic = float(g.bic(w))
        if best is None or bic < best[0]:
            best = (bic, g.predict(w))
    return best[1] if best is not None else np.zeros(n, dtype=np.int64)


def _rms_spread(g: np.ndarray) -> float:
    """RMS distance of the rows of ``g`` ``(n, d)`` from their mean, per feature."""
    return float(np.sqrt(np.mean(np.sum((g - g.mean(axis=0)) ** 2, axis=1)) / g.shape[1]))


def _split_wide(w: np.ndarray, min_size: int, seed: int, max_spread: float = WIDE_GROUP_SPREAD, depth: int = 4) -> np.ndarray:
    """:func:`_split_outliers`, then every group wider than ``max_spread`` host noise widths
    (:func:`_rms_spread`) split again on its own members by the same BIC-chosen mixture (so a
    group is only split where its members form groups; a broad cloud stays whole), down to
    ``depth`` levels. A BIC split of all the outliers at once
    spends its components on the farthest ones (with U-Net atoms: detections on empty sites and
    duplicates, tens of noise widths out) and leaves a lone dopant, a vacancy's neighbours and a
    dopant's neighbours together in one group several noise widths wide. Groups wider than
    ``SCATTERED_GROUP_SPREAD`` are such odd detections, each far from the others: split, each would
    found a motif of its own and fill the library, so they stay one group."""
    sub = _split_outliers(w, min_size, seed)
    if depth <= 0 or len(w) < 2:
        return sub
    out = np.zeros(len(w), dtype=np.int64)
    nxt = 0
    for c in np.unique(sub):
        idx = np.flatnonzero(sub == c)
        inner = np.zeros(len(idx), dtype=np.int64)
        if 2 <= len(idx) < len(w) and max_spread < _rms_spread(w[idx]) <= SCATTERED_GROUP_SPREAD:
            inner = _split_wide(w[idx], min_size, seed, max_spread, depth - 1)
        out[idx] = nxt + inner
        nxt += int(inner.max()) + 1
    return out


def cluster_robust(
    z: np.ndarray, alpha: float = 0.01, mode_fraction: float = 0.1, min_cluster_size: int = 3, seed: int = 0,
    x: np.ndarray | None = None, mode_components: int | None = None,
) -> Clusters:
    """Host modes and defect motifs of ``z`` ``(N, d)`` (see the module docstring). With the full
    features ``x`` and ``mode_components``, each mode is searched for outliers in its own first
    principal components (the directions along which *its* atoms differ) instead of in ``z``."""
    n, d = z.shape
    if n < max(10, 3 * d):
        return Clusters(np.zeros(n, dtype=np.int64), z, "robust", None, {"modes": 1, "outliers": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        raw = HDBSCAN(min_cluster_size=max(15, int(mode_fraction * n)), min_samples=5).fit_predict(z)
    modes = _assign_noise(z, raw) if (raw >= 0).any() else np.zeros(n, dtype=np.int64)
    labels = modes.copy()
    nxt = int(modes.max()) + 1
    threshold = chi2.ppf(1.0 - alpha, d)
    n_out = 0
    for mode in np.unique(modes):
        idx = np.flatnonzero(modes == mode)
        if len(idx) < 3 * d:
            continue
        zm = z[idx] if x is None or not mode_components else reduce_features(x[idx], mode_components)
        dm = zm.shape[1]
        threshold = chi2.ppf(1.0 - alpha, dm)
        loc, cov = robust_covariance(zm)
        d2 = _mahalanobis2(zm, loc, cov)
        sel = d2 > threshold
        out = idx[sel]
        n_out += len(out)
        w = np.linalg.solve(np.linalg.cholesky(cov), (zm[sel] - loc).T).T
        far = np.sum(w**2, axis=1) > chi2.ppf(1.0 - alpha * 1e-3, dm)
        for tier in (far, ~far):  # far outliers are defects whatever their number; near ones must cluster
            if not tier.any():
                continue
            wt = w[tier]
            sub = _split_wide(wt, min_cluster_size if tier is not far else 1, seed)
            for c in np.unique(sub):
                g = wt[sub == c]
                if tier is not far:
                    centre = g.mean(axis=0)
                    spread = np.sqrt(np.mean(np.sum((g - centre) ** 2, axis=1)))
                    if len(g) < min_cluster_size or np.linalg.norm(centre) <= spread:
                        continue  # the host's own noise tail, scattered all round it: stays host
                labels[out[np.flatnonzero(tier)[sub == c]]] = nxt
                nxt += 1
    return Clusters(_compact(labels), z, "robust", None, {"modes": int(modes.max()) + 1, "outliers": n_out})


METHODS = ("robust", "layout", "gmm")


def cluster_features(x: np.ndarray, method: str = "robust", components: int = 4, seed: int = 0, **options) -> Clusters:
    """Reduce ``x`` ``(N, d)`` (see :func:`reduce_features`) and cluster it by ``method`` (one of
    :data:`METHODS`); ``options`` go to the method."""
    z = reduce_features(x, components)
    if method == "layout":
        return cluster_layout(z, seed=seed, **options)
    if method == "gmm":
        return cluster_gmm(z, seed=seed, **options)
    if method == "robust":
        return cluster_robust(z, seed=seed, x=x, **options)
    raise InputError("method", method, f"must be one of {METHODS}")


@dataclass
class LabelScore:
    """Agreement of cluster ids with true classes: ``accuracy`` (per atom), ``balanced`` (mean
    per-class recall), ``mapping`` cluster -> class (-1: unmatched), ``confusion`` ``(classes, clusters)``."""

    accuracy: float
    balanced: float
    mapping: dict[int, int]
    confusion: np.ndarray
    per_class_recall: dict[int, float]


def score_labels(pred: np.ndarray, truth: np.ndarray, one_to_one: bool = False) -> LabelScore:
    """Match cluster ids ``pred`` to classes ``truth`` (both ``(N,)`` non-negative ints) and score."""
    pred = np.asarray(pred, dtype=np.int64)
    truth = np.asarray(truth, dtype=np.int64)
    if pred.shape != truth.shape or len(pred) == 0:
        raise InputError("labels.shape", (pred.shape, truth.shape), "must be two equal non-empty (N,) arrays")
    nk, nc = int(pred.max()) + 1, int(truth.max()) + 1
    conf = np.zeros((nc, nk), dtype=np.int64)
    np.add.at(conf, (truth, pred), 1)
    if one_to_one:
        r, c = linear_sum_assignment(-conf)
        mapping = {k: -1 for k in range(nk)}
        for ci, ki in zip(r, c):
            mapping[int(ki)] = int(ci)
    else:
        mapping = {k: int(np.argmax(conf[:, k])) for k in range(nk)}
    mapped = np.asarray([mapping[int(k)] for k in pred])
    present = [c for c in range(nc) if np.any(truth == c)]
    recall = {c: float(np.mean(mapped[truth == c] == c)) for c in present}
    return LabelScore(
        accuracy=float(np.mean(mapped == truth)),
        balanced=float(np.mean(list(recall.values()))),
        mapping=mapping,
        confusion=conf,
        per_class_recall=recall,
    )
