"""Ideal-observer (oracle) bound on per-class detection F1 in a counting-noise image.

An incoherent (ADF) image is linear in its columns: column ``k`` with weight ``w_k`` adds
``w_k * psf(r - r_k)`` to the mean, and the pixels are independent Poisson counts. The oracle
knows every site's position and the true species of every *other* site; for site ``k`` with
true weight ``s_k`` it scores each alternative weight ``a_kh`` by the log-likelihood of the
observed counts ``y``

    lambda_h = expected - s_k * psf_k + a_kh * psf_k
    L_kh     = sum_p [ y_p log lambda_h,p - lambda_h,p ]       (constant -log y_p! dropped)

over a window around the site (pixels further away are identical under every hypothesis).
A class made of several compositions (e.g. substituted = {SSe, Se2}) has the mixture likelihood
of its compositions; with class priors this gives the posterior ``P(c | y)`` of every site.

:func:`f1_scores` turns posteriors into per-class F1: of the MAP decision, and the maximum over
thresholds of the one-vs-rest statistic ``P(c | y)``. The latter is the bound: ``P(c | y)`` is
monotone in the likelihood ratio of class ``c`` against the rest, so (Neyman-Pearson) its ROC
dominates that of any per-site rule on the same data; F1 rises with TPR and falls with FPR, so
no such rule beats its best F1 in expectation. A real detector also has to find the sites and
does not know the neighbours' species, so this is an upper bound for any detector.

:func:`oracle_posteriors` builds the hypotheses from a digital-twin frame's ground truth (a
``FrameTruth``, used duck-typed: core does not import the simulators). The PSF and the
element table are passed in by the caller.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp

from stemagent.errors import InputError
from stemagent.segmentation.crlb import sample_centered, window_pixels

# per specimen kind: class name (as in the twin's truth.class_names) -> compositions it covers
CLASS_COMPOSITIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "graphene": {"C": ("C",), "Si": ("Si",), "vacancy": ("",)},
    "mos2": {"metal": ("Mo",), "chalcogen": ("S2",), "substituted": ("SSe", "Se2"), "vacancy": ("S", "Se", "")},
    "ws2": {"metal": ("W",), "chalcogen": ("S2",), "substituted": ("SSe", "Se2"), "vacancy": ("S", "Se", "")},
}
# classes whose sites are told apart from the rest by position alone (their own family, trivial)
FIXED_CLASSES = ("metal",)
ABSENT_COUNT = 1e-3  # pseudo-count of a composition or class absent from the frame


def _checked(centers_rc: Any, psf: Any, psf_spacing_px: float, radius_px: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    rc = np.asarray(centers_rc, dtype=np.float64)
    if rc.ndim != 2 or rc.shape[1] != 2:
        raise InputError("centers_rc.shape", rc.shape, "must be (N, 2) pixel (row, col)")
    p = np.asarray(psf, dtype=np.float64)
    if p.ndim != 2 or min(p.shape) < 4:
        raise InputError("psf.shape", p.shape, "must be a 2-D array, at least 4 x 4")
    if not (np.isfinite(psf_spacing_px) and psf_spacing_px > 0):
        raise InputError("psf_spacing_px", psf_spacing_px, "must be positive (frame pixels per PSF sample)")
    half = (np.asarray(p.shape) - 1) / 2.0
    rad = int(np.floor(min(half) * psf_spacing_px)) if radius_px is None else int(radius_px)
    if rad < 1:
        raise InputError("radius_px", radius_px, "must be at least 1 pixel")
    return rc, p, rad


def site_loglik(
    image: np.ndarray,
    expected: np.ndarray,
    centers_rc: np.ndarray,
    true_weight: np.ndarray,
    alt_weights: np.ndarray,
    psf: np.ndarray,
    psf_spacing_px: float,
    *,
    radius_px: int | None = None,
    floor_counts: float | None = None,
    chunk_sites: int = 128,
) -> np.ndarray:
    """Poisson log-likelihood ``(N, H)`` of ``image`` with site ``k`` at weight ``alt_weights[k, h]``.

    ``image``: ``(rows, cols)`` observed counts. ``expected``: the noiseless mean with every site
    at its true weight ``true_weight`` ``(N,)`` (and anything else: background, sites outside the
    field). ``centers_rc`` ``(N, 2)``: the sites' pixel positions. ``psf``: image of a unit column,
    centred, sampled every ``psf_spacing_px`` frame pixels, in units making ``weight * psf`` counts.
    ``radius_px``: half-size of the window (default the PSF's half-extent). ``floor_counts``: the
    smallest mean a pixel may take (default ``1e-6`` of the mean of ``expected``).
    Only differences between hypotheses of one site are meaningful.
    """
    y = np.asarray(image, dtype=np.float64)
    mu = np.asarray(expected, dtype=np.float64)
    if mu.ndim != 2:
        raise InputError("expected.shape", mu.shape, "must be 2-D (rows, cols)")
    if y.shape != mu.shape:
        raise InputError("image.shape", y.shape, f"must equal expected.shape {mu.shape}")
    rc, p, rad = _checked(centers_rc, psf, psf_spacing_px, radius_px)
    n = len(rc)
    s = np.asarray(true_weight, dtype=np.float64).reshape(-1)
    if s.shape != (n,):
        raise InputError("true_weight.shape", s.shape, f"must be ({n},), one per site")
    a = np.asarray(alt_weights, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != n:
        raise InputError("alt_weights.shape", a.shape, f"must be ({n}, H), hypotheses per site")
    floor = 1e-6 * max(float(np.mean(np.abs(mu))), 1e-300) if floor_counts is None else float(floor_counts)
    if not floor > 0:
        raise InputError("floor_counts", floor_counts, "must be positive")
    out = np.zeros((n, a.shape[1]))
    h, w = mu.shape
    for lo in range(0, n, max(1, int(chunk_sites))):
        sl = slice(lo, min(n, lo + max(1, int(chunk_sites))))
        pr, pc, inside = window_pixels(rc[sl], (h, w), rad)
        g = sample_centered(p, psf_spacing_px, rc[sl], pr, pc) * inside
        r_, c_ = np.clip(pr, 0, h - 1), np.clip(pc, 0, w - 1)
        yy = y[r_, c_] * inside
        base = mu[r_, c_] - s[sl, None, None] * g
        for j in range(a.shape[1]):
            lam = np.maximum(base + a[sl, j, None, None] * g, floor)
            out[sl, j] = np.sum((yy * np.log(lam) - lam) * inside, axis=(1, 2))
    return out


def incoherent_image(
    shape: tuple[int, int],
    centers_rc: np.ndarray,
    weights: np.ndarray,
    psf: np.ndarray,
    psf_spacing_px: float,
    *,
    radius_px: int | None = None,
) -> np.ndarray:
    """``sum_k weights[k] * psf(r - centers_rc[k])`` on a ``shape`` image (the model behind :func:`site_loglik`)."""
    rc, p, rad = _checked(centers_rc, psf, psf_spacing_px, radius_px)
    wts = np.asarray(weights, dtype=np.float64).reshape(-1)
    if wts.shape != (len(rc),):
        raise InputError("weights.shape", wts.shape, f"must be ({len(rc)},), one per site")
    out = np.zeros(shape)
    pr, pc, inside = window_pixels(rc, shape, rad)
    g = sample_centered(p, psf_spacing_px, rc, pr, pc) * wts[:, None, None]
    np.add.at(out, (pr[inside], pc[inside]), g[inside])
    return out


def class_loglik(loglik: np.ndarray, hyp_class: np.ndarray, hyp_weight: np.ndarray, n_classes: int) -> np.ndarray:
    """Mixture log-likelihood ``(N, C)`` of each class from hypothesis log-likelihoods ``(N, H)``.

    ``hyp_class`` ``(H,)``: the class of each hypothesis; ``hyp_weight`` ``(H,)``: its prior weight
    inside its class (normalised here per class). A class without hypotheses gets ``-inf``.
    """
    ll = np.asarray(loglik, dtype=np.float64)
    cls = np.asarray(hyp_class).reshape(-1)
    wt = np.asarray(hyp_weight, dtype=np.float64).reshape(-1)
    if ll.ndim != 2 or cls.shape != (ll.shape[1],) or wt.shape != cls.shape:
        raise InputError("loglik.shape", ll.shape, f"must be (N, H) with H = len(hyp_class) = {cls.shape} = len(hyp_weight) {wt.shape}")
    if np.any(wt < 0) or np.any((cls < 0) | (cls >= n_classes)):
        raise InputError("hyp_class/hyp_weight", (cls.tolist(), wt.tolist()), f"classes must be in [0, {n_classes}), weights >= 0")
    out = np.full((ll.shape[0], n_classes), -np.inf)
    for c in np.unique(cls):
        sel = cls == c
        lw = np.log(wt[sel] / np.sum(wt[sel]))
        out[:, c] = logsumexp(ll[:, sel] + lw[None, :], axis=1)
    return out


def posteriors(class_ll: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Class posteriors ``(N, C)`` from class log-likelihoods ``(N, C)`` and priors ``(C,)`` or ``(N, C)``."""
    ll = np.asarray(class_ll, dtype=np.float64)
    pr = np.broadcast_to(np.asarray(prior, dtype=np.float64), ll.shape) if ll.ndim == 2 else None
    if ll.ndim != 2 or pr is None:
        raise InputError("class_ll.shape", ll.shape, "must be (N, C)")
    if np.any(pr < 0):
        raise InputError("prior", np.asarray(prior).tolist(), "must be non-negative")
    with np.errstate(divide="ignore"):
        z = ll + np.log(pr)
    z = z - logsumexp(z, axis=1)[:, None]
    return np.exp(z)


def max_f1_over_thresholds(score: np.ndarray, positive: np.ndarray) -> float:
    """Best F1 of the rule ``score >= t`` over every threshold ``t`` (nan when nothing is positive).

    Sort-based: predictions are added in decreasing score, a tie group at a time.
    """
    sc = np.asarray(score, dtype=np.float64).reshape(-1)
    pos = np.asarray(positive, dtype=bool).reshape(-1)
    if sc.shape != pos.shape:
        raise InputError("positive.shape", pos.shape, f"must equal score.shape {sc.shape}")
    n_pos = int(pos.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-sc, kind="stable")
    s_sorted = sc[order]
    tp = np.cumsum(pos[order])
    n_pred = np.arange(1, len(sc) + 1)
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # end of each tie group
    f1 = 2.0 * tp[last] / (n_pred[last] + n_pos)
    return float(np.max(f1))


def f1_scores(posterior: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class ``(map_f1 (C,), max_f1 (C,))``: F1 of the MAP decision and the best one-vs-rest
    threshold on ``P(c | y)``. nan for a class with neither true nor (MAP) predicted members."""
    post = np.asarray(posterior, dtype=np.float64)
    lab = np.asarray(labels).reshape(-1)
    if post.ndim != 2 or lab.shape != (post.shape[0],):
        raise InputError("labels.shape", lab.shape, f"must be ({post.shape[0] if post.ndim == 2 else '?'},) for posterior {post.shape}")
    n_cls = post.shape[1]
    if len(lab) and (lab.min() < 0 or lab.max() >= n_cls):
        raise InputError("labels", (int(lab.min()), int(lab.max())), f"must be class indices in [0, {n_cls})")
    pred = np.argmax(post, axis=1)
    map_f1 = np.full(n_cls, np.nan)
    max_f1 = np.full(n_cls, np.nan)
    for c in range(n_cls):
        t, p = lab == c, pred == c
        d = int(t.sum() + p.sum())
        if d:
            map_f1[c] = 2.0 * np.sum(t & p) / d
        max_f1[c] = max_f1_over_thresholds(post[:, c], t)
    return map_f1, max_f1


# --- hypotheses from a digital-twin frame --------------------------------------------------

_TOKEN = re.compile(r"([A-Z][a-z]?)(\d*)")


def composition_atoms(composition: str) -> list[str]:
    """``"SSe"`` -> ``["S", "Se"]``, ``"S2"`` -> ``["S", "S"]``, ``""`` -> ``[]``."""
    atoms: list[str] = []
    pos = 0
    for m in _TOKEN.finditer(composition):
        if m.start() != pos:
            break
        atoms += [m.group(1)] * (int(m.group(2)) if m.group(2) else 1)
        pos = m.end()
    if pos != len(composition):
        raise InputError("composition", composition, "must be element symbols with optional counts, e.g. 'S2', 'SSe'")
    return atoms


@dataclass
class OracleResult:
    """Per site of one frame: ``posterior`` ``(K, C)`` over ``class_names`` (the truth's), ``labels`` ``(K,)``."""

    class_names: tuple[str, ...]
    posterior: np.ndarray
    labels: np.ndarray


def oracle_posteriors(
    image: np.ndarray,
    truth: Any,
    psf: np.ndarray,
    psf_spacing_px: float,
    atomic_number: Callable[[str], int],
    *,
    radius_px: int | None = None,
) -> OracleResult:
    """Ideal-observer posteriors for every visible site of a twin frame.

    ``truth``: the frame's ``FrameTruth`` (``expected_image``, ``pixels_rc``, ``labels``,
    ``species``, ``electrons_per_pixel``, ``adf``, ``detector``, ``specimen_kind``,
    ``class_names``). ``psf``: the twin's unit-column image in 1/Å² sampled every
    ``psf_spacing_px`` frame pixels. ``atomic_number``: element symbol -> Z.
    Column weight of a composition = electrons/pixel x efficiency x sum of its atoms'
    cross-sections (counts); the image and mean are taken back to counts through gain and offset.
    Compositions of a class are mixed by their frequency in this frame, classes weighted by
    their frequency among the sites of their family (oracle priors).
    """
    kind = str(truth.specimen_kind)
    if kind not in CLASS_COMPOSITIONS:
        raise InputError("truth.specimen_kind", kind, f"has no hypotheses (one of {sorted(CLASS_COMPOSITIONS)})")
    det = truth.detector
    if det.read_noise:
        raise InputError("truth.detector.read_noise", det.read_noise, "must be 0: the ideal observer is for a counting (Poisson) detector")
    names = tuple(truth.class_names)
    table = CLASS_COMPOSITIONS[kind]
    if set(names) != set(table):
        raise InputError("truth.class_names", names, f"must be the classes {sorted(table)} of {kind}")
    img = np.asarray(image, dtype=np.float64)
    counts = (img - det.offset) / det.gain
    mean = (np.asarray(truth.expected_image, dtype=np.float64) - det.offset) / det.gain
    labels = np.asarray(truth.labels, dtype=np.int64)
    species = np.asarray(truth.species).astype(str)
    n_sites = len(labels)
    per_count = float(truth.electrons_per_pixel) * float(det.efficiency)

    def weight(comp: str) -> float:
        atoms = composition_atoms(comp)
        z = np.asarray([atomic_number(a) for a in atoms], dtype=np.float64)
        return per_count * float(np.sum(truth.adf.cross_section_A2(z))) if len(z) else 0.0

    known = {c for comps in table.values() for c in comps}
    odd = sorted(set(species) - known)
    if odd:
        raise InputError("truth.species", odd, f"compositions without a hypothesis for {kind}")
    post = np.zeros((n_sites, len(names)))
    fixed = [names.index(c) for c in FIXED_CLASSES if c in names]
    for c in fixed:
        post[labels == c, c] = 1.0
    fam_classes = [i for i in range(len(names)) if i not in fixed]
    fam = np.flatnonzero(np.isin(labels, fam_classes))
    if len(fam):
        hyp_comp = [comp for i in fam_classes for comp in table[names[i]]]
        hyp_class = np.asarray([k for k, i in enumerate(fam_classes) for _ in table[names[i]]])
        hyp_w = np.asarray([max(np.sum(species[fam] == comp), ABSENT_COUNT) for comp in hyp_comp], dtype=np.float64)
        alt = np.broadcast_to(np.asarray([weight(c) for c in hyp_comp]), (len(fam), len(hyp_comp)))
        true_w = np.asarray([weight(c) for c in species[fam]])
        ll = site_loglik(counts, mean, np.asarray(truth.pixels_rc)[fam], true_w, alt, psf, psf_spacing_px, radius_px=radius_px)
        cll = class_loglik(ll, hyp_class, hyp_w, len(fam_classes))
        prior = np.asarray([max(np.sum(labels[fam] == i), ABSENT_COUNT) for i in fam_classes], dtype=np.float64)
        post[np.ix_(fam, fam_classes)] = posteriors(cll, prior / prior.sum())
    return OracleResult(class_names=names, posterior=post, labels=labels)
