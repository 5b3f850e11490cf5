"""Site classes from the counts around each site: a per-frame Poisson mixture over compositions.

In an incoherent (ADF) image a column's integrated intensity is, to a good approximation, the
sum of its atoms' intensities. A chalcogen column of a TMD holds two atoms, so its intensity
takes one of a few *levels*: ``2X`` (S2), ``X + Y`` (S + Se), ``2Y``, ``X`` (one atom missing),
``Y`` and ``0``, where ``X`` and ``Y`` are the single-atom intensities of the host and the
substituent. A graphene site is ``A`` (C), ``B`` (Si) or empty. Which level a site sits on is
what its class means, and the counts around it measure it directly (this is how atom counting
by statistical parameter estimation works on real data).

:func:`classify_by_counts` works per frame and per *family* of classes that share a sublattice.
Each site's pixel counts are Poisson with a mean of what its neighbours' fitted images and the
background put there plus the level's intensity times the probe's shape; the level weights,
the intensities, an unmodelled background and the detector gain are fitted to the frame by EM,
started from the network's own members of the family's *anchor* classes, so nothing about the
dose, the detector or the calibration is assumed. The class of each site is then the one of
highest posterior, the frame's level weights being the prior. This is the ideal observer's
decision with everything it knows (the probe, the neighbours, the intensities, the class
frequencies) estimated from the frame itself; it holds at a few counts per site, where the
network's own class odds (learnt over a training set with other defect densities) do not.

The network still decides where the sites are and which family (sublattice) each is on.
On held-out twin frames (BENCHMARKS.md, "Atom finding") this brings MoS2 at 1e4 e/Å² and
graphene carbon at 1e3 e/Å² to their targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field

import numpy as np

from stemagent.errors import InputError


@dataclass(frozen=True)
class Family:
    """Classes on one sublattice and the compositions that define them.

    ``levels``: ``(class name, composition)`` pairs, a composition being a tuple of atom symbols
    of the family's own alphabet (e.g. ``("X", "X")``); ``()`` is an empty site.
    ``anchors``: the classes whose network-called members fix the atom intensities; an anchor
    class's members are taken to sit on its first level in ``levels``. ``host``: the class a
    defect-free sublattice holds; every other class of the family is a defect label, which a
    site must earn (see ``min_evidence_nats`` of :func:`classify_by_counts`).
    """

    name: str
    levels: tuple[tuple[str, tuple[str, ...]], ...]
    anchors: tuple[str, ...]
    host: str = ""

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for c, _ in self.levels))

    def symbols(self) -> tuple[str, ...]:
        return tuple(sorted({s for _, comp in self.levels for s in comp}))


#: Families of the shipped segmenter's classes.
DEFAULT_FAMILIES: tuple[Family, ...] = (
    Family("graphene", levels=(("C", ("A",)), ("Si", ("B",)), ("vacancy", ())), anchors=("C", "Si"), host="C"),
    Family(
        "tmd-chalcogen",
        levels=(
            ("chalcogen", ("X", "X")),
            ("substituted", ("X", "Y")),
            ("substituted", ("Y", "Y")),
            ("column-vacancy", ("X",)),
            ("column-vacancy", ("Y",)),
            ("column-vacancy", ()),
        ),
        anchors=("chalcogen", "substituted"),
        host="chalcogen",
    ),
)

#: Least log-likelihood ratio (nats) of a defect class against the host class for a site to be
#: labelled with it. For a site that truly holds the host, ``P(LR > e^t) <= e^-t`` (the
#: likelihood ratio's mean under the host is 1), so ``t = ln(1 / 0.005)`` keeps false defect
#: labels at or below 0.5 % of host sites when the counts model holds; BENCHMARKS.md measures it
#: on defect-free twin frames across detectors.
MIN_EVIDENCE_NATS = float(np.log(1.0 / 0.005))

#: Intensities (times the host level) a host site near the frame's edge may show on its in-frame
#: pixels: the neighbours outside the frame are not modelled, so their tails add counts there
#: (BENCHMARKS.md, "Si on sub-scan edges", measures the spread on twin frames).
EDGE_HOST_BAND = (0.6, 1.5)


@dataclass
class IntensityResult:
    """``classes`` ``(N,)`` and ``class_posterior`` ``(N,)`` (probability of the chosen class
    from the mixture; the network's value where the site was not re-decided), ``decided``
    ``(N,)`` True where the mixture decided, ``families`` per family name: what the mixture
    found (intensities, level weights, background, gain) or why it was left to the network.
    ``evidence_nats`` ``(N,)``: for a decided site, the log-likelihood ratio of its counts under
    its class against its family's host class (0 for a host site; NaN where not decided);
    ``demoted`` ``(N,)``: True where the most probable class was a defect whose evidence fell
    short of ``min_evidence_nats``, so the site was given the host class."""

    classes: np.ndarray
    class_posterior: np.ndarray
    decided: np.ndarray
    families: dict[str, str]
    evidence_nats: np.ndarray = dc_field(default_factory=lambda: np.zeros(0))
    demoted: np.ndarray = dc_field(default_factory=lambda: np.zeros(0, dtype=bool))
    #: ``(N,)`` True where the site was decided on its in-frame pixels alone (``edge``)
    edge_decided: np.ndarray = dc_field(default_factory=lambda: np.zeros(0, dtype=bool))
    #: ``(N,)`` an edge-decided site's best intensity on its in-frame pixels over the host level (NaN elsewhere)
    edge_intensity_ratio: np.ndarray = dc_field(default_factory=lambda: np.zeros(0))


def _anchor_intensities(fam: Family, values: np.ndarray, net_names: np.ndarray, min_members: int) -> dict[str, float] | None:
    """Starting single-atom intensity of each symbol: least squares on the 10 %-trimmed means
    of the anchors' members' intensity estimates (a median of a few counts is too coarse)."""
    symbols = fam.symbols()
    comp_of: dict[str, tuple[str, ...]] = {}
    for c, comp in fam.levels:  # an anchor class's main level is its first
        comp_of.setdefault(c, comp)
    rows, rhs = [], []
    for cls in fam.anchors:
        sel = net_names == cls
        if int(sel.sum()) < min_members:
            continue
        v = np.sort(values[sel])
        cut = len(v) // 10
        rows.append([comp_of[cls].count(s) for s in symbols])
        rhs.append(float(v[cut : len(v) - cut].mean()))
    if not rows:
        return None
    a = np.asarray(rows, dtype=np.float64)
    sol, *_ = np.linalg.lstsq(a, np.asarray(rhs), rcond=None)
    known = a.sum(axis=0) > 0
    return {s: float(x) for s, x, k in zip(symbols, sol, known) if k and x > 0}


def _poisson_ll(x: np.ndarray, b: np.ndarray, q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Poisson log-likelihood ``(E, G)`` (constant dropped) of sites' pixels ``x`` ``(E, P)``
    (background ``b``, shape ``q``, both ``(E, P)``) at intensities ``c`` ``(E, G)``."""
    lam = b[:, None, :] + c[:, :, None] * q[:, None, :]
    return (x[:, None, :] * np.log(np.maximum(lam, 1e-12)) - lam).sum(axis=2)


def _ml_intensity(x: np.ndarray, b: np.ndarray, q: np.ndarray, host_level: float) -> np.ndarray:
    """Each site's maximum-likelihood intensity ``(E,)`` (non-negative) from its pixels ``x``,
    background ``b`` and shape ``q`` ``(E, P)``: the best of a coarse grid from 0 to 30x
    ``host_level``, then Newton steps on the concave log-likelihood."""
    grid = np.concatenate([[0.0], host_level * np.geomspace(0.03, 30.0, 10)])
    g = np.broadcast_to(grid, (len(x), len(grid)))
    c = g[np.arange(len(x)), np.argmax(_poisson_ll(x, b, q, g), axis=1)].copy()
    for _ in range(12):
        lam = b + c[:, None] * q
        grad = (x * q / lam - q).sum(axis=1)
        hess = -(x * q * q / lam**2).sum(axis=1)
        step = np.where(hess < 0, -grad / np.where(hess < 0, hess, -1.0), 0.0)
        c = np.maximum(0.0, c + step)
    return c


def _as_sites(x: np.ndarray, b: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels, background (floored above 0) and shape as float64 ``(E, P)``."""
    return (np.atleast_2d(np.asarray(x, np.float64)), np.atleast_2d(np.maximum(np.asarray(b, np.float64), 1e-9)),
            np.atleast_2d(np.asarray(q, np.float64)))


def _free_level_ratio(x: np.ndarray, b: np.ndarray, q: np.ndarray, host_level: float) -> tuple[float, float]:
    """``(log-likelihood ratio, intensity)`` of one site's pixels ``x`` ``(P,)`` (background ``b``,
    shape ``q``) at its own maximum-likelihood intensity (:func:`_ml_intensity`) against
    ``host_level`` (Poisson)."""
    x2, b2, q2 = _as_sites(x, b, q)
    c = float(_ml_intensity(x2, b2, q2, host_level)[0])
    ll = _poisson_ll(x2, b2, q2, np.array([[c, host_level]]))[0]
    return float(ll[0] - ll[1]), c


def _edge_glr(x: np.ndarray, b: np.ndarray, q: np.ndarray, host_level: float, band: tuple[float, float], gain: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edge sites' generalised likelihood ratios on their in-frame pixels: ``x``, ``b``, ``q``
    ``(E, P)`` (pixels outside the frame are zero in ``q`` and ``x``). The host hypothesis is any
    intensity in ``band`` ``(lo, hi)`` (times the host level): the neighbours outside the frame are
    not modelled, so a host column there may look brighter (or dimmer) than the level. Returns
    ``(bright, dim, ratio)`` ``(E,)``: the signed log-likelihood ratio (nats, over ``gain``) of the
    best intensity at or above ``hi`` (at or below ``lo``) against the best in the band (positive
    where the site's own best lies beyond that end of the band, negative where the band explains
    the counts better), and the site's best intensity over the host level."""
    x, b, q = _as_sites(x, b, q)
    lo, hi = band[0] * host_level, band[1] * host_level
    c = _ml_intensity(x, b, q, host_level)
    # concave in c: the best within an interval is the unconstrained best clipped into it
    ll = _poisson_ll(x, b, q, np.stack([np.clip(c, lo, hi), np.maximum(c, hi), np.minimum(c, lo)], axis=1))
    return (ll[:, 1] - ll[:, 0]) / gain, (ll[:, 2] - ll[:, 0]) / gain, c / max(host_level, 1e-12)


def _brighter(fam: Family, class_name: str) -> bool:
    """Whether ``class_name`` of ``fam`` has as many atoms as its host or more (a brighter column);
    a class without a level of its own counts as the host."""
    comp = dict(fam.levels)
    return len(comp.get(class_name, comp[fam.host])) >= len(comp[fam.host])


def classify_by_counts(
    counts: np.ndarray,
    others: np.ndarray,
    psf: np.ndarray,
    mask: np.ndarray,
    classes: np.ndarray,
    usable: np.ndarray,
    class_names: tuple[str, ...],
    families: tuple[Family, ...] = DEFAULT_FAMILIES,
    *,
    class_probs: np.ndarray | None = None,
    network_weight: float = 0.5,
    min_columns: int = 30,
    min_members: int = 3,
    iterations: int = 15,
    min_weight: float = 1e-3,
    free_level_members: float = 10.0,
    min_evidence_nats: float = MIN_EVIDENCE_NATS,
    edge: np.ndarray | None = None,
    edge_host_band: tuple[float, float] = EDGE_HOST_BAND,
    edge_min_share: float = 0.3,
) -> IntensityResult:
    """Re-decide each site's class within its family from the pixel counts around it.

    ``counts``, ``others``, ``psf``, ``mask`` ``(N, P)``: the ``P`` pixels of a window around
    each of the ``N`` sites (e.g. from :func:`~stemagent.segmentation.extract.aperture_counts`):
    raw counts, what the neighbours' fitted images and the background put there, the share of a
    column's integrated image on each pixel, and 1 for pixels that count. The counts of site
    ``i`` on composition level ``l`` are modelled as ``g x Poisson(lam / g)`` per pixel with
    ``lam = others + e + c_l psf``: ``c_l`` the integrated intensity of the level's atoms (a
    sum of single-atom intensities, one per symbol), ``e`` a constant the neighbours' model
    misses (e.g. a background the fit could not see at a few counts per pixel) and ``g`` the
    detector's gain (counts per electron; 1 for a counting detector), which also absorbs any
    extra scatter. This is the ideal observer's likelihood with the probe, the neighbours and
    the intensities estimated from the frame: it weighs each pixel by what it tells (a vacancy's
    counts come from its neighbours' tails at the rim, an atom's from the centre), and it is
    Poisson, so it holds at a few counts per site (at 1e3 e/Å² a carbon atom gives about 2).

    Per frame and family the level weights, the single-atom intensities, ``e`` and ``g`` are
    fitted by EM, started from the network's members of the anchor classes, so nothing about
    dose, detector or specimen is assumed. Every usable member of the family then takes the
    class of highest posterior: the frame's level weights are the prior, times the network's
    class probabilities to the power ``network_weight`` (they restate much of the same counts,
    hence below 1, but they also see the lattice around a site). The network still decides
    where sites are and which family (sublattice) a site is on. ``usable`` False (e.g. sites
    at the frame's edge, whose neighbours outside are not modelled) keep the network's class.

    A defect label must be earned: a site whose most probable class is not its family's host
    keeps that class only if the counts' log-likelihood ratio against the host (each class's
    levels weighed by the frame's level weights within the class) reaches ``min_evidence_nats``;
    otherwise it takes the host class. The ratio is in ``evidence_nats``.

    ``edge`` ``(N,)`` True for sites that are not ``usable`` because their neighbours outside the
    frame are not modelled (near the frame's edge): once the frame has measured the family, such a
    site (whose in-frame pixels hold at least ``edge_min_share`` of a typical site's image) is
    decided on its in-frame pixels alone, by a generalised likelihood ratio that lets a host
    column take any intensity within ``edge_host_band`` times the host level (the missing
    neighbours' tails add counts the model does not expect): a brighter defect class (as many
    atoms or more) must be better explained by an intensity above the band, a dimmer one by an
    intensity below it, by ``min_evidence_nats``; the best such class wins, else the host.
    Its class probability is the two-way posterior of that ratio (flat prior), so a site the
    counts lean towards a defect without earning it is reported as host with a low probability.
    ``edge_decided`` and ``edge_intensity_ratio`` say which sites and what they measured.
    """
    # pixels in float32 (the per-pixel pass dominates the cost), totals in float64 below
    x_all = np.asarray(counts, dtype=np.float32)
    n = len(x_all)
    x_all = x_all.reshape(n, -1)
    b_all = np.asarray(others, dtype=np.float32).reshape(n, -1) if n else np.zeros((0, x_all.shape[1]), np.float32)
    p_all = np.asarray(psf, dtype=np.float32).reshape(n, -1) if n else np.zeros((0, x_all.shape[1]), np.float32)
    m_all = np.asarray(mask, dtype=np.float32).reshape(n, -1) if n else np.zeros((0, x_all.shape[1]), np.float32)
    cls = np.asarray(classes).reshape(-1).astype(np.int64)
    ok = np.asarray(usable, dtype=bool).reshape(-1)
    for field, arr in (("others", b_all), ("psf", p_all), ("mask", m_all)):
        if arr.shape != x_all.shape:
            raise InputError(f"{field}.shape", arr.shape, f"must be {x_all.shape}, like counts")
    for field, arr in (("classes", cls), ("usable", ok)):
        if len(arr) != n:
            raise InputError(f"{field}.shape", arr.shape, f"must be ({n},), one per site like counts")
    if n and (cls.min() < 0 or cls.max() >= len(class_names)):
        raise InputError("classes", int(cls.max() if cls.max() >= len(class_names) else cls.min()), f"must index class_names ({len(class_names)} classes)")
    names = np.asarray(class_names)
    out_cls = cls.copy()
    probs = None if class_probs is None else np.asarray(class_probs, dtype=np.float64).reshape(n, len(class_names))
    out_p = probs[np.arange(n), cls] if probs is not None else np.ones(n)
    decided = np.zeros(n, dtype=bool)
    evidence = np.full(n, np.nan)
    demoted = np.zeros(n, dtype=bool)
    edge_ok = np.zeros(n, dtype=bool) if edge is None else np.asarray(edge, dtype=bool).reshape(-1)
    if len(edge_ok) != n:
        raise InputError("edge.shape", edge_ok.shape, f"must be ({n},), one per site like counts")
    lo_band, hi_band = (float(edge_host_band[0]), float(edge_host_band[1]))
    if not 0.0 < lo_band <= 1.0 <= hi_band:
        raise InputError("edge_host_band", edge_host_band, "must be (lo, hi) with 0 < lo <= 1 <= hi")
    edge_decided = np.zeros(n, dtype=bool)
    edge_ratio = np.full(n, np.nan)
    report: dict[str, str] = {}
    net_names = names[cls] if n else np.zeros(0, dtype=names.dtype)
    finite = np.isfinite(x_all).all(axis=1) & np.isfinite(b_all).all(axis=1) & np.isfinite(p_all).all(axis=1)
    for fam in families:
        if any(c not in class_names for c in fam.classes):
            report[fam.name] = "classes not in this model"
            continue
        member = np.isin(net_names, fam.classes) & ok & finite & ((p_all * m_all).sum(axis=1) > 0)
        if int(member.sum()) < min_columns:
            report[fam.name] = f"too few usable sites ({int(member.sum())} < {min_columns})"
            continue
        m = m_all[member]
        x = np.maximum(x_all[member], 0.0) * m
        b = np.maximum(b_all[member], 0.0) * m
        q = np.maximum(p_all[member], 0.0) * m
        tot_x, tot_b, tot_q = x.sum(axis=1, dtype=np.float64), b.sum(axis=1, dtype=np.float64), q.sum(axis=1, dtype=np.float64)
        # per-site intensity estimates of the anchors' members start the single-atom intensities
        atom = _anchor_intensities(fam, (tot_x - tot_b) / tot_q, net_names[member], min_members)
        if atom is None:
            report[fam.name] = "no anchor class with enough members"
            continue
        symbols = sorted(atom)
        lv = [(c, comp) for c, comp in fam.levels if all(s in atom for s in comp)]
        lcls = np.array([class_names.index(c) for c, _ in lv])
        # a site the network put in a class with no level here (its anchor had too few members
        # to fix the atom's intensity) keeps its class, and nothing moves into such a class
        keep = ~np.isin(cls[member], lcls)
        lone = (np.flatnonzero(member)[keep], x[keep], b[keep], q[keep], m[keep])
        if keep.any():
            member[np.flatnonzero(member)[keep]] = False
            m, x, b, q = m[~keep], x[~keep], b[~keep], q[~keep]
            tot_x, tot_b, tot_q = tot_x[~keep], tot_b[~keep], tot_q[~keep]
        comp = np.array([[k.count(s) for s in symbols] for _, k in lv], dtype=np.float64)  # (L, S)
        cs = np.array([max(atom[s], 1e-3) for s in symbols])
        share = np.array([np.mean(net_names[member] == c) for c, _ in lv]) / np.bincount(lcls, minlength=len(class_names))[lcls]
        pi = np.clip(share, min_weight, None)
        pi /= pi.sum()
        gain = 1.0
        level = comp @ cs  # (L,) integrated intensity of each level
        tot_m = m.sum(axis=1, dtype=np.float64)
        extra = 0.01 * float(cs.min() * tot_q.mean() / tot_m.mean())  # per pixel, refined below
        for _ in range(iterations):
            # the parameters come from the sites' totals (the EM of a Poisson mixture of linear
            # models); only the final decision below weighs the pixels one by one
            lam = np.maximum(tot_b[:, None] + extra * tot_m[:, None] + level[None, :] * tot_q[:, None], 1e-9)  # (N, L)
            logr = (tot_x[:, None] * np.log(lam) - lam) / gain + np.log(pi)[None, :]
            r = np.exp(logr - np.logaddexp.reduce(logr, axis=1, keepdims=True))
            pi_new = np.clip(r.mean(axis=0), min_weight, None)
            pi_new /= pi_new.sum()
            ratio = tot_x[:, None] / lam
            # EM update of each level's intensity (multiplicative, stays positive). A level with
            # enough members is measured on its own (ADF column intensities are not quite
            # additive: channelling makes a column of two atoms a little less than their sum);
            # the single-atom intensities are fitted to those levels and fix the rarer ones
            num = (r * ratio * tot_q[:, None]).sum(axis=0)
            den = (r * tot_q[:, None]).sum(axis=0)
            free = (r.sum(axis=0) >= free_level_members) & (den > 0) & (comp.sum(axis=1) > 0)
            level_new = np.where(free, level * num / np.maximum(den, 1e-12), level)
            if free.any():
                sol, *_ = np.linalg.lstsq(comp[free], level_new[free], rcond=None)
                held = comp[free].sum(axis=0) > 0  # symbols no free level measures keep their value
                cs = np.where(held & (sol > 0), sol, cs)
            level_new = np.where(free, level_new, comp @ cs)
            extra *= float((r * ratio * tot_m[:, None]).sum() / tot_m.sum())
            # over-dispersion only: at a few counts per site the mixture cannot tell a gain
            # below 1 from its own spread, and assuming more noise than there is is the safe side
            gain = float(np.clip((r * (tot_x[:, None] - lam) ** 2 / lam).sum() / len(x), 1.0, 100.0))
            converged = np.abs(pi_new - pi).max() < 1e-3 and np.abs(level_new - level).max() <= 1e-3 * level.max()
            pi, level = pi_new, level_new
            if converged:
                break
        # the decision: the Poisson likelihood of every pixel on every level (the sum of the
        # means is linear in the level, the log term needs the pixels)
        lam_px = b[:, None, :] + np.float32(extra) + level.astype(np.float32)[None, :, None] * q[:, None, :]  # (N, L, P)
        loglik = np.einsum("np,nlp->nl", x, np.log(np.maximum(lam_px, np.float32(1e-9)))).astype(np.float64)
        loglik -= tot_b[:, None] + extra * tot_m[:, None] + level[None, :] * tot_q[:, None]
        logpost = loglik / gain + np.log(pi)[None, :]
        cpost = np.full((len(x), len(class_names)), -np.inf)
        for k in np.unique(lcls):
            cpost[:, k] = np.logaddexp.reduce(logpost[:, lcls == k], axis=1)
        if probs is not None and network_weight > 0:
            cpost = cpost + network_weight * np.log(np.clip(probs[member], 1e-9, None))
        cpost -= np.logaddexp.reduce(cpost, axis=1, keepdims=True)
        idx = np.flatnonzero(member)
        best = cpost.argmax(axis=1)
        # the counts' likelihood of each class (its levels weighed within the class) against the host's
        loglev = loglik / gain
        cll = np.full((len(x), len(class_names)), -np.inf)
        for k in np.unique(lcls):
            w = np.log(pi[lcls == k] / pi[lcls == k].sum())
            cll[:, k] = np.logaddexp.reduce(loglev[:, lcls == k] + w[None, :], axis=1)
        host_k = class_names.index(fam.host) if fam.host in class_names else -1
        if host_k >= 0 and host_k in lcls:
            llr = cll[np.arange(len(x)), best] - cll[:, host_k]
            weak = (best != host_k) & ~(llr >= min_evidence_nats)
            demoted[idx[weak]] = True
            best = np.where(weak, host_k, best)
            evidence[idx] = np.where(weak, 0.0, llr)
            host_l = int(np.flatnonzero(lcls == host_k)[0])
            for j, xs, bs, qs, ms in zip(*lone):
                # a class with no level of its own (too few members to measure it): its label is
                # earned by the generalised likelihood ratio of the site's own best intensity
                # against the host level, on the class's side of it (fewer atoms: dimmer; others: brighter)
                glr, c_hat = _free_level_ratio(xs, bs + np.float32(extra) * ms, qs, float(level[host_l]))
                brighter = _brighter(fam, class_names[int(cls[j])])
                ok_side = (c_hat > level[host_l]) if brighter else (c_hat < level[host_l])
                earned = ok_side and glr / gain >= min_evidence_nats
                evidence[j] = glr / gain if earned else 0.0
                if not earned:
                    out_cls[j] = host_k
                    demoted[j] = True
        out_cls[idx] = best
        out_p[idx] = np.exp(cpost[np.arange(len(x)), best])
        decided[idx] = True
        n_edge = n_edge_defect = 0
        if host_k >= 0 and host_k in lcls and edge_ok.any():
            # sites near the edge: their in-frame pixels against a host band (see the docstring)
            host_l = int(np.flatnonzero(lcls == host_k)[0])
            share_e = (p_all * m_all).sum(axis=1)
            esel = np.flatnonzero(edge_ok & ~ok & finite & np.isin(net_names, fam.classes) & (share_e >= edge_min_share * float(np.median(tot_q))))
            if len(esel):
                me = m_all[esel]
                bright, dim, ratio = _edge_glr(np.maximum(x_all[esel], 0.0) * me, np.maximum(b_all[esel], 0.0) * me + np.float32(extra) * me,
                                               np.maximum(p_all[esel], 0.0) * me, float(level[host_l]), (lo_band, hi_band), gain)
                defects = [class_names.index(c) for c in fam.classes if c != fam.host]
                # each defect class's signed ratio: brighter classes (as many atoms as the host or
                # more) against the band's top, dimmer ones against its bottom; the network's class
                # breaks ties (e.g. two brighter classes)
                glr = np.stack([bright if _brighter(fam, class_names[k]) else dim for k in defects], axis=1)
                pick = np.argmax(glr + 1e-9 * (cls[esel][:, None] == np.asarray(defects)[None, :]), axis=1)
                ev_e = glr[np.arange(len(esel)), pick]
                cls_e = np.asarray(defects)[pick]
                earned = ev_e >= min_evidence_nats
                demoted[esel] = (cls[esel] != host_k) & ~earned
                out_cls[esel] = np.where(earned, cls_e, host_k)
                evidence[esel] = np.where(earned, ev_e, 0.0)
                p_def = 1.0 / (1.0 + np.exp(-np.clip(ev_e, -50.0, 50.0)))
                out_p[esel] = np.where(earned, p_def, 1.0 - p_def)
                decided[esel] = True
                edge_decided[esel] = True
                edge_ratio[esel] = ratio
                n_edge, n_edge_defect = len(esel), int(earned.sum())
        report[fam.name] = (
            "counts mixture: "
            + ", ".join(f"{s}={c:.3g}" for s, c in zip(symbols, cs))
            + "; levels (intensity, weight) "
            + ", ".join(f"{c}{''.join(k) or '0'}=({v:.3g}, {w:.3f})" for (c, k), v, w in zip(lv, level, pi))
            + f"; unmodelled background {extra:.3g}/px; gain {gain:.2f}"
            + f"; {int(demoted[idx].sum())} defect labels below {min_evidence_nats:.2f} nats given the host class"
            + (f"; {n_edge} edge sites decided on their in-frame pixels ({n_edge_defect} defects)" if n_edge else "")
        )
    return IntensityResult(classes=out_cls, class_posterior=out_p, decided=decided, families=report, evidence_nats=evidence, demoted=demoted,
                           edge_decided=edge_decided, edge_intensity_ratio=edge_ratio)
