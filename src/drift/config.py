"""Configuration of the drift stage (:class:`~stemagent.drift.stage.DriftStage`).

A pydantic model with ``extra="forbid"``, like every run configuration: a misspelt key is a
clear error naming the field. Lengths in Å, times in s.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class DriftConfig(BaseModel):
    """How the drift stage tracks atoms, models drift over acquisition time and judges itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="off: positions pass through unchanged and commands are not converted")
    # --- model ---------------------------------------------------------------------------------
    window_frames: int = Field(20, ge=2, le=400, description="frames of displacement history the GP sees (bounded cost)")
    bins_per_frame: int = Field(8, ge=1, le=256, description="time bins per frame: each is one GP observation per axis")
    min_atoms_per_bin: int = Field(3, ge=1, description="bins with fewer matched atoms are left out")
    refit_every_frames: int = Field(10, ge=1, description="hyperparameters are refit this often (warm-started)")
    refit_max_iter: int = Field(40, ge=1, le=1000, description="L-BFGS iterations per start of a hyperparameter refit")
    refit_starts: int = Field(2, ge=1, le=2, description="2: refit from the last fit and from the initial values "
                              "(the better wins); 1: from the last fit only (half the cost)")
    refit_in_update: bool = Field(True, description="refit inside update(); False: update() only sets refit_due and "
                                  "the caller runs DriftStage.refit() when it has time")
    refit_adopt_after_frames: int = Field(2, ge=1, le=10, description="in the agent's pipeline a refit runs in a worker "
                                          "thread and is adopted this many frames after it was submitted (waiting for "
                                          "it then if it is not done): 1 made the next frame wait for a ~0.5 s fit on "
                                          "a 2-core CPU; frames, not seconds, so a replay reproduces the schedule")
    stale_chi2: float = Field(4.0, gt=0, description="refit at once when a new frame's bins score a mean squared "
                              "standardised residual above this under the current fit")
    calibrate_band: bool = Field(True, description="scale the drift's variance by a running estimate of how far each new "
                                 "frame's observations fall from the forecast made before it (see DriftStage.band_inflation)")
    calibration_frames: float = Field(20.0, ge=1, description="memory of that running estimate, frames (exponential)")
    band_inflation_range: tuple[float, float] = Field(
        (1.0, 3.0), description="bounds of the factor on the drift's standard deviation: the GP's own band is never "
        "narrowed, and a factor at the upper bound says the model no longer describes the drift")
    random_walk_A_per_sqrt_s: tuple[float, float] = Field(
        (0.005, 0.1), description="range allowed for the random-walk part of the drift, Å/sqrt(s): a short window "
        "cannot tell a steady drift from a fast random walk, and a random walk forecasts no motion")
    min_slope_A_per_s: float = Field(0.1, gt=0, description="smallest prior scale of the steady drift, Å/s")
    # --- tracking ------------------------------------------------------------------------------
    gate_fraction: float = Field(0.4, gt=0, lt=0.5, description="match gate as a fraction of the nearest-neighbour spacing")
    edge_margin_A: float = Field(1.0, ge=0, description="detections this close to the frame edge are ignored")
    min_atoms: int = Field(10, ge=3, description="fewer matched atoms than this: the frame is reported, not used")
    min_match_fraction: float = Field(0.3, ge=0, le=1, description="fewer of the expected atoms matched: tracking lost")
    slip_A: float = Field(0.3, gt=0, description="a common shift of the atoms against the forecast larger than this "
                          "(and than slip_sigma forecast sigmas) is a jump (stage slip): tracking lost, new reference")
    slip_sigma: float = Field(6.0, gt=0, description="see slip_A")
    reference_dose_ratio: float | None = Field(
        10.0, gt=1, description="a frame with at least this many times the dose per Å² of the reference frame (the "
        "first high-resolution sub-scan after a low-dose overview) becomes the new reference: the overview's atom "
        "positions are several times noisier, and their errors, shared by a sub-scan's region, read as drift. None: off")
    max_missed_frames: int = Field(5, ge=0, description="a track unseen this many frames in a row is dropped")
    outlier_sigma: float = Field(5.0, gt=1, description="matched atoms whose residual exceeds this many robust sigmas are not used")
    # --- judgement and outputs -----------------------------------------------------------------
    band_limit_A: float = Field(0.2, gt=0, description="95% half-width of the forecast above which the estimate is unreliable")
    positions: Literal["refined", "measured"] = Field(
        "refined", description="'refined': each tracked atom's position averaged over its sightings; 'measured': this frame's only"
    )
    area_margin_A: float = Field(2.0, ge=0, description="raster and random policies, which plan in the sample frame, keep their "
                                 "fields this far inside the allowed area, so the drift-converted command stays inside it")
    resample_frame: bool = Field(False, description="also produce the drift-corrected (resampled) image of each frame")
    device: Literal["cpu", "auto", "cuda"] = Field("cpu", description="torch device of the GP ('auto': CUDA when available)")
    gp_threads: int | None = Field(1, ge=1, description="torch CPU threads while the GP computes (None: leave torch's setting)")

    @field_validator("band_inflation_range")
    @classmethod
    def _check_inflation_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"band_inflation_range={list(value)}: needs 0 < low <= high")
        return value
