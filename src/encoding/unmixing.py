"""Statistical unmixing of local neighbourhoods (the FerroNet recipe) and the displacement field.

Neighbourhoods: one sub-image per lattice site, centred on it with sub-pixel accuracy (bilinear
resampling), cut from the frame or from the segmenter's class-probability maps (``(C, H, W)``,
all channels stacked). Each flattened sub-image is a row of the data matrix ``X`` ``(N, D)``.

Decompositions (scikit-learn), all on the same ``X``:

- ``pca``: principal components; the scree (explained-variance ratios) picks how many to keep:
  the smallest number whose ratio exceeds ``scree_floor`` times the first one's.
- ``nmf``: non-negative factorisation of ``X - min(X)``.
- ``ica``: FastICA.
- ``gmm``: Gaussian mixture on the PCA scores; its responsibilities are the loadings.

Each gives loadings ``(N, k)`` (one loading map per component: the loading at every site) and
components ``(k, D)`` (what each component looks like as a sub-image). Sites are assigned to
domains by a Gaussian mixture on the loadings whose number of components is chosen by BIC
(nothing tells it how many domains there are; components under ``min_fraction`` of the sites,
the tails and wall sites, join the nearest large one); the GMM decomposition assigns directly.
Centre the sub-images on the displaced species (the B sites of a perovskite): each then shows
its own cell, while an A-centred window mixes the four B sites around it, from two domains at
a wall.

:func:`lattice_displacements` gives every site's displacement from its ideal lattice position:
the lattice (origin, ``a1``, ``a2``) is fitted by least squares to a reference sublattice (e.g.
the A cations) and every sublattice keeps its mean offset in the cell, so what remains is the
local distortion (the B-site off-centring that makes the polarisation).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.decomposition import NMF, PCA, FastICA
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from torch.nn import functional as F

from stemagent.errors import InputError
from stemagent.encoding.hierarchy import _translation_lattice
from stemagent.encoding.patches import nearest_neighbour_distance

METHODS = ("pca", "nmf", "ica", "gmm")


def neighbourhoods(maps: np.ndarray, centres_rc: np.ndarray, half_px: int) -> np.ndarray:
    """Sub-images ``(N, C * (2h+1)^2)`` of ``maps`` ``(H, W)`` or ``(C, H, W)`` centred on
    ``centres_rc`` ``(N, 2)`` (bilinear, zero outside the map)."""
    m = np.asarray(maps, dtype=np.float32)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise InputError("maps.shape", m.shape, "must be (H, W) or (C, H, W)")
    if not np.all(np.isfinite(m)):
        raise InputError("maps", "non-finite", "must be finite")
    c = np.asarray(centres_rc, dtype=np.float64).reshape(-1, 2)
    if len(c) == 0:
        raise InputError("sites", 0, "no sites to unmix")
    if not np.all(np.isfinite(c)):
        raise InputError("sites", "non-finite", "site positions must be finite")
    if int(half_px) < 1:
        raise InputError("half_px", half_px, "must be >= 1")
    ch, h, w = m.shape
    off = torch.arange(-half_px, half_px + 1, dtype=torch.float64)
    rr = torch.as_tensor(c[:, 0])[:, None, None] + off[None, :, None]
    cc = torch.as_tensor(c[:, 1])[:, None, None] + off[None, None, :]
    rr, cc = torch.broadcast_tensors(rr, cc)
    grid = torch.stack([cc / (w - 1) * 2 - 1, rr / (h - 1) * 2 - 1], dim=-1).float()  # (N, S, S, 2) as (x, y)
    src = torch.as_tensor(m)[None].expand(len(c), ch, h, w)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(len(c), -1).numpy().astype(np.float64)


@dataclass
class Unmixing:
    """One decomposition: ``loadings`` ``(N, k)``, ``components`` ``(k, D)``, ``domains`` ``(N,)``
    (BIC-chosen mixture on the loadings), ``scree`` (PCA only: explained-variance ratios)."""

    method: str
    loadings: np.ndarray
    components: np.ndarray
    domains: np.ndarray
    scree: np.ndarray | None = None
    info: dict = field(default_factory=dict)


def scree_components(ratios: np.ndarray, floor: float = 0.2, max_components: int = 8) -> int:
    """How many principal components to keep: those whose explained-variance ratio is at least
    ``floor`` times the first one's (at least 1, at most ``max_components``)."""
    r = np.asarray(ratios, dtype=np.float64)
    if len(r) == 0 or r[0] <= 0:
        return 1
    return int(max(1, min(max_components, np.sum(r >= floor * r[0]))))


def assign_domains(loadings: np.ndarray, max_domains: int = 6, seed: int = 0, min_fraction: float = 0.05) -> np.ndarray:
    """Domain id per site ``(N,)``: a Gaussian mixture on the loadings (centred, one common scale,
    so a strong component weighs more than a weak one), the number of components
    (1..``max_domains``) chosen by BIC; components holding less than ``min_fraction`` of the
    sites (the tails and the sites inside walls, which sit between two domains) join the nearest
    large one. Ids ordered by decreasing size."""
    z = np.asarray(loadings, dtype=np.float64)
    z = (z - z.mean(axis=0)) / max(float(z.std()), 1e-12)
    best = None
    for k in range(1, max(1, min(max_domains, len(z) // 5)) + 1):
        g = GaussianMixture(k, covariance_type="full", random_state=seed, n_init=1, reg_covar=1e-3).fit(z)
        bic = g.bic(z)
        if best is None or bic < best[0]:
            best = (bic, g)
    lab = best[1].predict(z) if best is not None else np.zeros(len(z), dtype=np.int64)
    return _merge_small(z, lab, min_fraction)


def _merge_small(z: np.ndarray, lab: np.ndarray, min_fraction: float) -> np.ndarray:
    """Join clusters under ``min_fraction`` of the sites, and clusters that lie between two larger
    ones (sites inside a wall, half one domain and half the other), to the nearest large one."""
    lab = _merge_between(z, lab)
    counts = np.bincount(lab)
    big = np.flatnonzero(counts >= min_fraction * len(lab))
    if len(big) == 0:
        big = np.array([int(np.argmax(counts))])
    centres = np.stack([z[lab == b].mean(axis=0) for b in big])
    small = ~np.isin(lab, big)
    if small.any():
        d = np.linalg.norm(z[small][:, None, :] - centres[None], axis=2)
        lab = lab.copy()
        lab[small] = big[np.argmin(d, axis=1)]
    return _by_size(lab)


def unmix(x: np.ndarray, method: str, n_components: int | None = None, scree_floor: float = 0.2,
          max_domains: int = 6, seed: int = 0, min_fraction: float = 0.05) -> Unmixing:
    """Decompose ``x`` ``(N, D)`` by ``method`` (one of :data:`METHODS`). ``n_components`` None:
    from the PCA scree (:func:`scree_components`)."""
    x = np.asarray(x, dtype=np.float64)
    if method not in METHODS:
        raise InputError("method", method, f"must be one of {METHODS}")
    if x.ndim != 2 or len(x) < 4:
        raise InputError("neighbourhoods.shape", x.shape, "need at least 4 sub-images (N, D)")
    pca = PCA(n_components=min(20, x.shape[1], len(x) - 1), random_state=seed).fit(x)
    scree = pca.explained_variance_ratio_
    k = int(n_components) if n_components is not None else scree_components(scree, scree_floor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if method == "pca":
            loadings = pca.transform(x)[:, :k]
            comps = pca.components_[:k]
        elif method == "nmf":  # parts, not directions: one part per domain, k directions part k + 1 domains
            model = NMF(n_components=k + 1, init="nndsvda", random_state=seed, max_iter=500)
            loadings = model.fit_transform(x - x.min())
            comps = model.components_
        elif method == "ica":
            model = FastICA(n_components=k, random_state=seed, whiten="unit-variance", max_iter=1000)
            strength = np.linalg.norm(model.fit(x).mixing_, axis=0)  # unit-variance sources, weighed by how much each mixes in
            loadings = model.transform(x) * strength
            comps = model.mixing_.T
        else:
            scores = pca.transform(x)[:, :k]
            best = None
            for j in range(1, max_domains + 1):
                g = GaussianMixture(j, covariance_type="full", random_state=seed, n_init=1, reg_covar=1e-6).fit(scores)
                bic = g.bic(scores)
                if best is None or bic < best[0]:
                    best = (bic, g)
            assert best is not None
            loadings = best[1].predict_proba(scores)
            comps = best[1].means_ @ pca.components_[:k] + pca.mean_
            domains = _merge_small(scores, np.argmax(loadings, axis=1), min_fraction)
            return Unmixing(method, loadings, comps, domains, scree, {"n_components": k})
    return Unmixing(method, loadings, comps, assign_domains(loadings, max_domains, seed, min_fraction), scree, {"n_components": k})


def _merge_between(z: np.ndarray, lab: np.ndarray) -> np.ndarray:
    lab = lab.copy()
    while True:
        ids, counts = np.unique(lab, return_counts=True)
        if len(ids) < 3:
            return lab
        centres = {int(i): z[lab == i].mean(axis=0) for i in ids}
        merged = False
        for c in ids[np.argsort(counts)]:
            others = [int(i) for i in ids if i != c and np.sum(lab == i) > np.sum(lab == c)]
            for ia, a in enumerate(others):
                for b in others[ia + 1:]:
                    ab = centres[b] - centres[a]
                    t = float(np.dot(centres[int(c)] - centres[a], ab) / max(np.dot(ab, ab), 1e-30))
                    off = np.linalg.norm(centres[a] + t * ab - centres[int(c)])
                    if 0.15 < t < 0.85 and off < 0.25 * np.linalg.norm(ab):
                        sel = lab == c
                        da = np.linalg.norm(z[sel] - centres[a], axis=1)
                        db = np.linalg.norm(z[sel] - centres[b], axis=1)
                        lab[np.flatnonzero(sel)] = np.where(da <= db, a, b)
                        merged = True
                        break
                if merged:
                    break
            if merged:
                break
        if not merged:
            return lab


def _by_size(labels: np.ndarray) -> np.ndarray:
    uniq, counts = np.unique(labels, return_counts=True)
    lut = {int(u): i for i, u in enumerate(uniq[np.argsort(-counts, kind="stable")])}
    return np.asarray([lut[int(v)] for v in labels], dtype=np.int64)


@dataclass
class Lattice:
    """A fitted 2D lattice: ``origin_A`` ``(2,)``, ``vectors_A`` ``(2, 2)`` rows ``a1``, ``a2``."""

    origin_A: np.ndarray
    vectors_A: np.ndarray

    def fractional(self, xy: np.ndarray) -> np.ndarray:
        return (np.asarray(xy, dtype=np.float64) - self.origin_A) @ np.linalg.inv(self.vectors_A)

    def cartesian(self, frac: np.ndarray) -> np.ndarray:
        return np.asarray(frac, dtype=np.float64) @ self.vectors_A + self.origin_A


def fit_lattice(xy: np.ndarray, vectors_guess: np.ndarray | None = None) -> Lattice:
    """Least-squares lattice through points ``xy`` ``(N, 2)`` of one sublattice (each point gets the
    nearest integer indices, then origin and vectors are refitted, twice)."""
    p = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(p) < 4:
        raise InputError("reference sites", len(p), "need at least 4 sites to fit a lattice")
    if vectors_guess is None:
        nn = nearest_neighbour_distance(p)
        vectors_guess = _translation_lattice(p, np.zeros(len(p), dtype=np.int64), nn, np.random.default_rng(0))
    lat = Lattice(p[np.argmin(np.linalg.norm(p - np.median(p, axis=0), axis=1))].copy(), np.asarray(vectors_guess, dtype=np.float64))
    for _ in range(2):
        ij = np.round(lat.fractional(p))
        a = np.concatenate([np.ones((len(p), 1)), ij], axis=1)
        sol, *_ = np.linalg.lstsq(a, p, rcond=None)
        lat = Lattice(sol[0], sol[1:3])
    return lat


def lattice_displacements(positions_A: np.ndarray, sublattice: np.ndarray, reference: int = 0) -> tuple[np.ndarray, Lattice]:
    """Displacement ``(N, 2)`` (Å) of every site from its ideal position, and the lattice fitted
    to the sites of sublattice ``reference`` (``sublattice`` ``(N,)`` ints: e.g. the atoms' class)."""
    p = np.asarray(positions_A, dtype=np.float64).reshape(-1, 2)
    sub = np.asarray(sublattice, dtype=np.int64).reshape(-1)
    if sub.shape != (len(p),):
        raise InputError("sublattice.shape", sub.shape, f"must be ({len(p)},)")
    if not np.all(np.isfinite(p)):
        raise InputError("positions_A", "non-finite", "must be finite")
    lat = fit_lattice(p[sub == reference])
    frac = lat.fractional(p)
    disp = np.zeros_like(p)
    for s in np.unique(sub):
        sel = sub == s
        f = frac[sel]
        ang = 2 * np.pi * f
        mean_off = np.arctan2(np.sin(ang).mean(axis=0), np.cos(ang).mean(axis=0)) / (2 * np.pi)  # circular mean
        cell = np.round(f - mean_off)
        ideal = lat.cartesian(cell + mean_off)
        disp[sel] = p[sel] - ideal
    return disp, lat
