"""Autonomous survey: Bayesian optimisation that chooses where to look next, at the least dose.

The first observation is a coarse **overview** of the field (the run's initial scan: large, low
dose). From it the policy builds a discrete **candidate set** of sub-scan centres (a grid over the
allowed square, optionally plus one per cluster of overview spots) and **structure features** per
candidate (:mod:`.survey_features`: from the overview's pixels when the observation carries them
as ``features["image"]``, else from the atoms the segmenter found in it). Every later observation
is a high-resolution **sub-scan**: its objective value (e.g. the number of new Si found,
:class:`~stemagent.policies.survey_config.SurveyObjectiveConfig`) trains a BoTorch surrogate
(:mod:`.survey_model`) over ``(x, y, features)`` or, as a deep-kernel GP, over ``(x, y, patch)``.
The next sub-scan maximises an acquisition (UCB or qLogNEI, :mod:`.survey_acquisition`) over
the candidates, with pending sub-scans as ``X_pending`` and an optional proximal travel cost.
Hyperparameters are refitted every ``refit_every`` sub-scans, warm-started; in between only the
data change.

A visited candidate stays in the set but is worth ``revisit_gain_fraction`` of its model value
per earlier visit (what one scan misses), so a revisit happens only when the model asks for it.
The policy stops (a :class:`~stemagent.types.Blank` decision whose ``details["stop"]`` is true, and
a non-empty :attr:`SurveyPolicy.stop_reason`, on which the agent ends the run) when no candidate's
optimistic expected gain reaches ``min_expected_gain`` (``stop_rule="gain"``) or the model's
estimate of the objective still unfound falls below ``stop_remaining_share`` of all it expects
(``stop_rule="remaining"``), when the next sub-scan would overrun its
own dose budget (electrons over the allowed area, overview included), when no candidate is left
under the local dose budget (the safety gate's, passed in), or after ``max_subscans``. The safety
gate still checks every command.

Pure: no driver, no I/O, no wall-clock in the decision; the same seed and the same observations
give the same decisions (``details`` carries the candidates, the acquisition values, the chosen
index and a model summary, so a replay can compare them). Timings are kept apart, in
:attr:`SurveyPolicy.last_timing_s`. Numerical trouble in the surrogate never raises: a failed
refit keeps the last good hyperparameters, a failed model falls back to a space-filling choice.
While deciding, torch runs on ``num_threads`` CPU threads (restored afterwards).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from linear_operator.utils.errors import NotPSDError

from stemagent.errors import InputError
from stemagent.policies.survey_acquisition import build_acquisition, candidate_moments, evaluate_candidates
from stemagent.policies.survey_config import SurveyPolicyConfig
from stemagent.policies.survey_dose import LocalDoseLedger
from stemagent.policies.survey_features import (
    OverviewFeatures,
    candidate_grid,
    features_from_atoms,
    features_from_image,
    peak_candidates,
)
from stemagent.policies.survey_model import DeepKernelSurrogate, GPSurrogate
from stemagent.stages import Observation
from stemagent.types import Blank, Decision, ScanGeometry, ScanRegion, dose_e_per_A2


@dataclass(frozen=True)
class SubscanRecord:
    """One sub-scan the policy has seen: candidate index (None when it matched none), centre,
    objective value (None when it could not be read), new target atoms, frame index."""

    candidate: int | None
    center_A: tuple[float, float]
    value: float | None
    new_atoms: int
    frame_index: int


class SurveyPolicy:
    """See the module docstring. ``decide(observation) -> Decision``; the helpers
    :meth:`check_target` and :meth:`add_pending` say why a target is refused."""

    name = "survey"

    def __init__(
        self,
        config: SurveyPolicyConfig,
        *,
        area_center_A: tuple[float, float],
        area_half_width_A: float,
        beam_current_pA: float,
        local_dose_budget_e_per_A2: float = math.inf,
        probe_fwhm_A: float = 0.8,
        dose_cell_A: float = 1.0,
        flyback_blanked: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = config
        self.area_center_A = (float(area_center_A[0]), float(area_center_A[1]))
        self.area_half_width_A = float(area_half_width_A)
        if not (math.isfinite(beam_current_pA) and beam_current_pA > 0):
            raise InputError("beam_current_pA", beam_current_pA, "must be a positive current in pA")
        self.beam_current_pA = float(beam_current_pA)
        self.local_dose_budget_e_per_A2 = float(local_dose_budget_e_per_A2)
        self.seed = int(seed)
        if device == "auto" or config.device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif config.device == "cuda":
            device = "cuda"
        self.device = torch.device(device)
        self.grid_A = candidate_grid(self.area_center_A, self.area_half_width_A, config.subscan_fov_A, config.overlap)
        self.pitch_A = config.subscan_fov_A * (1.0 - config.overlap)
        self.subscan_dose_e_per_A2 = dose_e_per_A2(self.beam_current_pA, config.subscan_dwell_s, (config.subscan_fov_A / config.subscan_shape_px) ** 2)
        self.subscan_electrons = self.subscan_dose_e_per_A2 * config.subscan_fov_A**2
        area_A2 = (2.0 * self.area_half_width_A) ** 2
        b = config.dose_budget_field_e_per_A2
        self.budget_electrons = math.inf if b is None else b * area_A2
        # local dose on the gate's own model; it outlives reset(): dose delivered stays delivered
        self.ledger = LocalDoseLedger(self.area_center_A, self.area_half_width_A, self.local_dose_budget_e_per_A2,
                                      self.beam_current_pA, probe_fwhm_A, dose_cell_A, flyback_blanked)
        self.reset()

    # --- state ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything (a new overview starts a new survey)."""
        self.features: OverviewFeatures | None = None
        self.overview: ScanGeometry | None = None
        self.candidates_A = self.grid_A.copy()
        self._X_all: torch.Tensor | None = None
        self.surrogate: GPSurrogate | DeepKernelSurrogate | None = None
        self.records: list[SubscanRecord] = []
        self.value_of: dict[int, float] = {}  # candidate -> objective summed over its visits
        self.visits = np.zeros(len(self.candidates_A), dtype=np.int64)
        self.refused = np.zeros(len(self.candidates_A), dtype=bool)
        self.ledger.set_candidates([self.subscan_geometry(c) for c in self.candidates_A])
        self.electrons_used = 0.0
        self.found_A = np.zeros((0, 2))
        self.pending: list[int] = []
        self.stopped: str | None = None
        self._seen_frames: set[int] = set()
        self._n_at_fit = 0
        self._n_decisions = 0
        self._last_target: tuple[float, float] | None = None
        self._beam_A = np.asarray(self.area_center_A, dtype=np.float64)
        self.last_timing_s: dict[str, float] = {}

    @property
    def stop_reason(self) -> str:
        """Non-empty once the survey has finished: why (the agent ends the run on it)."""
        return self.stopped or ""

    @property
    def n_subscans(self) -> int:
        return len(self.records)

    def subscan_geometry(self, center_A: tuple[float, float]) -> ScanGeometry:
        c = self.config
        return ScanGeometry(
            center_A=(float(center_A[0]), float(center_A[1])),
            fov_A=(c.subscan_fov_A, c.subscan_fov_A),
            shape_px=(c.subscan_shape_px, c.subscan_shape_px),
            dwell_s=c.subscan_dwell_s,
        )

    # --- dose -------------------------------------------------------------------------------
    def _account(self, geometry: ScanGeometry) -> None:
        px, py = geometry.pixel_size_A
        dose = dose_e_per_A2(self.beam_current_pA, geometry.dwell_s, px * py)
        self.electrons_used += dose * geometry.fov_A[0] * geometry.fov_A[1]
        self.ledger.add(geometry)

    # --- targets and pending points ------------------------------------------------------------
    def check_target(self, center_A: tuple[float, float]) -> str | None:
        """Why a sub-scan centred at ``center_A`` (x, y) Å may not be commanded now, or None."""
        try:
            x, y = float(center_A[0]), float(center_A[1])
        except (TypeError, ValueError, IndexError):
            return f"target_A={center_A!r}: must be two coordinates in Å"
        if not (math.isfinite(x) and math.isfinite(y)):
            return f"target_A=({x}, {y}): must be finite"
        lim = self.area_half_width_A - self.config.subscan_fov_A / 2.0
        cx, cy = self.area_center_A
        if abs(x - cx) > lim + 1e-9 or abs(y - cy) > lim + 1e-9:
            return (f"target_A=({x:.2f}, {y:.2f}) Å: a {self.config.subscan_fov_A} Å sub-scan centred there leaves the "
                    f"allowed area (centres must lie within ±{lim:.2f} Å of ({cx:.2f}, {cy:.2f}))")
        for k in self.pending:
            p = self.candidates_A[k]
            if max(abs(x - p[0]), abs(y - p[1])) < self.config.subscan_fov_A / 2.0:
                return f"target_A=({x:.2f}, {y:.2f}) Å: occupied by the pending sub-scan at ({p[0]:.2f}, {p[1]:.2f}) Å (candidate {k}), still in flight"
        peak = self.ledger.peak_with(self.subscan_geometry((x, y)))
        if peak > self.local_dose_budget_e_per_A2:
            return (f"target_A=({x:.2f}, {y:.2f}) Å: the local dose would reach "
                    f"{peak:.4g} e/Å² > budget {self.local_dose_budget_e_per_A2:.4g} e/Å²")
        return None

    def add_pending(self, center_A: tuple[float, float]) -> int:
        """Mark a sub-scan at ``center_A`` as in flight (it becomes an ``X_pending`` point); returns its
        candidate index. Raises :class:`InputError` (field ``pending_A``) when :meth:`check_target` refuses."""
        reason = self.check_target(center_A)
        if reason is not None:
            raise InputError("pending_A", tuple(center_A), reason)
        k = self._nearest_candidate(np.asarray(center_A, dtype=np.float64))
        if k is None:
            raise InputError("pending_A", tuple(center_A), f"matches no candidate within {self.pitch_A / 2:.2f} Å")
        self.pending.append(k)
        return k

    def _nearest_candidate(self, xy: np.ndarray) -> int | None:
        d = np.max(np.abs(self.candidates_A - xy.reshape(1, 2)), axis=1)
        k = int(np.argmin(d))
        return k if d[k] <= self.pitch_A / 2.0 + 1e-9 else None

    # --- observations ---------------------------------------------------------------------------
    def _is_overview(self, g: ScanGeometry) -> bool:
        return self.features is None or max(g.fov_A) >= self.config.overview_min_fov_ratio * self.config.subscan_fov_A

    def _ingest_overview(self, obs: Observation) -> None:
        self.reset()
        c = self.config
        g = obs.geometry
        self.overview = g
        image = obs.features.get("image")
        use_image = image is not None and np.ndim(image) == 2 and tuple(np.shape(image)) == tuple(g.shape_px)
        cand = self.grid_A
        if use_image:
            feats = features_from_image(np.asarray(image), g, cand, c.subscan_fov_A, spot_sigma_A=c.spot_sigma_A,
                                        spot_threshold=c.spot_threshold, patch_px=c.patch_px)
        else:
            feats = features_from_atoms(obs.atoms, cand, c.subscan_fov_A, self._target_classes(), patch_px=c.patch_px)
        if c.candidates == "grid+peaks" and len(feats.spots_A):
            cand = peak_candidates(feats.spots_A, self.grid_A, c.subscan_fov_A, self.area_center_A, self.area_half_width_A)
            if len(cand) > len(self.grid_A):
                feats = (features_from_image(np.asarray(image), g, cand, c.subscan_fov_A, spot_sigma_A=c.spot_sigma_A,
                                             spot_threshold=c.spot_threshold, patch_px=c.patch_px)
                         if use_image else features_from_atoms(obs.atoms, cand, c.subscan_fov_A, self._target_classes(), patch_px=c.patch_px))
        # candidates the overview does not cover carry no information: give them the covered median
        covered = g.contains(cand)
        values = feats.values.copy()
        patches = feats.patches.copy()
        if covered.any() and not covered.all():
            values[~covered] = np.median(values[covered], axis=0)
            patches[~covered] = np.median(patches[covered], axis=0)
        self.features = OverviewFeatures(cand, values, feats.names, patches, feats.spots_A, feats.source)
        self.candidates_A = cand
        n = len(cand)
        self.visits = np.zeros(n, dtype=np.int64)
        self.refused = np.zeros(n, dtype=bool)
        self.ledger.set_candidates([self.subscan_geometry(c) for c in cand])
        inputs = np.concatenate([cand, values if c.model == "gp" else patches], axis=1)
        self._X_all = torch.as_tensor(inputs, dtype=torch.float64, device=self.device)
        max_ls = c.position_lengthscale_max  # the unit cube spans the candidates
        if c.model == "gp":
            self.surrogate = GPSurrogate(self._X_all, c.fit_maxiter, max_position_lengthscale_unit=max_ls)
        else:
            self.surrogate = DeepKernelSurrogate(self._X_all, c.fit_maxiter, n_plain=2, embedding_dims=c.embedding_dims,
                                                 seed=self.seed, max_position_lengthscale_unit=max_ls)
        self._account(g)
        self._beam_A = np.asarray(g.center_A, dtype=np.float64)

    def _target_classes(self) -> tuple[str, ...]:
        return tuple(self.config.objective.classes)

    def _objective(self, obs: Observation) -> tuple[float | None, np.ndarray]:
        """The sub-scan's objective value and the positions ``(k, 2)`` of its new target atoms."""
        o = self.config.objective
        atoms = obs.atoms
        if o.kind == "feature_scalar":
            v = obs.features.get(o.feature)
            try:
                value = float(np.asarray(v, dtype=np.float64).reshape(-1)[0]) if v is not None else None
            except (TypeError, ValueError, IndexError):
                value = None
            return (value if value is not None and math.isfinite(value) else None), np.zeros((0, 2))
        keep = atoms.confidence >= o.min_confidence
        if o.kind == "class_count":
            idx = [atoms.class_names.index(c) for c in o.classes if c in atoms.class_names]
            keep &= np.isin(atoms.classes, idx)
        else:
            labels = obs.features.get(o.feature)
            if labels is None or np.shape(labels) != (len(atoms),):
                return None, np.zeros((0, 2))
            keep &= np.asarray(labels) == o.motif
        pos = atoms.positions_A[keep]
        if len(pos) and len(self.found_A):
            d = np.min(np.linalg.norm(pos[:, None, :] - self.found_A[None, :, :], axis=2), axis=1)
            pos = pos[d > o.match_radius_A]
        # one atom per cluster of detections closer than the match radius within this frame too
        new: list[np.ndarray] = []
        for p in pos:
            if not new or np.min(np.linalg.norm(np.asarray(new) - p, axis=1)) > o.match_radius_A:
                new.append(p)
        new_pos = np.asarray(new).reshape(-1, 2)
        return float(len(new_pos)), new_pos

    def _ingest_subscan(self, obs: Observation) -> None:
        g = obs.geometry
        centre = np.asarray(g.center_A, dtype=np.float64)
        k: int | None = None
        for j in self.pending:
            if np.max(np.abs(self.candidates_A[j] - centre)) <= self.pitch_A / 2.0 + 1e-9:
                k = j
                break
        if k is not None:
            self.pending.remove(k)
        else:
            k = self._nearest_candidate(centre)
        value, new_pos = self._objective(obs)
        if len(new_pos):
            self.found_A = np.concatenate([self.found_A, new_pos])
        self._account(g)
        self._beam_A = centre
        if k is not None:
            self.visits[k] += 1
            if value is not None:
                self.value_of[k] = self.value_of.get(k, 0.0) + value
        self.records.append(SubscanRecord(k, (float(centre[0]), float(centre[1])), value, len(new_pos), obs.frame_index))

    # --- deciding -------------------------------------------------------------------------------
    def decide(self, observation: Observation) -> Decision:
        n = self.config.num_threads
        if n is None or self.device.type != "cpu":
            return self._decide(observation)
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return self._decide(observation)
        finally:
            torch.set_num_threads(before)

    def _decide(self, observation: Observation) -> Decision:
        t0 = time.perf_counter()
        self.last_timing_s = {}
        obs = observation
        if obs.features.get("refused") is not None and obs.frame_index in self._seen_frames:
            if self.pending:  # the last command was refused by the safety gate: never ask for it again
                self.refused[self.pending.pop()] = True
        elif obs.frame_index not in self._seen_frames:
            if self._is_overview(obs.geometry):
                self._ingest_overview(obs)  # resets the survey
            else:
                self._ingest_subscan(obs)
            self._seen_frames.add(obs.frame_index)
        self.last_timing_s["ingest"] = time.perf_counter() - t0
        self._n_decisions += 1
        target_note: str | None = None
        target = obs.features.get("target_A")
        if target is not None:
            xy = np.asarray(target, dtype=np.float64).reshape(-1)
            t = (float(xy[0]), float(xy[1])) if xy.size == 2 else (math.nan, math.nan)
            if t != self._last_target:
                self._last_target = t  # an operator target is honoured once
                target_note = self.check_target(t) if xy.size == 2 else f"target_A={xy.tolist()}: must be two coordinates in Å"
                if target_note is None:
                    return self._target_decision(t)
        decision = self._choose(target_note)
        self.last_timing_s["total"] = time.perf_counter() - t0
        return decision

    def _allowed(self) -> np.ndarray:
        ok = ~self.refused
        ok[self.pending] = False
        ok &= self.ledger.candidates_fit()
        return ok

    def _choose(self, target_note: str | None) -> Decision:
        c = self.config
        if self.stopped is not None:
            return self._stop_decision(self.stopped, target_note)
        if self.electrons_used + self.subscan_electrons > self.budget_electrons:
            return self._stop_decision(
                f"dose budget: another sub-scan would bring the survey to {self.electrons_used + self.subscan_electrons:.4g} e "
                f"> budget {self.budget_electrons:.4g} e", target_note)
        if c.max_subscans is not None and self.n_subscans + len(self.pending) >= c.max_subscans:
            return self._stop_decision(f"reached max_subscans={c.max_subscans}", target_note)
        allowed = self._allowed()
        if not allowed.any():
            return self._stop_decision("no candidate left under the local dose budget (or all refused or pending)", target_note)
        observed = sorted(self.value_of)
        if len(observed) < c.n_initial:
            return self._initial_decision(allowed, observed, target_note)
        return self._model_decision(allowed, observed, target_note)

    def _initial_decision(self, allowed: np.ndarray, observed: list[int], note: str | None) -> Decision:
        """Before the model: best overview score first, then the candidate farthest (in the model's
        unit-cube inputs) from everything observed or pending."""
        assert self._X_all is not None and self.features is not None
        X = self._X_all.cpu().numpy()
        lo, hi = X.min(axis=0), X.max(axis=0)
        U = (X - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0)
        taken = observed + self.pending
        if not taken:
            score = self.features.values[:, 0]
            why = f"initial design: best overview {self.features.names[0]}"
        else:
            score = np.min(np.linalg.norm(U[:, None, :] - U[taken][None, :, :], axis=2), axis=1)
            why = "initial design: farthest from what was seen"
        score = np.where(allowed, score, -np.inf)
        k = int(np.argmax(score))
        return self._scan_decision(k, why, phase="initial", acquisition=None, gain=None, model=None, note=note)

    def _model_decision(self, allowed: np.ndarray, observed: list[int], note: str | None) -> Decision:
        try:
            return self._model_decision_or_raise(allowed, observed, note)
        except (NotPSDError, RuntimeError, ValueError) as exc:  # numerical trouble: never take the loop down
            d = self._initial_decision(allowed, observed, note)
            why = f"surrogate failed ({type(exc).__name__}: {str(exc)[:100]}); space-filling choice"
            return Decision(command=d.command, policy=d.policy, reason=d.reason.split(": ", 1)[0] + ": " + why,
                            scores=d.scores, details={**(d.details or {}), "phase": "fallback", "error": why})

    def _model_decision_or_raise(self, allowed: np.ndarray, observed: list[int], note: str | None) -> Decision:
        c = self.config
        assert self._X_all is not None and self.surrogate is not None
        t0 = time.perf_counter()
        idx = torch.as_tensor(observed, dtype=torch.long, device=self.device)
        y = np.asarray([self.value_of[k] for k in observed], dtype=np.float64)
        if c.objective.transform == "log1p":
            y = np.log1p(np.clip(y, 0.0, None))
        X_train = self._X_all[idx]
        Y = torch.as_tensor(y, dtype=torch.float64, device=self.device).reshape(-1, 1)
        n = len(observed)
        refit = self.surrogate.model is None or n - self._n_at_fit >= c.refit_every
        report = self.surrogate.update(X_train, Y, refit)
        if report.refit:
            self._n_at_fit = n
        self.last_timing_s["fit"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        model = self.surrogate.model
        assert model is not None
        moments = candidate_moments(model, self._X_all)  # one posterior call for the gain and a UCB
        mean, sd = moments[0], moments[1].clamp_min(0.0).sqrt()
        X_pending = self._X_all[torch.as_tensor(self.pending, dtype=torch.long, device=self.device)] if self.pending else None
        travel = c.travel_length_A
        acq = build_acquisition(
            c.acquisition, model, X_train, X_pending, ucb_beta=c.ucb_beta, mc_samples=c.mc_samples,
            seed=self.seed + self._n_decisions, beam_xy_A=torch.as_tensor(self._beam_A, dtype=torch.float64, device=self.device),
            travel_length_A=travel, log1p_outcome=c.objective.transform == "log1p",
        )
        log_acq = evaluate_candidates(acq, self._X_all, moments=moments).cpu().numpy().astype(np.float64)
        visited = self.visits > 0
        # each earlier visit leaves only revisit_gain_fraction of what the model expects there
        discount = np.power(c.revisit_gain_fraction, self.visits.astype(np.float64))
        rank = log_acq + self.visits * math.log(max(c.revisit_gain_fraction, 1e-300))
        rank = np.where(allowed, rank, -np.inf)
        k = int(np.argmax(rank))
        # optimistic expected gain in objective units, for the stopping rule
        m, s = mean.cpu().numpy(), sd.cpu().numpy()
        upper = m + c.stop_optimism_sd * s
        gain = np.expm1(upper) if c.objective.transform == "log1p" else upper
        gain = np.clip(gain, 0.0, None) * discount
        self.last_timing_s["acquisition"] = time.perf_counter() - t1
        best_gain = float(np.max(np.where(allowed, gain, -np.inf)))
        unfound, found_total = self._unfound_estimate(m, s, allowed, discount)
        summary = {
            **self.surrogate.summary(),
            "refit": report.refit,
            "refit_failed": report.failed,
            "fit_iterations": report.iterations,
            "mll": None if report.mll is None else round(report.mll, 6),
            "mean_at_chosen": round(float(m[k]), 6),
            "sd_at_chosen": round(float(s[k]), 6),
            "best_observed": float(np.max([self.value_of[j] for j in observed])),
            "unfound_estimate": round(unfound, 6),
            "found_total": round(found_total, 6),
        }
        guard = ""
        share = unfound / (unfound + found_total) if unfound + found_total > 0 else 0.0
        if c.stop_rule == "remaining":
            done = share < c.stop_remaining_share
            why = (f"estimated unfound {unfound:.3g} is {share:.1%} of all expected ({found_total:.3g} found + unfound), "
                   f"below stop_remaining_share={c.stop_remaining_share:.1%}")
        else:
            done = best_gain < c.min_expected_gain
            why = f"expected gain {best_gain:.3g} below min_expected_gain={c.min_expected_gain}"
        if self.n_subscans >= c.min_subscans_before_stop and done:
            coverage = float(np.mean(visited)) if len(visited) else 1.0
            if self._found_anything() or coverage >= c.min_coverage_before_empty_stop:
                self.stopped = f"{why} after {self.n_subscans} sub-scans ({len(self.found_A)} found)"
                return self._stop_decision(self.stopped, note, acquisition=log_acq, gain=gain, model=summary)
            guard = (f"; not stopping ({why}): nothing found yet and {coverage:.0%} of the "
                     f"candidates visited < min_coverage_before_empty_stop={c.min_coverage_before_empty_stop}")
        why = f"{c.acquisition} over {int(allowed.sum())} candidates" + (" (revisit: the model asks for it)" if visited[k] else "") + guard
        return self._scan_decision(k, why, phase="model", acquisition=log_acq, gain=gain, model=summary, note=note)

    def _unfound_estimate(self, m: np.ndarray, s: np.ndarray, allowed: np.ndarray, discount: np.ndarray) -> tuple[float, float]:
        """The model's expected objective still to be found, and the objective found so far (the
        observed values summed). Unfound: the posterior mean of the objective summed over the
        candidates that can still be scanned (and those in flight), each earlier visit leaving
        ``revisit_gain_fraction`` of it; with the ``log1p`` transform the mean of the objective is
        the log-normal one, ``exp(m + s^2 / 2) - 1``, so the model's uncertainty adds to it."""
        if self.config.objective.transform == "log1p":
            per = np.expm1(m + 0.5 * s * s)
        else:
            per = m
        per = np.clip(per, 0.0, None) * discount
        reach = allowed.copy()
        reach[self.pending] = True
        unfound = float(np.sum(per[reach]))
        found = float(sum(max(v, 0.0) for v in self.value_of.values()))
        return unfound, found

    def _found_anything(self) -> bool:
        """Whether any sub-scan so far returned a positive objective value."""
        return bool(len(self.found_A)) or any(v > 0 for v in self.value_of.values())

    # --- decisions ------------------------------------------------------------------------------
    def _details(self, phase: str, chosen: int | None, acquisition: np.ndarray | None, gain: np.ndarray | None,
                 model: dict[str, Any] | None, note: str | None, stop: bool) -> dict[str, Any]:
        def floats(a: np.ndarray, nd: int) -> list[float | None]:
            return [None if not math.isfinite(v) else round(float(v), nd) for v in a]

        d: dict[str, Any] = {
            "phase": phase,
            "stop": stop,
            "chosen": chosen,
            "candidates_A": [[round(float(x), 4), round(float(y), 4)] for x, y in self.candidates_A],
            "acquisition": None if acquisition is None else floats(acquisition, 8),
            "expected_gain": None if gain is None else floats(gain, 6),
            "pending": list(self.pending),
            "visited": [int(v) for v in np.flatnonzero(self.visits)],
            "model": model,
            "features": None if self.features is None else {"source": self.features.source, "names": list(self.features.names)},
            "n_subscans": self.n_subscans,
            "found": int(len(self.found_A)),
            "electrons_used": float(self.electrons_used),
            "electrons_budget": None if math.isinf(self.budget_electrons) else float(self.budget_electrons),
        }
        if note is not None:
            d["target_refused"] = note
        return d

    def _scan_decision(self, k: int, why: str, *, phase: str, acquisition: np.ndarray | None, gain: np.ndarray | None,
                       model: dict[str, Any] | None, note: str | None) -> Decision:
        centre = (float(self.candidates_A[k][0]), float(self.candidates_A[k][1]))
        self.pending.append(k)
        scores = {
            "candidate": float(k),
            "n_subscans": float(self.n_subscans),
            "found": float(len(self.found_A)),
            "electrons_used": float(self.electrons_used),
        }
        if acquisition is not None:
            scores["acquisition"] = float(acquisition[k])
        if gain is not None:
            scores["expected_gain"] = float(gain[k])
        reason = f"sub-scan {self.n_subscans + 1} at candidate {k} ({centre[0]:.1f}, {centre[1]:.1f}) Å: {why}"
        if note is not None:
            reason += f"; operator target refused: {note}"
        return Decision(
            command=ScanRegion(self.subscan_geometry(centre)),
            policy=self.name,
            reason=reason,
            scores=scores,
            details=self._details(phase, k, acquisition, gain, model, note, stop=False),
        )

    def _target_decision(self, t: tuple[float, float]) -> Decision:
        k = self._nearest_candidate(np.asarray(t))
        if k is not None:
            self.pending.append(k)
        return Decision(
            command=ScanRegion(self.subscan_geometry(t)),
            policy=self.name,
            reason=f"operator target ({t[0]:.1f}, {t[1]:.1f}) Å" + (f" (candidate {k})" if k is not None else " (off the candidate grid)"),
            scores={"candidate": float(-1 if k is None else k), "n_subscans": float(self.n_subscans), "found": float(len(self.found_A))},
            details=self._details("target", k, None, None, None, None, stop=False),
        )

    def _stop_decision(self, why: str, note: str | None, *, acquisition: np.ndarray | None = None,
                       gain: np.ndarray | None = None, model: dict[str, Any] | None = None) -> Decision:
        self.stopped = why
        return Decision(
            command=Blank(),
            policy=self.name,
            reason=f"survey done: {why}" + (f"; operator target refused: {note}" if note else ""),
            scores={"n_subscans": float(self.n_subscans), "found": float(len(self.found_A)), "electrons_used": float(self.electrons_used)},
            details=self._details("stop", None, acquisition, gain, model, note, stop=True),
        )
