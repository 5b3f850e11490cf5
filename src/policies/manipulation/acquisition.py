"""Where to park and for how long: the least expected dose to the goal, with a one-step lookahead.

For the next hop (dopant at node ``s``, intended neighbour ``j``) every candidate beam position
is an offset from carbon ``j`` in the ``s→j`` bond frame on a grid (within ``offset_radius_A``,
not over the dopant); every dwell is one of ``n_dwells`` log-spaced values. The hop model gives
the posterior of the log hop rate at every candidate, jointly (mean and covariance).

*Exploitation value.* A park of dwell ``d`` at a rate ``λ`` makes the hop with probability
``1 - exp(-λ d)``; its progress per unit cost is ``(1 - exp(-λ d)) / (d + overhead_s)`` at the
posterior median rate (certainty equivalent: uncertainty is valued by the lookahead below, not
twice), cost being seconds of beam (dose is proportional at a fixed current) plus
``overhead_s`` per park-and-check cycle. ``r*``,
the best of these over candidates and dwells, is the rate at which the goal gets closer if the
policy only exploits what it knows: with ``H`` hops to go the expected dose to the goal is ``H / r*``.

*Exploration by lookahead (knowledge gradient).* A park at ``(x, d)`` either makes the hop (with
its posterior predictive probability, Gauss–Hermite over the log rate) or not; either outcome is an observation of the hop model at ``x``
(an EP site from the Poisson likelihood), which moves the posterior everywhere through the
covariance and so changes ``r*``: ``KG(x, d) = E[r*_after] - r* >= 0``. To first order in that
change the expected dose to the goal after the park is
``(d + overhead_s) + (H - P) / r* - H KG / r*²`` (``P`` the park's expected progress), so the
acquisition, maximised over a short list (the best ``lookahead_top`` candidates by exploitation
value and by optimism), is

``a(x, d) = P(x, d) - r* (d + overhead_s) + H KG(x, d) / r*``:

what the park gains now against what exploiting would have gained with the same dose, plus what
it teaches, counted over the ``H`` hops still to go. A park far from the carbon is chosen only
when what it could reveal is worth its dose; a park near a well-known site is chosen for its hops.

The chosen park is then scored with every rate the beam drives (a four-state Markov chain over
the dwell: at ``s``, at ``j``, elsewhere, damaged; ``torch.linalg.matrix_exp``) so the reported
probabilities of a wrong-direction hop, a hop back and damage are those of the whole chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from stemagent.policies.manipulation.config import AcquisitionConfig
from stemagent.policies.manipulation.hopmodel import HopModel, tilted_moments
from stemagent.policies.manipulation.lattice import LatticeGraph

_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(9)
_GH_W = _GH_W / _GH_W.sum()
_MU_GRID = np.arange(-12.0, 3.0001, 0.05)  # log rate (1/s) grid of the exploitation table


def bond_frame(from_A: np.ndarray, to_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors ``(u, perp)`` of the bond from ``from_A`` to ``to_A``; ``perp`` is ``u`` turned by +90°."""
    u = np.asarray(to_A, float) - np.asarray(from_A, float)
    u = u / max(float(np.linalg.norm(u)), 1e-12)
    return u, np.array([-u[1], u[0]])


def offsets_in_bond(beam_A: np.ndarray, from_A: np.ndarray, to_A: np.ndarray) -> np.ndarray:
    """``(n, 2)`` offsets (along, across) of beam positions ``(n, 2)`` from ``to_A`` in the ``from→to`` bond frame."""
    u, p = bond_frame(from_A, to_A)
    d = np.asarray(beam_A, float).reshape(-1, 2) - np.asarray(to_A, float)
    return np.stack([d @ u, d @ p], axis=1)


def beam_at(offset: np.ndarray, from_A: np.ndarray, to_A: np.ndarray) -> np.ndarray:
    """Beam positions ``(n, 2)`` at bond-frame offsets ``(n, 2)`` from ``to_A``."""
    u, p = bond_frame(from_A, to_A)
    o = np.asarray(offset, float).reshape(-1, 2)
    return np.asarray(to_A, float) + o[:, :1] * u + o[:, 1:] * p


def candidate_offsets(cfg: AcquisitionConfig) -> np.ndarray:
    """``(K, 2)`` grid of (along, across) offsets within ``offset_radius_A``, along ``>= min_along_A``."""
    r = cfg.offset_radius_A
    g = np.arange(-math.floor(r / cfg.grid_A), math.floor(r / cfg.grid_A) + 1) * cfg.grid_A
    a, c = np.meshgrid(g, g, indexing="ij")
    pts = np.stack([a.ravel(), c.ravel()], axis=1)
    keep = (np.hypot(pts[:, 0], pts[:, 1]) <= r + 1e-9) & (pts[:, 0] >= cfg.min_along_A - 1e-9)
    return pts[keep]


def dwell_grid(cfg: AcquisitionConfig, max_dwell_s: float | None = None) -> np.ndarray:
    hi = cfg.dwell_max_s if max_dwell_s is None else min(cfg.dwell_max_s, max_dwell_s)
    lo = min(cfg.dwell_min_s, hi)
    return np.geomspace(lo, hi, cfg.n_dwells) if cfg.n_dwells > 1 else np.array([hi])


def expected_hop_probability(mu: np.ndarray, var: np.ndarray, dwell_s: np.ndarray) -> np.ndarray:
    """``E[1 - exp(-λ d)]`` for ``log λ ~ N(mu, var)``: shape ``broadcast(mu, var) + (len(dwell_s),)``."""
    f = np.asarray(mu)[..., None] + np.sqrt(np.maximum(np.asarray(var), 0.0))[..., None] * _GH_X  # (..., 9)
    lam = np.exp(np.minimum(f, 30.0))
    p = -np.expm1(-lam[..., None, :] * np.asarray(dwell_s)[:, None])  # (..., D, 9)
    return (p * _GH_W).sum(axis=-1)


@lru_cache(maxsize=8)
def _exploit_table(dwells: tuple[float, ...], overhead_s: float) -> np.ndarray:
    """Best progress per unit cost ``max_d (1 - exp(-λ d)) / (d + overhead)`` at ``log λ`` on :data:`_MU_GRID`."""
    d = np.asarray(dwells)
    lam = np.exp(_MU_GRID)[:, None]
    return (-np.expm1(-lam * d[None, :]) / (d[None, :] + overhead_s)).max(axis=1)


def exploit_value(mu: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Best progress per unit cost at log rates ``mu`` (any shape), interpolated in :func:`_exploit_table`."""
    return np.interp(np.asarray(mu), _MU_GRID, table)


@dataclass
class ParkChoice:
    """The chosen park: beam position (sample frame, Å), dwell (s), offset in the bond frame and the scores."""

    position_A: tuple[float, float]
    dwell_s: float
    offset_A: tuple[float, float]
    scores: dict[str, float] = field(default_factory=dict)


def chain_probabilities(a: torch.Tensor, w0: torch.Tensor, b: torch.Tensor, w1: torch.Tensor, delta: float,
                        dwell_s: torch.Tensor) -> torch.Tensor:
    """``(..., D, 3)``: P(at j), P(elsewhere), P(damaged) after each dwell ``(D,)`` starting at ``s``,
    for rates ``a, w0, b, w1`` of shape ``(...)`` (1/s) and damage rate ``delta``."""
    shape = a.shape
    q = torch.zeros(*shape, 4, 4, dtype=a.dtype)
    q[..., 0, 1] = a
    q[..., 0, 2] = w0
    q[..., 0, 3] = delta
    q[..., 0, 0] = -(a + w0 + delta)
    q[..., 1, 0] = b
    q[..., 1, 2] = w1
    q[..., 1, 3] = delta
    q[..., 1, 1] = -(b + w1 + delta)
    qd = q[..., None, :, :] * dwell_s.reshape(*([1] * len(shape)), -1, 1, 1)
    return torch.linalg.matrix_exp(qd)[..., 0, 1:]


def _other_rates(graph: LatticeGraph, model: HopModel, s: int, j: int, beams: np.ndarray,
                 also_good: tuple[int, ...] = ()) -> tuple[np.ndarray, ...]:
    """Median rates (1/s) of the moves other than ``s→j`` for beams ``(n, 2)``: ``w0`` (s to its other
    neighbours but those in ``also_good``), ``b`` (back, j→s), ``w1`` (j onwards), ``g`` (s to the
    neighbours in ``also_good``: hops that are progress too)."""
    pos, site = graph.positions_A, graph.site_A
    rows, owners = [], []
    for k in graph.neighbours[s]:
        if k != j:
            rows.append(np.concatenate([offsets_in_bond(beams, pos[s], pos[k]), np.repeat(site[k][None], len(beams), 0)], 1))
            owners.append(3 if int(k) in also_good else 0)
    rows.append(np.concatenate([offsets_in_bond(beams, pos[j], pos[s]), np.repeat(site[s][None], len(beams), 0)], 1))
    owners.append(1)
    for k in graph.neighbours[j]:
        if k != s:
            rows.append(np.concatenate([offsets_in_bond(beams, pos[j], pos[k]), np.repeat(site[k][None], len(beams), 0)], 1))
            owners.append(2)
    allx = np.concatenate(rows)
    inside = np.hypot(allx[:, 0], allx[:, 1]) <= model.cfg.max_offset_A
    lograte = np.full(len(allx), -np.inf)
    if inside.any():
        lograte[inside] = model.predict(allx[inside], with_sd=False, sweep=False)[0]
    rates = np.exp(lograte).reshape(len(rows), len(beams))
    out = [np.zeros(len(beams)) for _ in range(4)]
    for o, r in zip(owners, rates):
        out[o] += r
    return out[0], out[1], out[2], out[3]


def _good_rates(graph: LatticeGraph, model: HopModel, s: int, beams: np.ndarray, also_good: tuple[int, ...]) -> np.ndarray:
    """``(n,)`` summed median rates (1/s) of the hops ``s → k``, ``k`` in ``also_good``, for beams ``(n, 2)``."""
    if not also_good:
        return np.zeros(len(beams))
    pos, site = graph.positions_A, graph.site_A
    x = np.concatenate([np.concatenate([offsets_in_bond(beams, pos[s], pos[k]), np.repeat(site[k][None], len(beams), 0)], 1)
                        for k in also_good])
    inside = np.hypot(x[:, 0], x[:, 1]) <= model.cfg.max_offset_A
    lograte = np.full(len(x), -np.inf)
    if inside.any():
        lograte[inside] = model.predict(x[inside], with_sd=False, sweep=False)[0]
    return np.exp(lograte).reshape(len(also_good), len(beams)).sum(axis=0)


def choose_park(
    graph: LatticeGraph,
    model: HopModel,
    s: int,
    j: int,
    cfg: AcquisitionConfig,
    *,
    hops_to_go: int = 1,
    max_dwell_s: float | None = None,
    also_good: tuple[int, ...] = (),
) -> ParkChoice:
    """The (position, dwell) of highest acquisition for the hop ``s → j``: to first order, the least expected
    dose to the goal (module docstring). ``hops_to_go``: ``H``, the hops the lookahead's information serves.
    ``also_good``: other neighbours of ``s`` a hop to which is progress too (one bond closer to the
    goal); their rates at each candidate add to the intended hop's (median rates, not learned from
    in the lookahead)."""
    pos, site = graph.positions_A, graph.site_A
    offs = candidate_offsets(cfg)
    dwells = dwell_grid(cfg, max_dwell_s)
    table = _exploit_table(tuple(float(d) for d in dwells), float(cfg.overhead_s))
    x = np.concatenate([offs, np.repeat(site[j][None, :], len(offs), axis=0)], axis=1)
    mu_j, cov = model.predict_joint(x)
    var = np.maximum(np.diag(cov), 1e-10)
    extra = _good_rates(graph, model, s, beam_at(offs, pos[s], pos[j]), also_good)  # (M,) 1/s
    mu = np.log(np.exp(mu_j) + extra)  # log of every progress rate: intended hop + other closer sites
    u_now = exploit_value(mu, table)
    r_now = float(u_now.max())
    h = max(1, int(hops_to_go))
    # the short list: best by exploitation value and by optimism
    k = max(1, cfg.lookahead_top)
    short = np.unique(np.concatenate([np.argsort(-u_now)[:k], np.argsort(-(mu + cfg.ucb_beta * np.sqrt(var)))[:k]]))
    # immediate progress, every rate included, at each short-listed candidate and dwell (median rates)
    beams = beam_at(offs[short], pos[s], pos[j])
    w0, b, w1, _ = _other_rates(graph, model, s, j, beams, also_good)
    delta = model.damage_rate_per_s()
    t = lambda v: torch.as_tensor(v, dtype=torch.float64)  # noqa: E731
    p_hop = -np.expm1(-np.exp(mu[short])[:, None] * dwells[None, :])  # (S, D), intended hop alone, median rate
    chain = chain_probabilities(t(np.exp(mu[short])), t(w0), t(b), t(w1), delta, t(dwells)).numpy()  # (S, D, 3)
    # the chain's shortfall against the intended-only probability: hops back, onwards, damage
    loss = (np.clip(p_hop - chain[..., 0], 0.0, None)
            + cfg.wrong_hop_penalty * chain[..., 1] + cfg.damage_penalty * chain[..., 2])
    progress = p_hop - loss
    # lookahead: each outcome is an EP site at the candidate; it moves every candidate's mean through the
    # covariance. KG*: the information of n such parks in a row at the candidate (n in lookahead_batches),
    # per park, so that a place worth a long look is not judged by one short park's worth of evidence
    cols = cov[:, short]  # (M, S)
    vi = var[short]
    gain = cols / vi[None, :]  # (M, S): how a change at each candidate moves every candidate's mean
    lam_med = np.exp(mu_j[short])[:, None]  # the lookahead learns the intended hop's rate
    kg = np.zeros((len(short), len(dwells)))
    for n in cfg.lookahead_batches:
        span = n * dwells[None, :]
        ld = np.clip(lam_med * span, 1e-9, None)
        t_hop = np.where(ld < 1e-3, span / 2.0, 1.0 / lam_med - span * np.exp(-ld) / -np.expm1(-ld))
        p_pred = expected_hop_probability(mu_j[short], var[short], n * dwells)  # predictive P(hop) in the span
        expected_r = np.zeros((len(short), len(dwells)))
        for hops in (1, 0):
            exposure = t_hop if hops else np.broadcast_to(span, t_hop.shape)
            m_new, _ = tilted_moments(np.repeat(mu_j[short][:, None], len(dwells), 1).ravel(),
                                      np.repeat(vi[:, None], len(dwells), 1).ravel(),
                                      np.full(t_hop.size, float(hops)), np.asarray(exposure).ravel())
            m_new = m_new.reshape(len(short), len(dwells))
            mu_post = mu_j[:, None, None] + gain[:, :, None] * (m_new - mu_j[short][:, None])[None, :, :]
            if also_good:
                mu_post = np.log(np.exp(mu_post) + extra[:, None, None])
            r_post = exploit_value(mu_post, table).max(axis=0)  # (S, D)
            expected_r += (p_pred if hops else 1.0 - p_pred) * r_post
        kg_n = np.maximum(expected_r - r_now, 0.0) * (dwells[None, :] + cfg.overhead_s) / (span + n * cfg.overhead_s)
        kg = np.maximum(kg, kg_n)  # knowledge gradient: expected gain in the best rate, per park
    r = max(r_now, 1e-12)
    acq = progress - r * (dwells[None, :] + cfg.overhead_s) + h * kg / r
    ci, di = np.unravel_index(int(np.argmax(acq)), acq.shape)
    kx = int(short[ci])
    beam = beams[ci]
    pm = chain[ci, di]
    return ParkChoice(
        position_A=(float(beam[0]), float(beam[1])),
        dwell_s=float(dwells[di]),
        offset_A=(float(offs[kx, 0]), float(offs[kx, 1])),
        scores={
            "acquisition": float(acq[ci, di]),
            "knowledge_gradient_per_s": float(kg[ci, di]),
            "dose_to_go_s": float(h / r - acq[ci, di] / r),
            "exploit_dose_to_go_s": float(h / r),
            "exploit_value_per_s": r_now,
            "candidate_value_per_s": float(u_now[kx]),
            "p_hop": float(p_hop[ci, di]),
            "p_intended": float(pm[0]),
            "p_wrong": float(pm[1]),
            "p_damage": float(pm[2]),
            "rate_per_s": float(math.exp(mu_j[kx])),
            "progress_rate_per_s": float(math.exp(mu[kx])),
            "log_rate_sd": float(math.sqrt(var[kx])),
            "wrong_rate_per_s": float(w0[ci]),
            "back_rate_per_s": float(b[ci]),
            "damage_rate_per_s": float(delta),
            "n_candidates": float(len(offs) * len(dwells)),
        },
    )
