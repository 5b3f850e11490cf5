"""Column classes from fitted column intensities: a per-frame mixture over composition levels.

In an incoherent (ADF) image a column's integrated intensity is, to a good approximation, the
sum of its atoms' intensities. A chalcogen column of a TMD holds two atoms, so its intensity
takes one of a few *levels*: ``2X`` (S2), ``X + Y`` (S + Se), ``2Y``, ``X`` (one atom missing),
``Y`` and ``0``, where ``X`` and ``Y`` are the single-atom intensities of the host and the
substituent. Graphene sites are ``A`` (C) or ``B`` (Si). Which level a column sits on is what
its class means, and the fitted intensity measures it directly (this is how atom counting by
statistical parameter estimation works on real data).

:func:`classify_by_intensity` works per frame and per *family* of classes that share a
sublattice:

1. the single-atom intensities come from the network's own confident members of the
   family's *anchor* classes (e.g. ``median(chalcogen) = 2X``, ``median(substituted) = X + Y``),
   solved by least squares, so nothing about the dose, detector or calibration is assumed;
2. the levels of every composition follow; a Gaussian mixture in the square-root domain
   (where Poisson counts have a constant variance) with one component per level, shared
   variance, is refined by a few EM steps (weights and variance; the level of a component
   with enough members moves to its members' mean);
3. each column's class posterior is the network's class probability times the likelihood of
   the class's levels (Student-t, robust scale: fits near a defect or the frame's edge can be
   off by tens of per cent, and one such column must not overrule the network).

The network still decides where columns are and which family (sublattice) a column belongs to;
the class within the family is re-decided only where the network hesitates (its own class
below ``keep_above`` of the family's probability) and only between classes whose nearest levels
stand at least ``min_separation_sd`` apart: at low dose the levels overlap and the network's
call, which also sees the lattice context, is kept. On held-out twin frames (BENCHMARKS.md,
"Atom finding") this corrects most of the network's column-vacancy errors at 1e4-1e5 e/Å².
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stemagent.errors import InputError


@dataclass(frozen=True)
class Family:
    """Classes on one sublattice and the compositions that define them.

    ``levels``: ``(class name, composition)`` pairs, a composition being a tuple of atom symbols
    of the family's own alphabet (e.g. ``("X", "X")``); ``()`` is an empty column.
    ``anchors``: the classes whose network-called members fix the atom intensities; an anchor
    class's members are taken to sit on its first level in ``levels``.
    """

    name: str
    levels: tuple[tuple[str, tuple[str, ...]], ...]
    anchors: tuple[str, ...]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for c, _ in self.levels))

    def symbols(self) -> tuple[str, ...]:
        return tuple(sorted({s for _, comp in self.levels for s in comp}))


#: Families of the shipped segmenter's classes. Graphene's empty site ("vacancy") is not fitted
#: (there is no atom to measure), so only C and Si are re-decided there.
DEFAULT_FAMILIES: tuple[Family, ...] = (
    Family("graphene", levels=(("C", ("A",)), ("Si", ("B",))), anchors=("C", "Si")),
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
    ),
)


@dataclass
class IntensityResult:
    """``classes`` ``(N,)`` and ``class_posterior`` ``(N,)`` (probability of the chosen class
    from the mixture; the network's value where the atom was not re-decided), ``decided``
    ``(N,)`` True where the mixture decided, ``families`` per family name: ``"mixture"`` or
    the reason it was left to the network."""

    classes: np.ndarray
    class_posterior: np.ndarray
    decided: np.ndarray
    families: dict[str, str]


def _anchor_intensities(fam: Family, values: np.ndarray, net_names: np.ndarray, confidence: np.ndarray, min_members: int) -> dict[str, float] | None:
    """Single-atom intensity of each symbol from the anchors' medians (least squares)."""
    symbols = fam.symbols()
    comp_of: dict[str, tuple[str, ...]] = {}
    for c, comp in fam.levels:  # an anchor class's main level is its first
        comp_of.setdefault(c, comp)
    rows, rhs = [], []
    for cls in fam.anchors:
        sel = net_names == cls
        if int(sel.sum()) < min_members:
            continue
        # the confident half of the members (at least min_members)
        conf = confidence[sel]
        cut = np.quantile(conf, 0.5) if int(sel.sum()) >= 2 * min_members else -np.inf
        v = values[sel][conf >= cut]
        rows.append([comp_of[cls].count(s) for s in symbols])
        rhs.append(float(np.median(v)))
    if not rows:
        return None
    a = np.asarray(rows, dtype=np.float64)
    sol, *_ = np.linalg.lstsq(a, np.asarray(rhs), rcond=None)
    known = a.sum(axis=0) > 0
    return {s: float(x) for s, x, k in zip(symbols, sol, known) if k and x > 0}


def classify_by_intensity(
    intensity: np.ndarray,
    classes: np.ndarray,
    confidence: np.ndarray,
    fitted: np.ndarray,
    class_names: tuple[str, ...],
    families: tuple[Family, ...] = DEFAULT_FAMILIES,
    *,
    min_columns: int = 30,
    min_members: int = 3,
    min_separation_sd: float = 4.0,
    iterations: int = 12,
    class_probs: np.ndarray | None = None,
    student_nu: float = 4.0,
    keep_above: float = 0.9,
) -> IntensityResult:
    """Re-decide the class of each fitted column within its family from its integrated intensity.

    ``intensity`` ``(N,)``: integrated counts of each column's fitted image (e.g. Gaussian
    amplitude x 2 pi width^2); ``classes`` ``(N,)`` the network's classes (indices into
    ``class_names``); ``confidence`` ``(N,)`` its probability; ``fitted`` ``(N,)`` bool, False
    for columns whose fit failed (they keep the network's class). All of one frame.

    ``class_probs`` ``(N, C)``: the network's probability of every class; it is the prior of the
    decision (posterior = prior x intensity likelihood of the class's levels, Student-t with
    ``student_nu`` degrees of freedom so that one badly fitted column cannot carry it). Without
    it the prior is flat. A column moves to another class only if the nearest levels of the two
    classes are at least ``min_separation_sd`` apart and the network gave its own class less
    than ``keep_above`` of the family's probability (its confident calls stand).
    ``min_columns``: fewer fitted columns in a family leave it to the network; ``min_members``:
    members an anchor class needs to fix an atom intensity; ``iterations``: EM steps.
    """
    v = np.asarray(intensity, dtype=np.float64).reshape(-1)
    cls = np.asarray(classes).reshape(-1).astype(np.int64)
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ok = np.asarray(fitted, dtype=bool).reshape(-1)
    n = len(v)
    for field, arr in (("classes", cls), ("confidence", conf), ("fitted", ok)):
        if len(arr) != n:
            raise InputError(f"{field}.shape", arr.shape, f"must be ({n},), one per column like intensity")
    if n and (cls.min() < 0 or cls.max() >= len(class_names)):
        raise InputError("classes", int(cls.max() if cls.max() >= len(class_names) else cls.min()), f"must index class_names ({len(class_names)} classes)")
    names = np.asarray(class_names)
    out_cls = cls.copy()
    out_p = conf.copy()
    decided = np.zeros(n, dtype=bool)
    report: dict[str, str] = {}
    net_names = names[cls] if n else np.zeros(0, dtype=names.dtype)
    for fam in families:
        if any(c not in class_names for c in fam.classes):
            report[fam.name] = "classes not in this model"
            continue
        member = np.isin(net_names, fam.classes) & ok & np.isfinite(v)
        if int(member.sum()) < min_columns:
            report[fam.name] = f"too few fitted columns ({int(member.sum())} < {min_columns})"
            continue
        vf = np.maximum(v[member], 0.0)
        atom = _anchor_intensities(fam, vf, net_names[member], conf[member], min_members)
        if atom is None:
            report[fam.name] = "no anchor class with enough members"
            continue
        # levels whose atoms are all known
        lv = [(c, comp) for c, comp in fam.levels if all(s in atom for s in comp)]
        lcls = np.array([class_names.index(c) for c, _ in lv])
        level_counts = np.array([sum(atom[s] for s in comp) for _, comp in lv])
        x = np.sqrt(vf + 0.375)
        mu = np.sqrt(level_counts + 0.375)
        # starting spread: that of the largest anchor class's members (robust), Poisson at least
        big_anchor = max(fam.anchors, key=lambda c: int(np.sum(net_names[member] == c)))
        xa = x[net_names[member] == big_anchor]
        var = max(0.25, (1.4826 * float(np.median(np.abs(xa - np.median(xa))))) ** 2) if len(xa) else 0.25
        # start from the network's own class shares, spread evenly over a class's levels
        share = np.array([np.mean(net_names[member] == c) for c, _ in lv]) / np.bincount(lcls, minlength=len(class_names))[lcls]
        pi = np.clip(share, 1e-3, None)
        pi /= pi.sum()
        for _ in range(iterations):
            logr = np.log(pi)[None, :] - 0.5 * (x[:, None] - mu[None, :]) ** 2 / var
            logr -= logr.max(axis=1, keepdims=True)
            r = np.exp(logr)
            r /= r.sum(axis=1, keepdims=True)
            mass = r.sum(axis=0)
            pi = np.clip(mass / len(x), 1e-3, None)
            pi /= pi.sum()
            big = mass >= 10.0
            mu = np.where(big, (r * x[:, None]).sum(axis=0) / np.maximum(mass, 1e-12), mu)
            var = max(float((r * (x[:, None] - mu[None, :]) ** 2).sum() / len(x)), 0.05)
        # how far apart (in sd) the nearest levels of each pair of classes are; a column may
        # only move between two classes whose levels stand apart
        sd = np.sqrt(var)
        present = mass >= 1.0
        # (0, i.e. never, for a class with no level here: its anchor had too few members)
        has = np.zeros(len(class_names), bool)
        has[lcls[present]] = True
        sep = np.where(has[:, None] & has[None, :], np.inf, 0.0)
        for a in range(len(lv)):
            for b in range(len(lv)):
                if lcls[a] != lcls[b] and present[a] and present[b]:
                    sep[lcls[a], lcls[b]] = min(sep[lcls[a], lcls[b]], abs(mu[a] - mu[b]) / sd)
        # final level likelihoods: Student-t (heavy tails: a badly fitted column cannot
        # overrule a confident network), robust scale from the residuals to the nearest level
        near = np.abs(x[:, None] - mu[None, :]).min(axis=1)
        scale = max(1.4826 * float(np.median(near)) * 1.2, 0.5)
        tlike = (1.0 + ((x[:, None] - mu[None, :]) / scale) ** 2 / student_nu) ** (-(student_nu + 1.0) / 2.0)
        lv_w = pi / np.bincount(lcls, weights=pi, minlength=len(class_names))[lcls]  # share within class
        like = np.zeros((len(x), len(class_names)))
        np.add.at(like.T, lcls, (tlike * lv_w[None, :]).T)
        # the network's class probabilities are the prior; outside the family nothing is possible
        prior = np.clip(np.asarray(class_probs, dtype=np.float64)[member], 1e-6, None) if class_probs is not None else np.ones_like(like)
        post = like * prior
        in_fam = np.zeros(len(class_names), bool)
        in_fam[np.unique(lcls)] = True
        post[:, ~in_fam] = 0.0
        post /= np.maximum(post.sum(axis=1, keepdims=True), 1e-300)
        idx = np.flatnonzero(member)
        new = post.argmax(axis=1)
        allowed = sep[cls[idx], new] >= min_separation_sd
        if class_probs is not None and keep_above < 1.0:
            # the network's confident calls stand: the intensity arbitrates where it hesitates
            fam_cols = np.array(sorted(class_names.index(c) for c in fam.classes))
            cp = np.asarray(class_probs, dtype=np.float64)[idx][:, fam_cols]
            own = cp[np.arange(len(idx)), np.searchsorted(fam_cols, cls[idx])] / np.maximum(cp.sum(axis=1), 1e-12)
            allowed &= own < keep_above
        allowed |= new == cls[idx]
        out_cls[idx] = np.where(allowed, new, cls[idx])
        out_p[idx] = np.where(allowed, post.max(axis=1), conf[idx])
        decided[idx] = allowed
        blocked = sorted({f"{class_names[a]}/{class_names[b]} {sep[a, b]:.1f} sd" for a, b in zip(*np.nonzero(sep < min_separation_sd)) if a < b})
        report[fam.name] = (
            "mixture: "
            + ", ".join(f"{c}{''.join(comp) or '0'}={m * m - 0.375:.0f}({w:.3f})" for (c, comp), m, w in zip(lv, mu, pi))
            + (f"; not separated, left to the network: {', '.join(blocked)}" if blocked else "")
            + f"; closest classes {float(sep[np.isfinite(sep)].min()) if np.isfinite(sep).any() else float('inf'):.1f} sd"
        )
    return IntensityResult(classes=out_cls, class_posterior=out_p, decided=decided, families=report)
