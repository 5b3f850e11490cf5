"""The drift stage: track atoms across frames, model drift over acquisition time, correct positions.

``DriftStage.update(frame, atoms) -> DriftEstimate`` is pure and synchronous (no I/O, no
clock): the agent runs it in an executor after the segmenter, like any analysis stage.

How it works, per frame:

1. **Prediction.** Every live track has a reference position ``X`` (sample frame, Å). It must
   appear at the beam position ``X + d(t)`` where ``t`` is when the beam passes it; ``t`` comes
   from the frame's scan timing (one fixed-point step), ``d`` from the forecast.
2. **Matching** (:mod:`~stemagent.drift.tracking`): detections to predictions, gated at a
   fraction of the lattice spacing, Hungarian within conflicting groups. Missing atoms,
   vacancies, hops and atoms entering or leaving the field leave predictions or detections
   unmatched; unmatched detections become new tracks.
3. **Observations.** Each matched atom seen before gives one displacement observation
   ``y - X`` at the acquisition time of its own pixel. Atoms are binned by acquisition time
   (``bins_per_frame`` per frame), so a frame gives a few dozen observations spread over its
   time, each with the variance its atoms' reported uncertainties give.
4. **Model** (:mod:`~stemagent.drift.gp`): an exact GP over the last ``window_frames`` frames,
   hyperparameters refitted every ``refit_every_frames`` or when a frame scores badly under the
   current fit. Each (scan geometry, time bin) shares an unknown offset: whatever the reference
   positions of those atoms got wrong (e.g. the first frame's own distortion) is marginalised,
   so the intra-frame distortion of the reference is learned from the frames that follow.
5. **Reference refresh.** Each track's ``X`` becomes the weighted mean of its sightings minus
   the drift at their times (sightings older than the window keep the drift they had when
   they left it). The sample frame is thereby fixed by the reference lattice as a whole.

The sample frame is the scan frame of the reference (first) frame, corrected for its own
distortion: a beam position ``b`` at time ``t`` sees the sample point ``b - d(t)``, and
:meth:`DriftStage.to_beam` / :meth:`DriftStage.to_sample` convert between the two.
When tracking is lost, the frame becomes a new reference (``reference_id`` increments):
sample-frame positions from before are then no longer comparable, which the estimate says.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from stemagent.drift.config import DriftConfig
from stemagent.drift.estimate import DriftCheck, DriftEstimate, Status
from stemagent.drift.gp import DisplacementGP, torch_threads
from stemagent.drift.tracking import match
from stemagent.errors import InputError
from stemagent.types import Atoms, Frame, ScanGeometry
from stemagent.drift.resample import corrected_image

#: 95% two-sided Gaussian quantile
Z95 = 1.959963984540054
#: position uncertainty assumed when the segmenter reports none, Å
DEFAULT_UNCERTAINTY_A = 0.05


@dataclass
class _Sightings:
    """The tracked atoms seen in one frame of the window."""

    frame_index: int
    group_base: int  # (geometry id) * bins_per_frame
    start_s: float
    frame_time_s: float
    track: np.ndarray  # (n,)
    y_A: np.ndarray  # (n, 2) beam-frame positions
    t_s: np.ndarray  # (n,)
    w: np.ndarray  # (n,) 1 / variance (Å^-2)


@dataclass
class _WindowArrays:
    """The window's sightings, concatenated over its frames (``rec``: the frame's place in the window)."""

    track: np.ndarray
    y_A: np.ndarray
    t_s: np.ndarray
    w: np.ndarray
    rec: np.ndarray
    start_s: np.ndarray  # per frame of the window
    frame_time_s: np.ndarray
    group_base: np.ndarray


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class DriftStage:
    """Drift-correction stage between atom finding and deciding (see the module docstring).

    ``config``: a :class:`~stemagent.drift.config.DriftConfig`. ``device``: torch device of the
    GP (overrides ``config.device``).
    """

    name = "drift"

    def __init__(self, config: DriftConfig | None = None, *, device: torch.device | str | None = None) -> None:
        self.config = config or DriftConfig()
        self.device = torch.device(device) if device is not None else _resolve_device(self.config.device)
        self.reference_id = 0
        # running sums of the band calibration (see band_inflation); kept across references
        self._cal_excess_A2 = np.zeros(2)
        self._cal_var_A2 = np.zeros(2)
        self._cal_frames = 0.0
        self._reset()

    # --- state -----------------------------------------------------------------------------
    def _reset(self) -> None:
        if hasattr(self, "gp"):
            self.gp.clear()  # hyperparameters stay (warm start), the data go
        else:
            self.gp = DisplacementGP(self.device, self.config.random_walk_A_per_sqrt_s, self.config.min_slope_A_per_s,
                                     threads=self.config.gp_threads)
        self._X = np.zeros((0, 2))  # reference positions (sample frame)
        self._old_sum = np.zeros((0, 2))  # sum of w * (y - d) of sightings that left the window
        self._old_w = np.zeros(0)
        self._missed = np.zeros(0, dtype=np.int64)
        self._alive = np.zeros(0, dtype=bool)
        self._window: deque[_Sightings] = deque()
        self._win: _WindowArrays | None = None  # the window as flat arrays (see _window_arrays)
        self._geometries: dict[tuple, int] = {}
        self._has_reference = False
        # drift already accumulated when the reference was replaced for a better one (added to the
        # GP's drift everywhere: the GP models the drift since then)
        self._level_A = np.zeros(2)
        self._reference_dose: float | None = None  # dose per Å² of the reference frame (see _better_reference)
        self._frames_since_fit = 0
        self._frames_used = 0
        self.refit_due = False  # a hyperparameter refit is due (see refit())
        self._median_obs_var = 0.0
        self._ref_w = np.zeros(0)
        # the drift posterior (mean, variance) on a time grid, interpolated for per-atom times:
        # the window's grid after each update, plus the forecast over the frame being processed
        self._grid_t = np.zeros(0)
        self._grid_d = np.zeros((0, 2))
        self._grid_v = np.zeros((0, 2))

    def reset(self) -> None:
        """Forget everything: the next frame becomes a new reference (``reference_id`` increments)."""
        self.reference_id += 1
        self._reset()

    @property
    def has_reference(self) -> bool:
        return self._has_reference

    @property
    def n_tracks(self) -> int:
        return int(self._alive.sum())

    # --- forecasts and conversions -----------------------------------------------------------
    def forecast(self, t_s: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Drift ``d(t)`` at times ``t_s`` (shape ``(m,)`` or scalar): mean ``(m, 2)`` Å and 1-sigma std ``(m, 2)`` Å.

        Zero with zero std when the stage is disabled; the prior (wide) before any data.
        """
        t = np.atleast_1d(np.asarray(t_s, dtype=np.float64))
        if not self.config.enabled:
            return np.zeros((len(t), 2)), np.zeros((len(t), 2))
        mean, var = self.gp.predict(t)
        return mean + self._level_A, np.sqrt(var) * self.band_inflation

    @property
    def band_inflation(self) -> np.ndarray:
        """Factors ``(2,)`` (x, y) on the GP's drift standard deviation that make its band honest (1 until measured).

        Each new frame's binned observations are first compared with the forecast made before
        them: residual ``r``, the forecast's variance ``s_d^2`` and the rest of the observation's
        variance ``s_o^2`` (position noise, the learned extra noise, the group offset). With
        ``E[r^2] = c s_d^2 + s_o^2``, the moment estimate ``c = sum(r^2 - s_o^2) / sum(s_d^2)``
        over an exponential memory of ``calibration_frames`` frames (from the first fitted
        hyperparameters on), per axis like the hyperparameters, scales the variance; its square
        root, clipped to ``band_inflation_range``, is this factor. The next frame's bins lie 0-0.3 s ahead of the
        data, the horizon a command acts at. Why it is needed: the hyperparameters are fitted
        on a short window, and a fitted random walk or wobble is on average a little too
        confident about the next fraction of a second (the twin's benchmark: 92% coverage of
        the 95% band at 0.1 s without it).
        """
        cfg = self.config
        lo, hi = cfg.band_inflation_range
        if not cfg.calibrate_band:
            return np.ones(2)
        if self._cal_frames < 3.0 or np.any(self._cal_var_A2 <= 0):
            return np.full(2, float(lo))
        c = self._cal_excess_A2 / self._cal_var_A2
        return np.clip(np.sqrt(np.maximum(c, 0.0)), lo, hi)

    def _calibrate(self, t: np.ndarray, z: np.ndarray, v: np.ndarray) -> None:
        """Add one frame's new observations (times ``(m,)``, values and variances ``(m, 2)``) to
        the running band calibration, against the forecast on the grid (before the data go in)."""
        if not self.config.calibrate_band or len(t) == 0 or self.gp.n == 0 or self.gp.fits == 0:
            return
        mean, var = self._drift_at(t)
        hp = self.gp.hyperparameters()
        other = v + (np.asarray(hp["extra_noise_A2"]) + np.asarray(hp["offset_var_A2"]))[None, :]
        keep = 1.0 - 1.0 / self.config.calibration_frames
        self._cal_excess_A2 = keep * self._cal_excess_A2 + np.sum((z - mean) ** 2 - other, axis=0)
        self._cal_var_A2 = keep * self._cal_var_A2 + np.sum(var, axis=0)
        self._cal_frames = keep * self._cal_frames + 1.0

    def to_beam(self, position_A: np.ndarray | tuple[float, float], t_s: float) -> np.ndarray:
        """Beam (scan-frame) position that sees the sample point ``position_A`` (``(2,)`` or ``(N, 2)``) at time ``t_s``."""
        p = np.asarray(position_A, dtype=np.float64)
        return p + self.forecast(t_s)[0].reshape(1, 2).reshape((2,) if p.ndim == 1 else (1, 2))

    def to_sample(self, position_A: np.ndarray | tuple[float, float], t_s: float) -> np.ndarray:
        """Sample point seen by the beam position ``position_A`` (``(2,)`` or ``(N, 2)``) at time ``t_s``."""
        p = np.asarray(position_A, dtype=np.float64)
        return p - self.forecast(t_s)[0].reshape((2,) if p.ndim == 1 else (1, 2))

    def check(self, t_s: float) -> DriftCheck:
        """Can the estimate place the beam at time ``t_s``? Unreliable without a reference, after
        tracking was lost, or when the forecast's 95% band there is wider than ``band_limit_A``."""
        if not self.config.enabled:
            return DriftCheck(True, float(t_s), 0.0, "")
        _, std = self.forecast(t_s)
        band = float(Z95 * std.max())
        if not self._has_reference:
            return DriftCheck(False, float(t_s), band, "no reference frame")
        if self._frames_used < 2:
            return DriftCheck(False, float(t_s), band, "only the reference frame: no drift measured yet")
        if band > self.config.band_limit_A:
            return DriftCheck(False, float(t_s), band, f"95% band {band:.3f} Å exceeds band_limit_A={self.config.band_limit_A}")
        return DriftCheck(True, float(t_s), band, "")

    # --- the update ------------------------------------------------------------------------------
    def update(self, frame: Frame, atoms: Atoms) -> DriftEstimate:
        """Use one frame's atoms (beam-frame positions from the segmenter) and return the estimate."""
        t_start = time.perf_counter()
        # torch's thread count is set once for the whole update, not around each GP call: a switch
        # of its thread pool and back costs about as much as one of the update's small GP calls
        with torch_threads(self.gp.threads):
            return self._update(frame, atoms, t_start)

    def _update(self, frame: Frame, atoms: Atoms, t_start: float) -> DriftEstimate:
        geom = frame.geometry
        n = len(atoms)
        y = atoms.positions_A
        times = self._atom_times(frame, atoms)
        sigma = self._atom_sigma(atoms)
        if not self.config.enabled:
            return self._estimate(frame, atoms, "disabled", "drift correction is off", y, y, np.full(n, -1), times,
                                  sigma, t_start, corrected=False)
        usable = geom.contains(y, self.config.edge_margin_A) if n else np.zeros(0, dtype=bool)
        n_usable = int(usable.sum())
        track_ids = np.full(n, -1, dtype=np.int64)
        if n_usable < self.config.min_atoms:
            corrected = y - self._drift_at(times)[0] if self._has_reference else y.copy()
            return self._estimate(frame, atoms, "too_few_atoms",
                                  f"{n_usable} usable atoms < min_atoms={self.config.min_atoms}: frame not used",
                                  corrected, corrected, track_ids, times, sigma, t_start, n_detected=n)
        if not self._has_reference:
            return self._new_reference(frame, atoms, usable, times, sigma, t_start, "first frame")
        better = self._better_reference(frame)
        if better:
            # the sample frame carries on: the drift forecast at the frame's mid-time becomes the
            # level the new reference's drift starts from (its uncertainty is not carried)
            level = self._drift_at(np.array([0.5 * (frame.start_time_s + frame.end_time_s)]))[0][0]
            old_ref = self.reference_id
            self.reset()
            self._level_A = level
            return self._new_reference(frame, atoms, usable, times, sigma, t_start, f"{better}; new reference (was {old_ref})")

        # 1. prediction of every live track in this frame (one GP call: the forecast over the frame)
        self._extend_grid(self._frame_grid(frame))
        live = np.flatnonzero(self._alive)
        pred = self._predict_positions(geom, frame, self._X[live])
        inside = geom.contains(pred, self.config.edge_margin_A)
        cand = live[inside]
        det_idx = np.flatnonzero(usable)
        if len(cand) < self.config.min_atoms:
            # a field the tracks do not reach (the scan moved elsewhere): nothing to match; the
            # atoms become new tracks placed with the forecast, the drift is not measured here
            d_fc, _ = self._drift_at(times[det_idx])
            new_ids = self._add_tracks(y[det_idx] - d_fc)
            track_ids[det_idx] = new_ids
            self._push(frame, new_ids, y[det_idx], times[det_idx], sigma[det_idx])
            measured = y - self._drift_at(times)[0]
            return self._estimate(frame, atoms, "new_field",
                                  f"{len(cand)} tracked atoms in this field < min_atoms={self.config.min_atoms}: "
                                  "its atoms are placed with the forecast", measured, measured.copy(), track_ids, times,
                                  sigma, t_start, n_detected=n, n_new=len(new_ids))
        # 2. matching
        m = match(pred[inside], y[det_idx], gate_fraction=self.config.gate_fraction)
        n_match = len(m.pred)
        expected = max(1, min(len(cand), n_usable))
        if n_match < self.config.min_atoms or n_match < self.config.min_match_fraction * expected:
            old_ref = self.reference_id
            self.reset()
            return self._new_reference(frame, atoms, usable, times, sigma, t_start,
                                       f"tracking lost: {n_match} of {expected} expected atoms matched; "
                                       f"new reference (was {old_ref})", status="lost")
        slip = self._slip(frame, m.shift_A)
        if slip:
            old_ref = self.reference_id
            self.reset()
            return self._new_reference(frame, atoms, usable, times, sigma, t_start, f"{slip}; new reference (was {old_ref})",
                                       status="lost")
        tr = cand[m.pred]
        di = det_idx[m.det]
        # 3. outliers: residuals against the forecast, robust scale
        d_fc, _ = self._drift_at(times[di])
        r = y[di] - self._X[tr] - d_fc
        med = np.median(r, axis=0)
        mad = 1.4826 * np.median(np.abs(r - med), axis=0)
        scale = np.maximum(mad[None, :], sigma[di, None])
        good = np.all(np.abs(r - med) <= self.config.outlier_sigma * scale, axis=1)
        n_out = int((~good).sum())
        tr, di = tr[good], di[good]
        # 4. track bookkeeping: seen, missed, dropped, new
        self._missed[cand] += 1
        self._missed[tr] = 0
        drop = self._alive & (self._missed > self.config.max_missed_frames)
        self._alive[drop] = False
        unmatched = np.setdiff1d(det_idx, det_idx[m.det], assume_unique=True)
        new_ids = self._add_tracks(y[unmatched] - self._drift_at(times[unmatched])[0])
        track_ids[di] = tr
        track_ids[unmatched] = new_ids
        seen = np.concatenate([di, unmatched])
        self._push(frame, track_ids[seen], y[seen], times[seen], sigma[seen])
        # 5. observations, model, references
        score, refit, fit_ms = self._refresh_model(frame)
        measured = y - self._drift_at(times)[0]
        refined = measured.copy()
        has = track_ids >= 0
        refined[has] = self._X[track_ids[has]]
        return self._estimate(frame, atoms, "tracking", "", measured, refined, track_ids, times, sigma, t_start,
                              n_detected=n, n_matched=len(tr), n_new=len(new_ids), n_dropped=int(drop.sum()),
                              n_outliers=n_out, spacing_A=m.spacing_A, shift_A=m.shift_A, refit=refit, score=score,
                              fit_ms=fit_ms)

    # --- pieces of the update ----------------------------------------------------------------------
    def _slip(self, frame: Frame, shift_A: np.ndarray) -> str:
        """Why the atoms' common shift against the forecast is a jump, not drift ("" when it is not).

        The matcher looks for a shift up to half the lattice spacing only, so a jump by a whole
        lattice vector cannot be seen from a periodic lattice; any other jump shows as a shift
        far outside the forecast's band."""
        shift = float(np.hypot(*np.asarray(shift_A, dtype=np.float64)))
        t_mid = 0.5 * (frame.start_time_s + frame.end_time_s)
        sd = float(np.max(np.sqrt(self._drift_at(np.array([t_mid]))[1][0]) * self.band_inflation))
        limit = max(self.config.slip_A, self.config.slip_sigma * sd)
        if shift > limit:
            return f"tracking lost: the atoms jumped {shift:.3f} Å against the forecast (limit {limit:.3f} Å): a stage slip?"
        return ""

    def _better_reference(self, frame: Frame) -> str:
        """Why ``frame`` should replace the reference ("" when it should not): its dose per Å² is
        at least ``reference_dose_ratio`` times the reference frame's (a low-dose overview
        followed by high-resolution sub-scans). Positions scatter as ``1 / sqrt(dose)``, and the
        overview's errors are shared by all atoms of a sub-scan's region, so measured against it
        every sub-scan would carry a common offset the model reads as drift."""
        ratio = self.config.reference_dose_ratio
        ref = self._reference_dose
        if ratio is None or ref is None or ref <= 0 or frame.dose_e_per_A2 < ratio * ref:
            return ""
        return (f"frame dose {frame.dose_e_per_A2:.3g} e/Å² >= reference_dose_ratio={ratio:g} x the reference "
                f"frame's {ref:.3g} e/Å²")

    def _atom_times(self, frame: Frame, atoms: Atoms) -> np.ndarray:
        if atoms.times_s is not None:
            t = np.asarray(atoms.times_s, dtype=np.float64)
            if not np.all(np.isfinite(t)):
                raise InputError("atoms.times_s", t[~np.isfinite(t)][:3], "must be finite acquisition times in s")
            return t
        if len(atoms) == 0:
            return np.zeros(0)
        return frame.time_at_pixel(frame.geometry.sample_to_pixel(atoms.positions_A))

    @staticmethod
    def _atom_sigma(atoms: Atoms) -> np.ndarray:
        if atoms.uncertainty_A is None:
            return np.full(len(atoms), DEFAULT_UNCERTAINTY_A)
        s = np.asarray(atoms.uncertainty_A, dtype=np.float64)
        bad = ~np.isfinite(s) | (s < 0)
        if bad.any():
            raise InputError("atoms.uncertainty_A", s[bad][:3], "must be finite non-negative lengths in Å")
        return np.maximum(s, 1e-3)

    def _new_reference(self, frame: Frame, atoms: Atoms, usable: np.ndarray, times: np.ndarray, sigma: np.ndarray,
                       t_start: float, reason: str, status: Status = "reference") -> DriftEstimate:
        y = atoms.positions_A - self._level_A
        idx = np.flatnonzero(usable)
        ids = self._add_tracks(y[idx])
        track_ids = np.full(len(atoms), -1, dtype=np.int64)
        track_ids[idx] = ids
        self._has_reference = True
        self._reference_dose = float(frame.dose_e_per_A2)
        self._push(frame, ids, atoms.positions_A[idx], times[idx], sigma[idx])
        self._frames_used = 1
        return self._estimate(frame, atoms, status, reason, y.copy(), y.copy(), track_ids, times, sigma, t_start,
                              n_detected=len(atoms), n_new=len(ids))

    def _add_tracks(self, X: np.ndarray) -> np.ndarray:
        k = len(self._X)
        self._X = np.concatenate([self._X, X.reshape(-1, 2)])
        self._old_sum = np.concatenate([self._old_sum, np.zeros((len(X), 2))])
        self._old_w = np.concatenate([self._old_w, np.zeros(len(X))])
        self._missed = np.concatenate([self._missed, np.zeros(len(X), dtype=np.int64)])
        self._alive = np.concatenate([self._alive, np.ones(len(X), dtype=bool)])
        return np.arange(k, k + len(X))

    def _geometry_id(self, g: ScanGeometry) -> int:
        key = (tuple(g.center_A), tuple(g.fov_A), tuple(g.shape_px), g.rotation_rad, g.dwell_s, g.flyback_s)
        return self._geometries.setdefault(key, len(self._geometries))

    def _push(self, frame: Frame, track: np.ndarray, y: np.ndarray, t: np.ndarray, sigma: np.ndarray) -> None:
        g = frame.geometry
        rec = _Sightings(frame.index, self._geometry_id(g) * self.config.bins_per_frame, frame.start_time_s,
                         frame.end_time_s - frame.start_time_s, track.astype(np.int64), y.copy(), t.copy(), 1.0 / sigma**2)
        self._window.append(rec)
        self._win = None
        while len(self._window) > self.config.window_frames:
            old = self._window.popleft()  # its sightings keep the drift they have now
            d, _ = self._drift_at(old.t_s)
            np.add.at(self._old_sum, old.track, old.w[:, None] * (old.y_A - d))
            np.add.at(self._old_w, old.track, old.w)

    def _drift_at(self, t_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drift mean ``(n, 2)`` and variance ``(n, 2)`` at times ``t_s`` ``(n,)``, interpolated on
        the posterior grid (times outside it are evaluated on the GP)."""
        t_s = np.asarray(t_s, dtype=np.float64)
        if len(t_s) == 0:
            return np.zeros((0, 2)), np.zeros((0, 2))
        gt = self._grid_t
        if len(gt) < 2 or t_s.min() < gt[0] or t_s.max() > gt[-1]:
            lo, hi = float(t_s.min()), float(t_s.max())
            self._extend_grid(np.linspace(lo, hi, 9) if hi > lo else np.array([lo]))
            gt = self._grid_t
        mean = np.stack([np.interp(t_s, gt, self._grid_d[:, ax]) for ax in range(2)], axis=1)
        var = np.stack([np.interp(t_s, gt, self._grid_v[:, ax]) for ax in range(2)], axis=1)
        return mean, var

    def _extend_grid(self, t_s: np.ndarray) -> None:
        """Add the posterior at times ``t_s`` to the interpolation grid (one GP call)."""
        mean, var = self.gp.predict(t_s)
        mean = mean + self._level_A
        t = np.concatenate([self._grid_t, t_s])
        order = np.argsort(t, kind="stable")
        t = t[order]
        d = np.concatenate([self._grid_d, mean])[order]
        v = np.concatenate([self._grid_v, var])[order]
        keep = np.r_[True, np.diff(t) > 0]
        self._grid_t, self._grid_d, self._grid_v = t[keep], d[keep], v[keep]

    def _frame_grid(self, frame: Frame) -> np.ndarray:
        return frame.start_time_s + np.linspace(0.0, frame.end_time_s - frame.start_time_s, self.config.bins_per_frame + 1)

    def _predict_positions(self, geom: ScanGeometry, frame: Frame, X: np.ndarray) -> np.ndarray:
        """Beam-frame positions ``(n, 2)`` where the sample points ``X`` appear in ``frame``."""
        if len(X) == 0:
            return X.copy()
        t_mid = frame.start_time_s + 0.5 * (frame.end_time_s - frame.start_time_s)
        d, _ = self._drift_at(np.array([t_mid]))
        y = X + d
        for _ in range(2):
            t = frame.time_at_pixel(geom.sample_to_pixel(y))
            y = X + self._drift_at(t)[0]
        return y

    def _observations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Binned displacement observations of the window: times ``(m,)``, groups ``(m,)``,
        values ``(m, 2)`` and variances ``(m, 2)``. Only atoms seen more than once count: a first
        sighting defines the atom's reference and says nothing about drift."""
        cfg = self.config
        B = cfg.bins_per_frame
        win = self._window_arrays()
        track, w = win.track, win.w
        total_w = self._old_w + np.bincount(track, weights=w, minlength=len(self._X))
        n_sight = np.bincount(track, minlength=len(self._X)) + (self._old_w > 0)
        keep = n_sight[track] >= 2
        if not keep.any():
            return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros((0, 2)), np.zeros((0, 2))
        tr = track[keep]
        rec = win.rec[keep]
        t = win.t_s[keep]
        z = win.y_A[keep] - self._X[tr] - self._level_A  # the GP's part of the drift
        # the reference includes this sighting: its residual carries 1 - w/W of its information
        frac = np.clip(1.0 - w[keep] / total_w[tr], 0.05, 1.0)
        we = w[keep] * frac
        # bin of each sighting within its frame, then one bin index over the window (frame-major):
        # every bin's sums run over its sightings in the same order as frame by frame
        b = np.clip(((t - win.start_s[rec]) / np.maximum(win.frame_time_s[rec], 1e-12) * B).astype(np.int64), 0, B - 1)
        gb = rec * B + b
        size = len(win.start_s) * B
        sw = np.bincount(gb, weights=we, minlength=size)
        cnt = np.bincount(gb, minlength=size)
        ok = (cnt >= cfg.min_atoms_per_bin) & (sw > 0)
        if not ok.any():
            return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros((0, 2)), np.zeros((0, 2))
        tb = np.bincount(gb, weights=we * t, minlength=size)[ok] / sw[ok]
        zx = np.bincount(gb, weights=we * z[:, 0], minlength=size)[ok] / sw[ok]
        zy = np.bincount(gb, weights=we * z[:, 1], minlength=size)[ok] / sw[ok]
        idx = np.flatnonzero(ok)
        groups = win.group_base[idx // B] + idx % B
        return tb, groups, np.stack([zx, zy], axis=1), np.repeat((1.0 / sw[ok])[:, None], 2, axis=1)

    def _window_arrays(self) -> _WindowArrays:
        """The window's sightings as flat arrays (built once per change of the window)."""
        if self._win is None:
            recs = list(self._window)
            self._win = _WindowArrays(
                track=np.concatenate([r.track for r in recs]),
                y_A=np.concatenate([r.y_A for r in recs]),
                t_s=np.concatenate([r.t_s for r in recs]),
                w=np.concatenate([r.w for r in recs]),
                rec=np.repeat(np.arange(len(recs)), [len(r.track) for r in recs]),
                start_s=np.array([r.start_s for r in recs]),
                frame_time_s=np.array([r.frame_time_s for r in recs]),
                group_base=np.array([r.group_base for r in recs], dtype=np.int64),
            )
        return self._win

    def _refresh_model(self, frame: Frame) -> tuple[float, bool, float]:
        """New observations into the GP (refit when due or stale), then the references refreshed."""
        cfg = self.config
        t, g, z, v = self._observations()
        self._frames_used += 1
        new = t >= frame.start_time_s
        score = self._score(t[new], z[new] + self._level_A, v[new]) if self.gp.n else float("nan")
        self._calibrate(t[new], z[new] + self._level_A, v[new])
        self.gp.set_data(t, g, z, v)
        self._median_obs_var = float(np.median(v)) if len(v) else 0.0
        self._frames_since_fit += 1
        stale = np.isfinite(score) and score > cfg.stale_chi2
        due = self._frames_since_fit >= cfg.refit_every_frames or self.gp.fits == 0 or (self.gp.fits < 3 and self._frames_since_fit >= 2)
        fit_ms = 0.0
        refit = False
        self.refit_due = len(t) >= 4 and (due or stale)
        if self.refit_due and cfg.refit_in_update:
            fit_ms = self._fit_now()
            refit = True
        self._update_grid()
        self._refresh_references()
        return score, refit, fit_ms

    def _fit_now(self) -> float:
        t0 = time.perf_counter()
        self.gp.fit(self.config.refit_max_iter, self.config.refit_starts)
        self._frames_since_fit = 0
        self.refit_due = False
        return 1e3 * (time.perf_counter() - t0)

    def refit(self) -> float:
        """Refit the hyperparameters now if a refit is due (``refit_due``), then refresh the
        posterior and the references; returns the time it took in ms (0 when none was due).

        With ``refit_in_update=False`` the update only marks a refit due, and the caller runs
        this when it has time (e.g. in its executor after sending the next command), so a
        frame's update never waits for a fit.
        """
        if not self.refit_due or self.gp.n < 4:
            return 0.0
        ms = self._fit_now()
        self._update_grid()
        self._refresh_references()
        return ms

    def refit_job(self) -> Callable[[], dict[str, torch.Tensor]]:
        """A refit to run on another thread: it fits a copy of the GP (the data and
        hyperparameters as they are now) and returns the fitted raw hyperparameters, which
        :meth:`adopt_refit` applies. The stage itself is not touched until then."""
        gp = copy.deepcopy(self.gp)
        max_iter, starts = self.config.refit_max_iter, self.config.refit_starts

        def job() -> dict[str, torch.Tensor]:
            gp.fit(max_iter, starts)
            return gp.raw_hyperparameters()

        return job

    def adopt_refit(self, raw: dict[str, torch.Tensor]) -> float:
        """Apply hyperparameters from a :meth:`refit_job`, then refresh the posterior and the
        references (as :meth:`refit` does after fitting in place); returns the time in ms."""
        t0 = time.perf_counter()
        self.gp.set_raw_hyperparameters(raw)
        self.gp.fits += 1
        self._frames_since_fit = 0
        self.refit_due = False
        if self.gp.n and self._window:
            self._update_grid()
            self._refresh_references()
        return 1e3 * (time.perf_counter() - t0)

    def _score(self, t: np.ndarray, z: np.ndarray, v: np.ndarray) -> float:
        """Mean squared standardised residual of this frame's observations under the fit so far
        (the forecast over the frame, interpolated; plus the noise and offset variances)."""
        if len(t) == 0:
            return float("nan")
        mean, var = self._drift_at(t)
        hp = self.gp.hyperparameters()
        extra = np.asarray(hp["extra_noise_A2"]) + np.asarray(hp["offset_var_A2"])
        return float(np.mean((z - mean) ** 2 / np.maximum(var + v + extra[None, :], 1e-18)))

    def _update_grid(self) -> None:
        """Posterior of the drift on a grid spanning the window (bin edges of every frame): one GP call."""
        grid = np.unique(np.concatenate([r.start_s + np.linspace(0.0, r.frame_time_s, self.config.bins_per_frame + 1)
                                         for r in self._window]))
        self._grid_t, self._grid_d, self._grid_v = np.zeros(0), np.zeros((0, 2)), np.zeros((0, 2))
        self._extend_grid(grid)

    def _refresh_references(self) -> None:
        win = self._window_arrays()
        track, w, y = win.track, win.w, win.y_A
        d, _ = self._drift_at(win.t_s)
        k = len(self._X)
        sw = self._old_w + np.bincount(track, weights=w, minlength=k)
        sx = self._old_sum[:, 0] + np.bincount(track, weights=w * (y[:, 0] - d[:, 0]), minlength=k)
        sy = self._old_sum[:, 1] + np.bincount(track, weights=w * (y[:, 1] - d[:, 1]), minlength=k)
        ok = sw > 0
        self._X[ok, 0] = sx[ok] / sw[ok]
        self._X[ok, 1] = sy[ok] / sw[ok]
        self._ref_w = sw

    def reference_positions_A(self, track_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Refined sample-frame positions ``(n, 2)`` of tracks and their 1-sigma uncertainty ``(n,)`` (Å)."""
        ids = np.asarray(track_ids, dtype=np.int64)
        if np.any((ids < 0) | (ids >= len(self._X))):
            raise InputError("track_ids", ids[(ids < 0) | (ids >= len(self._X))][:3], f"must index the {len(self._X)} tracks")
        w = np.concatenate([self._ref_w, np.zeros(len(self._X) - len(self._ref_w))])[ids]
        sd = np.where(w > 0, 1.0 / np.sqrt(np.maximum(w, 1e-30)), np.inf)
        return self._X[ids].copy(), sd * self.noise_inflation

    @property
    def noise_inflation(self) -> float:
        """How much larger the position noise is than the segmenter reports, as the GP's learned
        extra noise says (1 when the reported uncertainties are right)."""
        if self.gp.n == 0 or self._median_obs_var <= 0:
            return 1.0
        extra = float(np.mean(self.gp.hyperparameters()["extra_noise_A2"]))
        return float(np.sqrt(1.0 + extra / self._median_obs_var))

    # --- the result ----------------------------------------------------------------------------------
    def _estimate(self, frame: Frame, atoms: Atoms, status: Status, reason: str, measured: np.ndarray, refined: np.ndarray,
                  track_ids: np.ndarray, times: np.ndarray, sigma: np.ndarray, t_start: float, corrected: bool = True,
                  **counts: object) -> DriftEstimate:
        grid = self._frame_grid(frame)
        infl = self.band_inflation
        if corrected:
            d_mean, d_var = self._drift_at(grid)
            d_std = np.sqrt(d_var) * infl
            d_var_atoms = self._drift_at(times)[1] * infl**2
        else:
            d_mean, d_std = np.zeros((len(grid), 2)), np.zeros((len(grid), 2))
            d_var_atoms = np.zeros((len(times), 2))
        unc = np.sqrt(sigma**2 + d_var_atoms.mean(axis=1)) if len(times) else np.zeros(0)
        pos = refined if self.config.positions == "refined" else measured
        out_atoms = Atoms(
            positions_A=pos,
            classes=atoms.classes,
            confidence=atoms.confidence,
            frame_index=atoms.frame_index,
            class_names=atoms.class_names,
            uncertainty_A=unc,
            times_s=times,
            evidence_nats=atoms.evidence_nats,
        )
        image = None
        if corrected and self.config.resample_frame and status in ("reference", "tracking"):
            image = corrected_image(frame, lambda t: (self._drift_at(t)[0], np.sqrt(self._drift_at(t)[1]) * self.band_inflation))
        shift = counts.pop("shift_A", np.zeros(2))
        est = DriftEstimate(
            frame_index=frame.index,
            status=status,
            reason=reason,
            atoms=out_atoms,
            measured_positions_A=measured,
            refined_positions_A=refined,
            track_ids=track_ids,
            times_s=grid,
            displacement_A=d_mean,
            std_A=d_std,
            reference_id=self.reference_id,
            n_tracks=self.n_tracks,
            shift_A=(float(shift[0]), float(shift[1])),  # type: ignore[index]
            hyperparameters=self.gp.hyperparameters() if corrected else {},
            refit_due=self.refit_due,
            band_inflation=(float(infl[0]), float(infl[1])) if corrected else (1.0, 1.0),
            corrected_image=image,
            **counts,  # type: ignore[arg-type]
        )
        est.update_ms = 1e3 * (time.perf_counter() - t_start)
        return est
