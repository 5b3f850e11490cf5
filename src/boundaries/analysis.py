"""The whole boundary analysis of a set of boundaries, as one report (pure: no I/O, no plots).

``traces -> sequences -> counts -> {full fit, reduced fit, model comparison} -> science``: the
steady state of the fitted chain in closed form and numerically (asserted equal), its entropy
rate, the significant tileable long k-motifs, ``Omega(N)`` with its growth fits, and
``alpha(d)`` with the other fitted parameters held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.spatial import cKDTree

from stemagent.boundaries import steady_state
from stemagent.boundaries.chain import BoundaryChain
from stemagent.boundaries.compare import ModelScore, cross_validate
from stemagent.boundaries.config import BoundaryAnalysisConfig
from stemagent.boundaries.estimate import FullFit, ReducedFit, TransitionCounts, count_transitions, fit_full, fit_reduced
from stemagent.boundaries.kmotifs import KMotif, significant_kmotifs
from stemagent.boundaries.lattice import STATES, word_name
from stemagent.boundaries.omega import AlphaCurve, GrowthFit, alpha_of_d, exact_table, fit_growth
from stemagent.boundaries.trace import BoundaryTrace
from stemagent.errors import InputError


def deduplicate_traces(traces: Sequence[BoundaryTrace], tolerance_A: float = 1.0, min_shared: float = 0.5) -> list[BoundaryTrace]:
    """Drop traces that are another frame's boundary seen again (overlapping fields of view):
    a trace sharing at least ``min_shared`` of its columns (within ``tolerance_A``, sample frame)
    with a longer trace of another frame is removed."""
    order = sorted(range(len(traces)), key=lambda i: -len(traces[i]))
    kept: list[int] = []
    for i in order:
        t = traces[i]
        dup = False
        for j in kept:
            u = traces[j]
            if u.frame_index == t.frame_index:
                continue
            d, _ = cKDTree(u.positions_A[:-1]).query(t.positions_A[:-1], distance_upper_bound=tolerance_A)
            if np.mean(np.isfinite(d)) >= min_shared:
                dup = True
                break
        if not dup:
            kept.append(i)
    return [traces[i] for i in sorted(kept)]


def sequences_from_traces(traces: Sequence[BoundaryTrace], min_confidence: float = 0.5) -> list[np.ndarray]:
    """Step sequences of traces; steps read with confidence below ``min_confidence`` become -1."""
    return [np.where(t.step_confidence >= min_confidence, t.steps, -1) for t in traces]


@dataclass
class BoundaryReport:
    counts: TransitionCounts
    full: FullFit
    reduced: ReducedFit
    model_scores: list[ModelScore]
    steady_state_closed: steady_state.OrbitSteadyState
    steady_state_numeric: np.ndarray
    steady_state_max_diff: float
    entropy_rate_nats: float
    kmotifs: list[KMotif]
    omega_n: np.ndarray
    log_omega: np.ndarray
    log_count: np.ndarray
    growth: GrowthFit
    alpha_curve: AlphaCurve | None

    @property
    def chain(self) -> BoundaryChain:
        return BoundaryChain.from_params(self.reduced.params)

    def to_dict(self) -> dict:
        names = [word_name(w) for w in STATES]
        return {
            "n_boundaries": self.counts.n_sequences,
            "n_transitions": self.counts.n_transitions,
            "n_unread_windows": self.counts.n_unread,
            "forbidden_3motifs": [f.__dict__ for f in self.counts.forbidden],
            "states": names,
            "transition_matrix": {
                "full_posterior_mean": self.full.mean.round(6).tolist(),
                "full_credible_lower": self.full.lower.round(6).tolist(),
                "full_credible_upper": self.full.upper.round(6).tolist(),
                "dirichlet_prior": self.full.prior,
                "reduced_mle": self.reduced.matrix.round(6).tolist(),
                "counts": self.counts.counts.tolist(),
            },
            "reduced": self.reduced.to_dict(),
            "model_comparison": [s.to_dict() for s in self.model_scores],
            "steady_state": {
                "closed_form": self.steady_state_closed.__dict__,
                "numeric": self.steady_state_numeric.round(8).tolist(),
                "max_abs_difference": self.steady_state_max_diff,
            },
            "entropy_rate_nats_per_step": self.entropy_rate_nats,
            "significant_kmotifs": [m.to_dict() for m in self.kmotifs if m.significant],
            "tested_kmotifs": [m.to_dict() for m in self.kmotifs],
            "omega": {"N": self.omega_n.tolist(), "log_omega": self.log_omega.round(6).tolist(),
                      "log_count": self.log_count.round(6).tolist(), "growth_fit": self.growth.to_dict()},
            "alpha_of_d": None if self.alpha_curve is None else self.alpha_curve.to_dict(),
        }


def analyze_sequences(sequences: Sequence[np.ndarray], config: BoundaryAnalysisConfig | None = None, with_alpha_curve: bool = True) -> BoundaryReport:
    """Fit and characterise the boundary chain of step ``sequences`` (``-1`` = unread step)."""
    cfg = config or BoundaryAnalysisConfig()
    counts = count_transitions(sequences)
    if counts.n_transitions == 0:
        raise InputError("sequences", len(sequences), "hold no complete 3-motif: nothing to fit")
    full = fit_full(counts, prior=cfg.dirichlet_prior)
    reduced = fit_reduced(counts, fixed=cfg.fixed or None)
    chain = BoundaryChain.from_params(reduced.params)
    try:
        scores = cross_validate(sequences, n_folds=cfg.cv_folds, seed=cfg.seed)
    except InputError:
        scores = []  # too few boundaries for cross-validation
    closed = steady_state.closed_form_general(reduced.params)
    numeric = steady_state.numerical(reduced.params)
    diff = float(np.max(np.abs(closed.vector() - numeric)))
    if diff > 1e-8:
        raise AssertionError(f"closed-form steady state differs from the numerical one by {diff:.3g}")
    rng = np.random.default_rng(cfg.seed)
    motifs = significant_kmotifs(sequences, chain, ks=cfg.kmotif_ks, n_boot=cfg.kmotif_boot, alpha=cfg.kmotif_alpha, rng=rng)
    table = exact_table(chain, cfg.omega_n_max)
    ns = np.arange(cfg.omega_n_min, cfg.omega_n_max + 1)
    growth = fit_growth(ns, table.entropy_avg[ns])
    curve = alpha_of_d(reduced.params, np.asarray(cfg.alpha_d_values), cfg.omega_n_min, cfg.omega_n_max) if with_alpha_curve else None
    return BoundaryReport(counts, full, reduced, scores, closed, numeric, diff, chain.entropy_rate(), motifs, ns,
                          table.entropy_avg[ns], table.log_count_avg[ns], growth, curve)
