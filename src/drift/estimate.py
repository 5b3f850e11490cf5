"""What the drift stage returns per frame (:class:`DriftEstimate`) and says about itself (:class:`DriftCheck`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from stemagent.types import Atoms

#: ``disabled``: the stage is off, positions pass through; ``reference``: this frame became the
#: reference lattice (the first frame, or after tracking was lost); ``tracking``: matched and
#: used; ``too_few_atoms``: the frame had too few usable atoms and was not used; ``new_field``:
#: the frame shows an area the tracks do not reach (its atoms become new tracks placed with the
#: forecast; no drift is measured on it); ``lost``: the atoms could not be matched to the
#: reference (this frame becomes the new reference).
Status = Literal["disabled", "reference", "tracking", "too_few_atoms", "new_field", "lost"]


@dataclass
class DriftEstimate:
    """The drift stage's result for one frame.

    Positions are in the stage's **sample frame**: the beam (scan) frame of the reference
    lattice, fixed to the specimen. A beam position ``b`` at time ``t`` sees the sample point
    ``b - d(t)``; ``d`` is the drift estimate.

    - ``atoms``: the frame's atoms in the sample frame (refined or measured positions, as
      configured); classes, confidences and times as found; ``uncertainty_A`` combines the
      position and the drift uncertainties.
    - ``measured_positions_A`` ``(N, 2)``: each detection minus the drift at its own pixel time.
    - ``refined_positions_A`` ``(N, 2)``: for a tracked atom, its position averaged over all its
      sightings (the reference lattice); for others, the measured position.
    - ``track_ids`` ``(N,)``: the track of each atom (``-1``: not tracked, e.g. at the frame edge).
    - ``times_s`` ``(G,)``, ``displacement_A`` ``(G, 2)``, ``std_A`` ``(G, 2)``: the drift
      estimate and its 1-sigma band on a grid over the frame's acquisition time (logged).
    - counts: detections, matched, new tracks, tracks dropped, outliers left out, live tracks.
    - ``spacing_A``: nearest-neighbour spacing of the lattice; ``shift_A``: common residual shift
      taken out before matching (large: the forecast was off).
    - ``refit``: hyperparameters refitted on this frame; ``refit_due``: a refit is due and waits
      for :meth:`DriftStage.refit` (with ``refit_in_update=False``); ``score``: mean squared standardised
      residual of this frame's observations under the previous fit (about 1 when it holds).
    - ``band_inflation``: the factors (x, y) on the GP's standard deviation in ``std_A`` (and in the
      forecasts), from the stage's running check of its forecasts against the frames that followed.
    - ``update_ms``: the whole update; ``fit_ms``: of which the hyperparameter refit.
    """

    frame_index: int
    status: Status
    reason: str
    atoms: Atoms
    measured_positions_A: np.ndarray
    refined_positions_A: np.ndarray
    track_ids: np.ndarray
    times_s: np.ndarray
    displacement_A: np.ndarray
    std_A: np.ndarray
    reference_id: int = 0
    n_detected: int = 0
    n_matched: int = 0
    n_new: int = 0
    n_dropped: int = 0
    n_outliers: int = 0
    n_tracks: int = 0
    spacing_A: float = float("nan")
    shift_A: tuple[float, float] = (0.0, 0.0)
    refit: bool = False
    refit_due: bool = False
    score: float = float("nan")
    band_inflation: tuple[float, float] = (1.0, 1.0)
    update_ms: float = 0.0
    fit_ms: float = 0.0
    hyperparameters: dict[str, list[float]] = field(default_factory=dict)
    corrected_image: np.ndarray | None = None

    @property
    def used(self) -> bool:
        """Whether this frame informed the drift model."""
        return self.status in ("reference", "tracking")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for the run log (no per-atom arrays: those go with the atoms)."""

        def fl(x: float) -> float | None:
            return float(x) if np.isfinite(x) else None

        return {
            "frame_index": int(self.frame_index),
            "status": self.status,
            "reason": self.reason,
            "reference_id": int(self.reference_id),
            "times_s": [float(v) for v in self.times_s],
            "displacement_A": [[float(a), float(b)] for a, b in self.displacement_A],
            "std_A": [[float(a), float(b)] for a, b in self.std_A],
            "band95_A": float(1.959963984540054 * np.max(self.std_A)) if len(self.std_A) else None,
            "n_detected": int(self.n_detected),
            "n_matched": int(self.n_matched),
            "n_new": int(self.n_new),
            "n_dropped": int(self.n_dropped),
            "n_outliers": int(self.n_outliers),
            "n_tracks": int(self.n_tracks),
            "spacing_A": fl(self.spacing_A),
            "shift_A": [float(v) for v in self.shift_A],
            "refit": bool(self.refit),
            "refit_due": bool(self.refit_due),
            "score": fl(self.score),
            "band_inflation": [float(v) for v in self.band_inflation],
            "update_ms": float(self.update_ms),
            "fit_ms": float(self.fit_ms),
            "hyperparameters": self.hyperparameters,
        }


@dataclass(frozen=True)
class DriftCheck:
    """Whether the drift estimate can be trusted to place the beam at ``time_s``.

    ``band_A``: 95% half-width of the forecast there (the larger axis); ``reason``: why not
    (empty when reliable). An unreliable estimate means: re-acquire a reference frame instead
    of acting.
    """

    reliable: bool
    time_s: float
    band_A: float
    reason: str = ""
