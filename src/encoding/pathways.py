"""Transformation pathways in an rVAE's content latents over a sequence of frames.

Input: one :class:`LatentFrame` per frame (atom positions in the sample frame, their content
latents ``z`` and angles from :mod:`stemagent.encoding.rvae`, the frame's dose). Steps:

1. **Linking** (:func:`link_atoms`): atoms are followed from frame to frame by their positions,
   with the drift stage's gated matcher (:func:`stemagent.drift.tracking.match`, a gate of
   ``gate_fraction`` of the lattice spacing, so a hop to a neighbouring site is never a
   displacement). Positions already in the drift-corrected sample frame are matched as they
   are (``sample_frame=True``); otherwise a common shift per frame (residual drift) is taken
   out first and carried forward. A track missing for more than ``max_gap_frames`` ends. A
   track is a *site* of the lattice: after a Si-C swap the Si's old site keeps its track and
   shows a C.
2. **States** (:func:`fit_states`): a Gaussian mixture over the content latents, its number of
   components chosen by BIC (scikit-learn, seeded); components the noise cannot tell apart
   (means closer than the jump threshold) are one state (:func:`merge_states`).
3. **Events** (:func:`detect_events`): per track, a change point where the mean of ``z`` over the
   ``window`` observations after differs from the mean over the ``window`` before by more than
   ``track_n_sigma`` times the noise of that difference (a Mahalanobis norm with the per-state
   noise covariance of one observation, :func:`latent_noise_cov`: a robust covariance of the first
   differences along the tracks, untouched by the rare jumps; the content dimensions' noise is
   correlated), or where the majority state of the two windows differs (a state change that
   persists for ``window`` observations) and the jump is at least half the threshold. Peaks
   closer than ``window`` on a track are one event; several windows may be used at once
   (multi-scale: short ones resolve events a few frames apart, long ones find small jumps); at a
   track's ends the window on the short side shrinks (``edge_window``). The noise of a difference
   of window means is not quite the one-observation noise over the window (the latents drift
   slowly from frame to frame): each window's excess is measured on the tracks
   (:func:`window_noise_inflation`) and divided out, so a noise unit means the same at every window.
   **Evidence of atom and neighbours**: the candidates are grouped around the strongest
   (:func:`group_events`: one swap changes the two sites and their neighbours, one vacancy its
   three neighbours), and a group is an event when the root sum of squares of its tracks' jumps
   reaches ``n_sigma`` (:func:`group_evidence`): a knock-on moves four tracks by 3-6 noise units
   each, a noise excursion one.
4. **Transition graph** (:func:`transition_graph`): counts of state changes between persistent
   states, and their rates per dose: changes ``i -> j`` over the dose the tracks spent in state
   ``i`` (per e/Å²).

Arrays: positions ``(N, 2)`` Å (x, y); ``z``
``(N, k)`` (NaN where the atom was not encoded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.spatial import cKDTree

from stemagent.drift.tracking import match, nearest_neighbour_spacing_A
from stemagent.errors import InputError


#: jump windows (frames), the group evidence threshold and the per-track candidate threshold (noise
#: units, each window's noise measured: :func:`window_noise_inflation`), chosen on tuning sequences
#: (seeds 106-110 of benchmarks/bench_rvae_events.py) for the shipped 4-latent weights; the test
#: seeds 101-105 were never used to choose them (9.25 and 5.0 before the windows' noise was measured)
DEFAULT_WINDOWS: tuple[int, ...] = (4, 8)
DEFAULT_N_SIGMA = 9.0
DEFAULT_TRACK_N_SIGMA = 4.5
DEFAULT_EDGE_WINDOW: int | None = 3

@dataclass
class LatentFrame:
    """One frame's atoms and latents. ``true_class`` ``(N,)``: the twin's class of each atom
    (``-1`` unknown), or None."""

    frame_index: int
    positions_A: np.ndarray
    z: np.ndarray
    angle_rad: np.ndarray
    dose_e_per_A2: float = 0.0
    time_s: float = float("nan")
    true_class: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.positions_A = np.asarray(self.positions_A, dtype=np.float64).reshape(-1, 2)
        n = len(self.positions_A)
        self.z = np.asarray(self.z, dtype=np.float64)
        if self.z.ndim != 2 or self.z.shape[0] != n:
            raise InputError(f"frame {self.frame_index}: z.shape", self.z.shape, f"must be ({n}, k)")
        self.angle_rad = np.asarray(self.angle_rad, dtype=np.float64).reshape(-1)
        if self.angle_rad.shape != (n,):
            raise InputError(f"frame {self.frame_index}: angle_rad.shape", self.angle_rad.shape, f"must be ({n},)")
        if not np.all(np.isfinite(self.positions_A)):
            raise InputError(f"frame {self.frame_index}: positions_A", "non-finite", "must be finite")
        if self.true_class is not None:
            self.true_class = np.asarray(self.true_class, dtype=np.int64).reshape(-1)
            if self.true_class.shape != (n,):
                raise InputError(f"frame {self.frame_index}: true_class.shape", self.true_class.shape, f"must be ({n},)")

    @property
    def encoded(self) -> np.ndarray:
        return np.all(np.isfinite(self.z), axis=1)


def link_atoms(frames: Sequence[LatentFrame], *, sample_frame: bool = True, gate_fraction: float = 0.4,
               max_gap_frames: int = 2, spacing_A: float | None = None) -> list[np.ndarray]:
    """Track id ``(N_f,)`` of every atom of every frame (see the module docstring)."""
    if not 0 < gate_fraction < 0.5:
        raise InputError("gate_fraction", gate_fraction, "must be in (0, 0.5): a larger gate could take a neighbour's site")
    if spacing_A is None:
        spacings = [nearest_neighbour_spacing_A(f.positions_A) for f in frames[:5] if len(f.positions_A) >= 2]
        spacing_A = float(np.median(spacings)) if spacings else float("nan")
    last_pos = np.zeros((0, 2))
    last_seen = np.zeros(0, dtype=np.int64)
    out: list[np.ndarray] = []
    for step, f in enumerate(frames):
        ids = np.full(len(f.positions_A), -1, dtype=np.int64)
        live = np.flatnonzero(step - last_seen <= max_gap_frames + 1)
        if len(live) and len(f.positions_A) and math.isfinite(spacing_A):
            m = match(last_pos[live], f.positions_A, gate_fraction=gate_fraction, spacing_A=spacing_A,
                      max_shift_A=0.0 if sample_frame else None)
            if not sample_frame:  # the residual drift of this frame: carried by every track
                last_pos = last_pos + m.shift_A
            ids[m.det] = live[m.pred]
        new = np.flatnonzero(ids < 0)
        ids[new] = len(last_pos) + np.arange(len(new))
        last_pos = np.concatenate([last_pos, np.zeros((len(new), 2))])
        last_seen = np.concatenate([last_seen, np.zeros(len(new), dtype=np.int64)])
        last_pos[ids] = f.positions_A
        last_seen[ids] = step
        out.append(ids)
    return out


@dataclass
class Trajectories:
    """Per-atom latent trajectories: one row per (track, frame) where the atom was encoded, sorted
    by track then frame. ``step``: the frame's position in the sequence; ``dose_e_per_A2``: the
    dose delivered up to the end of that frame (cumulative)."""

    track: np.ndarray
    frame_index: np.ndarray
    step: np.ndarray
    positions_A: np.ndarray
    z: np.ndarray
    angle_rad: np.ndarray
    dose_e_per_A2: np.ndarray
    true_class: np.ndarray
    state: np.ndarray

    def __len__(self) -> int:
        return len(self.track)

    def columns(self) -> dict[str, np.ndarray]:
        """Flat columns for a table (``z0..z{k-1}``)."""
        cols: dict[str, np.ndarray] = {"track": self.track, "frame_index": self.frame_index, "step": self.step,
                                       "x_A": self.positions_A[:, 0], "y_A": self.positions_A[:, 1]}
        for j in range(self.z.shape[1]):
            cols[f"z{j}"] = self.z[:, j]
        cols.update(angle_rad=self.angle_rad, dose_e_per_A2=self.dose_e_per_A2, state=self.state, true_class=self.true_class)
        return cols

    def runs(self) -> list[np.ndarray]:
        """Row indices of each track (in frame order)."""
        if len(self.track) == 0:
            return []
        cuts = np.flatnonzero(np.diff(self.track)) + 1
        return np.split(np.arange(len(self.track)), cuts)


def build_trajectories(frames: Sequence[LatentFrame], track_ids: Sequence[np.ndarray]) -> Trajectories:
    """Rows of every encoded atom, with its track (from :func:`link_atoms`)."""
    if len(track_ids) != len(frames):
        raise InputError("track_ids", len(track_ids), f"must have one array per frame ({len(frames)})")
    dose = np.cumsum([max(float(f.dose_e_per_A2), 0.0) for f in frames])
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("track", "frame", "step", "pos", "z", "angle", "dose", "cls")}
    k = frames[0].z.shape[1] if frames else 0
    for step, (f, ids) in enumerate(zip(frames, track_ids)):
        e = f.encoded
        n = int(e.sum())
        parts["track"].append(ids[e])
        parts["frame"].append(np.full(n, f.frame_index, dtype=np.int64))
        parts["step"].append(np.full(n, step, dtype=np.int64))
        parts["pos"].append(f.positions_A[e])
        parts["z"].append(f.z[e])
        parts["angle"].append(f.angle_rad[e])
        parts["dose"].append(np.full(n, dose[step]))
        parts["cls"].append(f.true_class[e] if f.true_class is not None else np.full(n, -1, dtype=np.int64))
    if not frames or sum(len(t) for t in parts["track"]) == 0:
        z0 = np.zeros((0, k))
        return Trajectories(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2)), z0, np.zeros(0),
                            np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
    track = np.concatenate(parts["track"])
    step_all = np.concatenate(parts["step"])
    order = np.lexsort((step_all, track))
    return Trajectories(track[order], np.concatenate(parts["frame"])[order], step_all[order], np.concatenate(parts["pos"])[order],
                        np.concatenate(parts["z"])[order], np.concatenate(parts["angle"])[order], np.concatenate(parts["dose"])[order],
                        np.concatenate(parts["cls"])[order], np.full(len(track), -1, dtype=np.int64))


@dataclass
class StateModel:
    """States of the content latents: a Gaussian mixture chosen by BIC, its components merged
    where the noise cannot tell them apart (:func:`merge_states`). ``bic``: BIC per number of
    components tried; ``components``: the mixture's; ``merged`` ``(components,)``: the state of
    each component; ``means`` ``(S, k)``, ``weights`` ``(S,)`` of the states."""

    n_states: int
    bic: dict[int, float]
    means: np.ndarray
    weights: np.ndarray
    gmm: Any = field(repr=False)
    components: int = 0
    merged: np.ndarray | None = None

    def predict(self, z: np.ndarray) -> np.ndarray:
        from threadpoolctl import threadpool_limits  # lazy: threadpoolctl (via scikit-learn) only where the mixture is fitted

        z = np.asarray(z, dtype=np.float64)
        if len(z) == 0:
            return np.zeros(0, dtype=np.int64)
        with threadpool_limits(1):
            comp = np.asarray(self.gmm.predict(z), dtype=np.int64)
        return comp if self.merged is None else self.merged[comp]


def merge_states(model: StateModel, scale: np.ndarray, n_sigma: float) -> StateModel:
    """Components whose means lie closer than ``n_sigma`` in units of ``scale`` ``(k,)`` (the
    noise of what the events compare) become one state (transitively); states renumbered by
    decreasing weight. A mixture splits a non-Gaussian cluster into several components; a change
    between them is noise, not a transformation."""
    g = model.gmm
    mu, w = np.asarray(g.means_), np.asarray(g.weights_)
    n = len(mu)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if np.sqrt((((mu[i] - mu[j]) / scale) ** 2).sum()) < n_sigma:
                parent[root(j)] = root(i)
    roots = sorted({root(i) for i in range(n)})
    weight = np.array([w[[i for i in range(n) if root(i) == r]].sum() for r in roots])
    order = np.argsort(-weight, kind="stable")
    number = {roots[o]: k for k, o in enumerate(order)}
    merged = np.array([number[root(i)] for i in range(n)], dtype=np.int64)
    means = np.array([(w[merged == k, None] * mu[merged == k]).sum(0) / w[merged == k].sum() for k in range(len(roots))])
    return StateModel(len(roots), model.bic, means, weight[order], g, n, merged)


def fit_states(z: np.ndarray, *, max_states: int = 6, seed: int = 0, max_samples: int = 20000) -> StateModel:
    """A Gaussian mixture over ``z`` ``(M, k)`` with 1..``max_states`` components, the lowest BIC
    kept; states are numbered by decreasing weight (state 0 the most common). Seeded: the same
    ``z`` and ``seed`` give the same states."""
    from sklearn.mixture import GaussianMixture  # scikit-learn: imported where it is used
    from threadpoolctl import threadpool_limits  # lazy: threadpoolctl (via scikit-learn) only where the mixture is fitted

    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or len(z) < 2 or not np.all(np.isfinite(z)):
        raise InputError("z", f"shape {z.shape}", "must be (M >= 2, k) finite content latents")
    if max_states < 1:
        raise InputError("max_states", max_states, "must be >= 1")
    rng = np.random.default_rng(seed)
    sample = z[rng.choice(len(z), max_samples, replace=False)] if len(z) > max_samples else z
    best, bic = None, {}
    # small matrices: BLAS threads only cost here (10-100x slower on a busy machine)
    with threadpool_limits(1):
        for n in range(1, min(max_states, len(sample)) + 1):
            g = GaussianMixture(n_components=n, covariance_type="full", random_state=seed, n_init=2, reg_covar=1e-5).fit(sample)
            bic[n] = float(g.bic(sample))
            if best is None or bic[n] < bic[best.n_components]:
                best = g
    assert best is not None
    order = np.argsort(-best.weights_, kind="stable")
    # renumber the components by weight: permute the fitted parameters
    best.weights_ = best.weights_[order]
    best.means_ = best.means_[order]
    best.covariances_ = best.covariances_[order]
    best.precisions_ = best.precisions_[order]
    best.precisions_cholesky_ = best.precisions_cholesky_[order]
    return StateModel(int(best.n_components), bic, best.means_.copy(), best.weights_.copy(), best, int(best.n_components))


def _track_differences(traj: Trajectories) -> tuple[np.ndarray, np.ndarray] | None:
    """First differences of ``z`` along every track ``(M, k)`` and, per difference, the state both
    observations share (-1 where they differ) ``(M,)``; None when no track has two observations."""
    diffs, pairs_state = [], []
    for r in traj.runs():
        if len(r) > 1:
            diffs.append(np.diff(traj.z[r], axis=0))
            st = traj.state[r]
            pairs_state.append(np.where(st[1:] == st[:-1], st[1:], -1))
    if not diffs:
        return None
    return np.concatenate(diffs), np.concatenate(pairs_state)


def latent_noise(traj: Trajectories, *, by_state: bool = False, n_states: int = 0, min_pairs: int = 30) -> np.ndarray:
    """Noise of one observation of ``z``: the median absolute first difference along the tracks
    over ``0.6745 * sqrt(2)`` (a Gaussian's MAD of a difference), ``(k,)``. ``by_state``: per
    state ``(n_states, k)``, from consecutive observations both in that state (the overall
    noise where a state has fewer than ``min_pairs`` of them)."""
    k = traj.z.shape[1]
    pairs = _track_differences(traj)
    if pairs is None:
        return np.full((n_states, k) if by_state else k, np.nan)
    d, ps = pairs
    overall = np.median(np.abs(d), axis=0) / (0.6745 * math.sqrt(2.0))
    if not by_state:
        return overall
    out = np.tile(overall, (n_states, 1))
    for s in range(n_states):
        m = ps == s
        if m.sum() >= min_pairs:
            out[s] = np.median(np.abs(d[m]), axis=0) / (0.6745 * math.sqrt(2.0))
    return out


def _robust_cov(d: np.ndarray) -> np.ndarray:
    """Robust covariance ``(k, k)`` of rows ``d`` ``(M, k)`` (centred at 0): scales from the median
    absolute value, covariances from the scales of sums and differences (Gnanadesikan and
    Kettenring: ``cov(x, y) = (s(x + y)**2 - s(x - y)**2) / 4`` on standardised ``x``, ``y``), so a
    rare jump does not inflate the noise. Made positive definite by clipping its eigenvalues."""
    mad = 1.0 / 0.6745
    s = np.median(np.abs(d), axis=0) * mad
    s = np.where(s > 0, s, 1.0)
    u = d / s
    k = d.shape[1]
    r = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            plus = (np.median(np.abs(u[:, i] + u[:, j])) * mad) ** 2
            minus = (np.median(np.abs(u[:, i] - u[:, j])) * mad) ** 2
            r[i, j] = r[j, i] = (plus - minus) / max(plus + minus, 1e-12)
    w, v = np.linalg.eigh(r)
    r = (v * np.clip(w, 0.05, None)) @ v.T
    return np.asarray(r * np.outer(s, s))


def latent_noise_cov(traj: Trajectories, n_states: int, *, min_pairs: int = 50) -> np.ndarray:
    """Noise covariance of one observation of ``z`` per state, ``(n_states, k, k)``: a robust
    covariance (:func:`_robust_cov`) of the first differences along the tracks between two
    observations in that state, over 2 (the overall one where a state has fewer than
    ``min_pairs`` such pairs). The content dimensions' noise is correlated (up to 0.7 between two
    of them for the shipped weights), so a jump against that correlation is rarer than the
    per-dimension noise says, and one along it more common."""
    k = traj.z.shape[1]
    pairs = _track_differences(traj)
    if pairs is None:
        return np.tile(np.eye(k), (max(n_states, 1), 1, 1))
    d, ps = pairs
    overall = _robust_cov(d) / 2.0
    out = np.tile(overall, (n_states, 1, 1))
    for s in range(n_states):
        m = ps == s
        if m.sum() >= max(min_pairs, 5 * k):
            out[s] = _robust_cov(d[m]) / 2.0
    return out


def window_noise_inflation(traj: Trajectories, windows: Sequence[int], *, min_pairs: int = 200) -> dict[int, float]:
    """How much more a difference of two ``w``-observation window means varies than independent
    observations would make it, per window: ``trace(C_w) / trace(2 C_1 / w)`` with ``C_w`` the robust
    covariance (:func:`_robust_cov`) of the window differences along every track and ``C_1`` the
    one-observation noise (half the robust covariance of the first differences). The latents drift
    slowly (the frames' noise is not independent), so a long window's difference is noisier than
    ``C_1`` says: 1.06-1.09 at 4 frames and 1.09-1.23 at 8 on the tuning sequences of the shipped
    weights. Never below 1; 1.0 where a window has fewer than ``min_pairs`` differences."""
    pairs = _track_differences(traj)
    out = {int(w): 1.0 for w in windows}
    if pairs is None:
        return out
    one = np.trace(_robust_cov(pairs[0])) / 2.0
    for w in out:
        diffs = []
        for r in traj.runs():
            z = traj.z[r]
            if len(z) < 2 * w:
                continue
            cs = np.vstack([np.zeros((1, z.shape[1])), np.cumsum(z, axis=0)])
            t = np.arange(w, len(z) - w + 1)
            diffs.append((cs[t + w] - 2 * cs[t] + cs[t - w]) / w)
        if diffs and sum(len(d) for d in diffs) >= min_pairs and one > 0:
            out[w] = max(1.0, float(np.trace(_robust_cov(np.concatenate(diffs))) / (2.0 * one / w)))
    return out


@dataclass
class Event:
    """A jump in one track: between observation rows ``row_before`` and ``row_after`` (the first
    row of the new state). ``score``: the jump over the noise of a window-mean difference;
    ``kind``: ``jump`` (the latent moved), ``state`` (only the majority state changed) or both."""

    track: int
    frame_index: int
    step: int
    position_A: tuple[float, float]
    dose_e_per_A2: float
    from_state: int
    to_state: int
    score: float
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return {"track": self.track, "frame_index": self.frame_index, "step": self.step,
                "position_A": [round(self.position_A[0], 4), round(self.position_A[1], 4)],
                "dose_e_per_A2": self.dose_e_per_A2, "from_state": self.from_state, "to_state": self.to_state,
                "score": round(self.score, 3), "kind": self.kind}


def _majority(states: np.ndarray) -> tuple[int, float]:
    vals, counts = np.unique(states, return_counts=True)
    i = int(np.argmax(counts))
    return int(vals[i]), float(counts[i]) / len(states)


def _candidates(z: np.ndarray, st: np.ndarray, w: int, sig: np.ndarray, n_sigma: float, state_agreement: float,
                use_states: bool, edge: int | None = None) -> list[tuple[float, int, float, bool, int, int]]:
    """Jump candidates of one track at window ``w``: ``(priority, t, score, changed, a, b)`` with
    ``t`` the first row of the "after" window and ``a``, ``b`` the majority states around it.
    ``edge``: at a track's ends the window on the short side shrinks down to ``edge`` rows (its
    noise grows to match), so a jump in the first or last ``w`` rows is placed where it is rather
    than at row ``w``; None: full windows only."""
    n = len(z)
    m = w if edge is None else max(1, min(w, int(edge)))
    if n < w + m:
        return []
    cs = np.vstack([np.zeros((1, z.shape[1])), np.cumsum(z, axis=0)])
    t = np.arange(m, n - m + 1)
    nb = np.minimum(w, t)
    na = np.minimum(w, n - t)
    t, nb, na = t[(nb + na) >= w + m], nb[(nb + na) >= w + m], na[(nb + na) >= w + m]
    if len(t) == 0:
        return []
    before = (cs[t] - cs[t - nb]) / nb[:, None]
    after = (cs[t + na] - cs[t]) / na[:, None]
    maj = [(_majority(st[ti - b:ti]), _majority(st[ti:ti + a])) for ti, b, a in zip(t, nb, na)]
    diff = after - before
    if sig.ndim == 3:  # per-state covariances: a Mahalanobis norm with the correlations
        fallback = sig[int(np.argmax(np.trace(sig, axis1=1, axis2=2)))]
        ca = np.array([sig[a] if 0 <= a < len(sig) else fallback for (a, _), _ in maj])
        cb = np.array([sig[b] if 0 <= b < len(sig) else fallback for _, (b, _) in maj])
        solved = np.linalg.solve(ca / nb[:, None, None] + cb / na[:, None, None], diff[:, :, None])[:, :, 0]
        score = np.sqrt(np.clip(np.einsum("ni,ni->n", diff, solved), 0.0, None))
    else:
        if sig.ndim == 2:
            sa = np.array([sig[a] if 0 <= a < len(sig) else sig.max(0) for (a, _), _ in maj])
            sb = np.array([sig[b] if 0 <= b < len(sig) else sig.max(0) for _, (b, _) in maj])
            scale = np.sqrt(sa ** 2 / nb[:, None] + sb ** 2 / na[:, None])
        else:
            scale = sig[None, :] * np.sqrt(1.0 / nb + 1.0 / na)[:, None]
        score = np.sqrt(((diff / scale) ** 2).sum(1))
    changed = np.zeros(len(t), dtype=bool)
    if use_states:
        changed = np.array([a != b and fa >= state_agreement and fb >= state_agreement for (a, fa), (b, fb) in maj], dtype=bool)
    # a state change counts when the latents moved too (half the threshold): two states that
    # split one blob of noise make no events
    changed &= score > 0.5 * n_sigma
    hit = (score > n_sigma) | changed
    prio = score + np.where(changed, n_sigma, 0.0)
    return [(float(prio[i]), int(t[i]), float(score[i]), bool(changed[i]), maj[i][0][0], maj[i][1][0]) for i in np.flatnonzero(hit)]


def detect_events(traj: Trajectories, *, window: int | Sequence[int] = 4, n_sigma: float = 6.0, sigma_z: np.ndarray | None = None,
                  state_agreement: float = 0.75, use_states: bool = True, edge_window: int | None = None,
                  window_inflation: dict[int, float] | None = None) -> list[Event]:
    """Jumps in every track (see the module docstring); ``traj.state`` must be set when ``use_states``.

    ``window``: observations averaged on each side, or several (multi-scale: a short window
    resolves events a few frames apart, a long one finds small jumps; the shortest windows are
    taken first, and a candidate within its window of an event already taken on the track is the
    same event); ``n_sigma``: the jump threshold in units of the noise of a difference of two
    window means (``sqrt((sigma_a**2 + sigma_b**2) / window)`` per dimension for majority states
    ``a`` before and ``b`` after, combined as a Mahalanobis norm); ``sigma_z``: the noise of one
    observation, ``(k,)`` or per state ``(S, k)`` (measured with :func:`latent_noise` when None),
    or per-state covariances ``(S, k, k)`` (:func:`latent_noise_cov`: the norm is then Mahalanobis
    with the correlations between dimensions);
    ``state_agreement``: the share of each window that must show its majority state for a state
    change to count; ``edge_window``: at a track's first and last rows the window on the short
    side may shrink to this many rows (None: full windows only, so a jump in the first ``window``
    rows is placed at row ``window``); ``window_inflation``: per window, the factor by which the
    variance of a window-mean difference exceeds the independent-noise value
    (:func:`window_noise_inflation`; None: 1 for every window)."""
    if edge_window is not None and edge_window < 1:
        raise InputError("edge_window", edge_window, "must be >= 1 (or None)")
    windows = sorted({int(window)} if isinstance(window, (int, np.integer)) else {int(w) for w in window})
    if not windows or windows[0] < 1:
        raise InputError("window", window, "must be >= 1 (or a list of such)")
    if not (math.isfinite(n_sigma) and n_sigma > 0):
        raise InputError("n_sigma", n_sigma, "must be positive")
    sig = latent_noise(traj) if sigma_z is None else np.asarray(sigma_z, dtype=np.float64)
    if sig.ndim == 3:
        k = traj.z.shape[1]
        if sig.shape[1:] != (k, k) or not np.all(np.isfinite(sig)):
            raise InputError("sigma_z.shape", sig.shape, f"covariances must be finite (S, {k}, {k})")
    else:
        sig = np.where(np.isfinite(sig) & (sig > 0), sig, 1.0)
    events: list[Event] = []
    for rows in traj.runs():
        z, st = traj.z[rows], traj.state[rows]
        taken: list[int] = []
        for w in windows:
            # one event per peak: greedy non-maximum suppression within the window
            f = 1.0 if window_inflation is None else float(window_inflation.get(w, 1.0))
            sig_w = sig * (f if sig.ndim == 3 else math.sqrt(f))  # a covariance scales by f, a standard deviation by its root
            for _, t, score, changed, a, b in sorted(_candidates(z, st, w, sig_w, n_sigma, state_agreement, use_states, edge_window), key=lambda c: -c[0]):
                if any(abs(t - u) < w for u in taken):
                    continue
                taken.append(t)
                r = rows[t]
                kind = "jump+state" if (score > n_sigma and changed) else ("jump" if score > n_sigma else "state")
                events.append(Event(int(traj.track[r]), int(traj.frame_index[r]), int(traj.step[r]),
                                    (float(traj.positions_A[r, 0]), float(traj.positions_A[r, 1])), float(traj.dose_e_per_A2[r]),
                                    a, b, score, kind))
    events.sort(key=lambda e: (e.step, e.track))
    return events


def group_events(events: Sequence[Event], *, radius_A: float = 3.0, steps: int = 2, linkage: str = "strongest") -> list[list[Event]]:
    """Events close in space and time as one group: one swap changes two sites and their
    neighbours, one vacancy its neighbours.

    ``linkage="strongest"`` (default): the strongest event not yet grouped takes every ungrouped
    event within ``radius_A`` and ``steps`` frames of it, and so on (no chains: two swaps 5 Å apart
    in the same frame stay two groups, each with its neighbours' echoes); ``"transitive"``: events
    within ``radius_A`` and ``steps`` of each other, transitively (chains through neighbours)."""
    if linkage not in ("strongest", "transitive"):
        raise InputError("linkage", linkage, "must be 'strongest' or 'transitive'")
    n = len(events)
    if n == 0:
        return []
    pos = np.array([e.position_A for e in events])
    st = np.array([e.step for e in events], dtype=np.float64)
    if linkage == "strongest":
        free = np.ones(n, dtype=bool)
        out: list[list[Event]] = []
        for i in sorted(range(n), key=lambda j: (-events[j].score, j)):
            if not free[i]:
                continue
            take = free & (np.hypot(pos[:, 0] - pos[i, 0], pos[:, 1] - pos[i, 1]) <= radius_A) & (np.abs(st - st[i]) <= steps)
            free &= ~take
            out.append([events[int(j)] for j in np.flatnonzero(take)])
        return sorted(out, key=lambda g: (min(e.step for e in g), g[0].position_A))
    # space-time points: a step counts as radius_A / steps Å
    pts = np.column_stack([pos, st * (radius_A / max(steps, 1e-9))])
    pairs = cKDTree(pts).query_pairs(radius_A * math.sqrt(2.0), output_type="ndarray")
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for i, j in pairs:
        if np.hypot(*(pos[i] - pos[j])) <= radius_A and abs(st[i] - st[j]) <= steps:
            ri, rj = root(int(i)), root(int(j))
            if ri != rj:
                parent[rj] = ri
    groups: dict[int, list[Event]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(events[i])
    return sorted(groups.values(), key=lambda g: (min(e.step for e in g), g[0].position_A))


def group_evidence(group: Sequence[Event]) -> float:
    """A group's evidence: the root sum of squares of the best score of each track in it (noise
    units). A knock-on moves its three neighbours and the site a little each (3-6 sigma), a noise
    excursion one track: together the small jumps weigh like one large one."""
    best: dict[int, float] = {}
    for e in group:
        best[e.track] = max(best.get(e.track, 0.0), e.score)
    return float(math.sqrt(sum(v * v for v in best.values())))


@dataclass
class TransitionGraph:
    """States and the transitions between them: ``counts[i, j]`` changes from ``i`` to ``j``;
    ``exposure_e_per_A2[i]`` the dose all tracks spent in state ``i``; ``rate_per_dose[i, j]``
    = counts / exposure (per e/Å²; NaN where no exposure)."""

    n_states: int
    counts: np.ndarray
    exposure_e_per_A2: np.ndarray
    rate_per_dose: np.ndarray
    occupancy: np.ndarray
    state_means: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        def clean(a: np.ndarray) -> list[Any]:
            out = a.astype(object)
            out[~np.isfinite(a.astype(np.float64))] = None
            return list(out.tolist())

        edges = [{"from": i, "to": j, "count": int(self.counts[i, j]), "rate_per_e_per_A2": float(self.rate_per_dose[i, j])}
                 for i in range(self.n_states) for j in range(self.n_states) if i != j and self.counts[i, j] > 0]
        return {"n_states": self.n_states, "state_means_z": np.round(self.state_means, 5).tolist(),
                "occupancy": [int(v) for v in self.occupancy], "exposure_e_per_A2": clean(self.exposure_e_per_A2),
                "counts": self.counts.astype(int).tolist(), "rate_per_e_per_A2": clean(self.rate_per_dose), "edges": edges}


def transition_graph(traj: Trajectories, events: Sequence[Event], n_states: int, state_means: np.ndarray | None = None) -> TransitionGraph:
    """Counts of ``events`` between their persistent states (events with ``from == to`` are not
    transitions) and rates per dose: each track's observations between its events are in the
    state of that stretch, and the dose increments between its observations are that state's
    exposure."""
    counts = np.zeros((n_states, n_states), dtype=np.int64)
    exposure = np.zeros(n_states)
    occupancy = np.bincount(traj.state[traj.state >= 0], minlength=n_states)[:n_states] if len(traj) else np.zeros(n_states, np.int64)
    by_track: dict[int, list[Event]] = {}
    for e in events:
        by_track.setdefault(e.track, []).append(e)
        if e.from_state != e.to_state and 0 <= e.from_state < n_states and 0 <= e.to_state < n_states:
            counts[e.from_state, e.to_state] += 1
    for rows in traj.runs():
        if len(rows) < 2:
            continue
        dose = traj.dose_e_per_A2[rows]
        steps = traj.step[rows]
        evs = sorted(by_track.get(int(traj.track[rows[0]]), []), key=lambda e: e.step)
        cuts = [0] + [int(np.searchsorted(steps, e.step)) for e in evs] + [len(rows)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            if b - a < 1:
                continue
            s, _ = _majority(traj.state[rows[a:b]])
            if 0 <= s < n_states:
                lo = dose[a - 1] if a > 0 else dose[a]
                exposure[s] += dose[b - 1] - lo
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(exposure[:, None] > 0, counts / exposure[:, None], np.nan)
    means = np.zeros((n_states, traj.z.shape[1])) if state_means is None else np.asarray(state_means)
    return TransitionGraph(n_states, counts, exposure, rate, np.asarray(occupancy), means)


@dataclass
class PathwayAnalysis:
    """Everything :func:`analyze_pathways` found."""

    trajectories: Trajectories
    states: StateModel
    sigma_z: np.ndarray
    events: list[Event]
    groups: list[list[Event]]
    graph: TransitionGraph


def analyze_pathways(frames: Sequence[LatentFrame], *, sample_frame: bool = True, gate_fraction: float = 0.4, max_gap_frames: int = 2,
                     max_states: int = 6, window: int | Sequence[int] = DEFAULT_WINDOWS, n_sigma: float = DEFAULT_N_SIGMA,
                     track_n_sigma: float | None = DEFAULT_TRACK_N_SIGMA, seed: int = 0, group_radius_A: float = 3.0, group_steps: int = 3,
                     linkage: str = "strongest", correlated_noise: bool = True, edge_window: int | None = DEFAULT_EDGE_WINDOW,
                     min_track_length: int | None = None, calibrate_windows: bool = True) -> PathwayAnalysis:
    """Link, fit states, detect events, group them and count transitions (the module docstring).

    ``window``: one window or several (multi-scale, :func:`detect_events`); the longest sets the
    noise scale under which mixture components are merged into states. Each track's jumps above
    ``track_n_sigma`` are candidates; they are grouped (:func:`group_events`, ``linkage``) and a
    group is kept when its evidence (:func:`group_evidence`: the jumps of the atom and of its
    neighbours together) reaches ``n_sigma``; the events of the other groups are dropped.
    ``track_n_sigma=None``: every jump must reach ``n_sigma`` on its own track (the rule before
    the group evidence). ``correlated_noise``: the jump norm uses the noise covariance per state
    (:func:`latent_noise_cov`), else the per-dimension noise (:func:`latent_noise`);
    ``edge_window``: the shortest window at a track's ends (:func:`detect_events`);
    ``calibrate_windows``: each window's noise measured on the tracks (:func:`window_noise_inflation`),
    else taken as the one-observation noise over the window (the rule before session 7; with
    ``n_sigma=9.25, track_n_sigma=5.0`` it reproduces the earlier defaults)."""
    if len(frames) < 2:
        raise InputError("frames", len(frames), "a pathway needs at least 2 frames with latents")
    windows = [int(window)] if isinstance(window, (int, np.integer)) else [int(w) for w in window]
    if not windows or min(windows) < 1:
        raise InputError("window", window, "must be >= 1 (or a list of such)")
    track_sigma = n_sigma if track_n_sigma is None else float(track_n_sigma)
    if not (math.isfinite(track_sigma) and 0 < track_sigma <= n_sigma):
        raise InputError("track_n_sigma", track_n_sigma, f"must be positive and at most n_sigma ({n_sigma})")
    ids = link_atoms(frames, sample_frame=sample_frame, gate_fraction=gate_fraction, max_gap_frames=max_gap_frames)
    traj = build_trajectories(frames, ids)
    if len(traj) < 2:
        raise InputError("frames", f"{len(traj)} encoded atoms", "too few encoded atoms for states")
    min_len = 2 * min(windows) if min_track_length is None else min_track_length
    runs = traj.runs()
    long_rows = np.concatenate([r for r in runs if len(r) >= min_len]) if any(len(r) >= min_len for r in runs) else np.arange(len(traj))
    states = fit_states(traj.z[long_rows], max_states=max_states, seed=seed)
    overall = latent_noise(traj)
    states = merge_states(states, np.where(overall > 0, overall, 1.0) * math.sqrt(2.0 / max(windows)), n_sigma)
    traj.state = states.predict(traj.z)
    sigma = latent_noise(traj, by_state=True, n_states=states.n_states)
    noise = latent_noise_cov(traj, states.n_states) if correlated_noise else sigma
    inflation = window_noise_inflation(traj, windows) if calibrate_windows else None
    events = detect_events(traj, window=windows, n_sigma=track_sigma, sigma_z=noise, edge_window=edge_window, window_inflation=inflation)
    groups = [g for g in group_events(events, radius_A=group_radius_A, steps=group_steps, linkage=linkage) if group_evidence(g) >= n_sigma]
    kept = {id(e) for g in groups for e in g}
    events = [e for e in events if id(e) in kept]
    graph = transition_graph(traj, events, states.n_states, states.means)
    return PathwayAnalysis(traj, states, sigma, events, groups, graph)
