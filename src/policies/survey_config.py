"""Configuration of the survey policy (``policy.kind: survey``), a pydantic model.

Kept beside the policy so :mod:`stemagent.config` only lists it in the policy union. Units are
in the names: lengths Å, times s, doses e/Å².
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class _Model(BaseModel):
    # no NaN or infinity: every setting is a finite number (as in stemagent.config)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SurveyObjectiveConfig(_Model):
    """What a sub-scan is worth: the number the surrogate learns to predict.

    - ``class_count``: atoms of ``classes`` (segmenter class names, e.g. ``["Si"]``) found in
      the sub-scan that were not found before (within ``match_radius_A``);
    - ``motif_count``: atoms whose per-atom label ``observation.features[feature]`` equals
      ``motif`` (e.g. from an encoding stage), new ones only, as above;
    - ``feature_scalar``: the scalar ``observation.features[feature]`` of the sub-scan (any
      number a stage computes; larger is better).
    """

    kind: Literal["class_count", "motif_count", "feature_scalar"] = "class_count"
    classes: tuple[str, ...] = Field(("Si",), min_length=1, description="class_count: the segmenter classes that count")
    feature: str = Field("motif", min_length=1, description="motif_count / feature_scalar: the observation feature to read")
    motif: int = Field(1, description="motif_count: the label of interest")
    min_confidence: float = Field(0.0, ge=0.0, le=1.0, description="atoms below this confidence do not count")
    match_radius_A: float = Field(1.0, gt=0.0, le=10.0, description="an atom this close to one already found is not new, Å")
    transform: Literal["log1p", "none"] = Field("log1p", description="the surrogate models log(1 + value) or the value itself")


class SurveyPolicyConfig(_Model):
    """Bayesian-optimisation survey: one overview (the run's ``scan`` section), then sub-scans
    where the surrogate expects the most of the objective, until the expected gain or the dose
    budget runs out."""

    kind: Literal["survey"] = "survey"
    # sub-scans and candidates
    subscan_fov_A: float = Field(25.6, gt=1.0, description="side of a high-resolution sub-scan, Å")
    subscan_shape_px: int = Field(128, ge=8, le=8192, description="pixels per side of a sub-scan")
    subscan_dwell_s: float = Field(2e-5, gt=0, le=1.0, description="sub-scan pixel dwell, s")
    candidates: Literal["grid", "grid+peaks"] = Field("grid", description="sub-scan centres: a grid over the allowed area, or the grid plus one per cluster of overview spots")
    overlap: float = Field(0.02, ge=0.0, lt=0.5, description="fractional overlap of neighbouring grid sub-scans")
    overview_min_fov_ratio: float = Field(2.0, gt=1.0, description="a frame this many sub-scan fields wide is taken as a (new) overview")
    spot_sigma_A: float = Field(0.6, gt=0.05, le=5.0, description="overview spot filter width (about the probe's), Å")
    spot_threshold: float = Field(4.0, gt=0.0, le=50.0, description="overview spots: matched-filter peaks above this many robust sd")
    # objective
    objective: SurveyObjectiveConfig = Field(default_factory=SurveyObjectiveConfig)
    # surrogate
    model: Literal["gp", "deep_kernel"] = Field("gp", description="GP on position + overview features, or a deep-kernel GP on position + overview patches")
    patch_px: int = Field(8, ge=2, le=32, description="deep kernel: overview patch side, pixels after binning")
    embedding_dims: int = Field(2, ge=1, le=8, description="deep kernel: learned patch embedding size")
    position_lengthscale_max: float = Field(0.25, gt=0.0, le=1.0, description="longest lengthscale of the kernel's position part, as a fraction of the candidate field's side (keeps it local)")
    refit_every: int = Field(4, ge=1, le=1000, description="refit hyperparameters after this many new sub-scans (warm-started); in between only the data change")
    fit_maxiter: int = Field(60, ge=1, le=10000, description="L-BFGS iterations per refit")
    n_initial: int = Field(3, ge=1, le=100, description="sub-scans chosen before the surrogate is used (best overview score, then space-filling)")
    # acquisition
    acquisition: Literal["ucb", "qlognei"] = Field("ucb", description="upper confidence bound, or BoTorch's qLogNoisyExpectedImprovement")
    ucb_beta: float = Field(1.0, gt=0.0, le=100.0, description="UCB: mean + sqrt(beta) * sd")
    mc_samples: int = Field(128, ge=8, le=4096, description="quasi-MC samples for q-acquisitions (pending points, qLogNEI)")
    travel_length_A: float | None = Field(None, gt=0.0, description="proximal travel cost: acquisition weighted by exp(-d^2 / 2 L^2) from the beam; None = no travel cost")
    revisit_gain_fraction: float = Field(0.02, ge=0.0, le=1.0, description="each earlier visit leaves this share of what the model expects at a candidate (what one sub-scan misses: the segmenter's miss rate)")
    # stopping and dose
    stop_rule: Literal["remaining", "gain"] = Field("gain", description="'remaining': stop when the model's estimate of what is still unfound (the expected objective summed over the candidates not yet scanned) falls below stop_remaining_share of all it expects (found + unfound); 'gain': stop when no single candidate's optimistic expected gain reaches min_expected_gain")
    stop_remaining_share: float = Field(0.03, ge=0.0, lt=1.0, description="stop_rule='remaining': stop when the estimated unfound share of the objective falls below this (0 never stops on it)")
    min_expected_gain: float = Field(0.5, ge=0.0, description="stop_rule='gain': stop when no candidate's optimistic expected gain (objective units, e.g. new dopants per sub-scan) reaches this")
    stop_optimism_sd: float = Field(2.0, ge=0.0, le=10.0, description="stop_rule='gain': the expected gain tested for stopping is at mean + this many sd")
    min_subscans_before_stop: int = Field(8, ge=0, description="never stop on expected gain before this many sub-scans")
    min_coverage_before_empty_stop: float = Field(0.25, ge=0.0, le=1.0, description="while no sub-scan has returned a positive objective value, never stop on expected gain before this share of the candidate sub-scans has been visited (a dim overview can point at nothing; 0 turns the guard off; the dose budgets still stop the survey)")
    dose_budget_field_e_per_A2: float | None = Field(None, gt=0.0, description="budget of electrons (overview included) over the allowed area's size, e/Å²; None = no budget of the policy's own")
    max_subscans: int | None = Field(None, ge=1, description="stop after this many sub-scans")
    # compute
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="torch device of the surrogate ('auto': CUDA when available); a few hundred candidates run fastest on the CPU")
    num_threads: int | None = Field(1, ge=1, le=256, description="torch CPU threads while deciding (restored after); the GP's small matrices gain nothing from more, and on a busy CPU extra threads cost several times over; None leaves torch's setting")

    @field_validator("min_subscans_before_stop")
    @classmethod
    def _not_before_the_model(cls, v: int, info: ValidationInfo) -> int:
        n_initial = info.data.get("n_initial")
        if n_initial is not None and v < n_initial:
            raise ValueError(f"must be at least n_initial={n_initial} (the survey never stops before its model is used)")
        return v
