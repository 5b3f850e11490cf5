"""Core data types on the frame path.

Plain dataclasses holding numpy arrays: cheap to create per frame, no validation beyond
shape checks (pydantic is for configs, wire headers and log documents).

Conventions (see shared/design.md):
- positions are ``(x, y)`` in ångström in the **sample frame**; arrays of positions have
  shape ``(N, 2)``;
- images are indexed ``[row, col]``; row runs along the slow scan axis, col along the fast axis;
- times are seconds on the run's injected monotonic clock.

Documents (wire, run log, configs) are made and read by :mod:`stemagent.codec`, the one codec
of each type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np

from stemagent.dose import ELECTRON_CHARGE_C, dose_e_per_A2  # noqa: F401 - dose lives in stemagent.dose; kept importable here
from stemagent.errors import InputError


@dataclass(frozen=True)
class ScanGeometry:
    """Where and how a raster scan samples the specimen.

    Pixel ``(r, c)`` samples the scan-frame offset
    ``u = (c - (cols - 1) / 2) * pixel_x``, ``v = (r - (rows - 1) / 2) * pixel_y``,
    rotated by ``rotation_rad`` (counter-clockwise) and shifted by ``center_A``.
    The fast axis is ``c``: within a line pixels follow each other every ``dwell_s``;
    each line ends with ``flyback_s`` of blanked return.
    """

    center_A: tuple[float, float] = (0.0, 0.0)
    fov_A: tuple[float, float] = (51.2, 51.2)  # (width along x/fast, height along y/slow)
    shape_px: tuple[int, int] = (512, 512)  # (rows, cols)
    rotation_rad: float = 0.0
    dwell_s: float = 1e-6
    flyback_s: float = 0.0

    def __post_init__(self) -> None:
        rows, cols = self.shape_px
        if int(rows) != rows or int(cols) != cols or rows < 1 or cols < 1:
            raise InputError("shape_px", self.shape_px, "must be two positive integers")
        fx, fy = self.fov_A
        if not (math.isfinite(fx) and math.isfinite(fy) and fx > 0 and fy > 0):
            raise InputError("fov_A", self.fov_A, "must be two positive finite lengths in Å")
        if not (math.isfinite(self.dwell_s) and self.dwell_s > 0):
            raise InputError("dwell_s", self.dwell_s, "must be a positive time in s")
        if not (math.isfinite(self.flyback_s) and self.flyback_s >= 0):
            raise InputError("flyback_s", self.flyback_s, "must be a non-negative time in s")
        if not all(math.isfinite(v) for v in self.center_A):
            raise InputError("center_A", self.center_A, "must be finite")
        if not math.isfinite(self.rotation_rad):
            raise InputError("rotation_rad", self.rotation_rad, "must be finite")

    # --- derived quantities -------------------------------------------------------
    @property
    def pixel_size_A(self) -> tuple[float, float]:
        """(x, y) size of one pixel in Å."""
        rows, cols = self.shape_px
        return (self.fov_A[0] / cols, self.fov_A[1] / rows)

    @property
    def line_time_s(self) -> float:
        return self.shape_px[1] * self.dwell_s + self.flyback_s

    @property
    def frame_time_s(self) -> float:
        return self.shape_px[0] * self.line_time_s

    def line_start_times_s(self, start_s: float) -> np.ndarray:
        """Start time of each scan line, shape ``(rows,)``."""
        return start_s + np.arange(self.shape_px[0], dtype=np.float64) * self.line_time_s

    def pixel_times_s(self, start_s: float) -> np.ndarray:
        """Acquisition time of every pixel, shape ``(rows, cols)``."""
        lines = self.line_start_times_s(start_s)
        return lines[:, None] + np.arange(self.shape_px[1], dtype=np.float64)[None, :] * self.dwell_s

    # --- coordinates --------------------------------------------------------------
    def pixel_to_sample(self, rc: np.ndarray) -> np.ndarray:
        """Map pixel coordinates ``(N, 2)`` as ``(row, col)`` to sample positions ``(N, 2)`` as ``(x, y)`` in Å."""
        rc = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
        rows, cols = self.shape_px
        px, py = self.pixel_size_A
        u = (rc[:, 1] - (cols - 1) / 2.0) * px
        v = (rc[:, 0] - (rows - 1) / 2.0) * py
        c, s = math.cos(self.rotation_rad), math.sin(self.rotation_rad)
        x = self.center_A[0] + c * u - s * v
        y = self.center_A[1] + s * u + c * v
        return np.stack([x, y], axis=1)

    def sample_to_pixel(self, xy: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`pixel_to_sample`: ``(N, 2)`` (x, y) in Å to ``(N, 2)`` (row, col)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        rows, cols = self.shape_px
        px, py = self.pixel_size_A
        dx = xy[:, 0] - self.center_A[0]
        dy = xy[:, 1] - self.center_A[1]
        c, s = math.cos(self.rotation_rad), math.sin(self.rotation_rad)
        u = c * dx + s * dy
        v = -s * dx + c * dy
        col = u / px + (cols - 1) / 2.0
        row = v / py + (rows - 1) / 2.0
        return np.stack([row, col], axis=1)

    def contains(self, xy: np.ndarray, margin_A: float = 0.0) -> np.ndarray:
        """Boolean mask ``(N,)``: which sample positions lie inside the scanned area."""
        rc = self.sample_to_pixel(xy)
        rows, cols = self.shape_px
        px, py = self.pixel_size_A
        mr, mc = margin_A / py, margin_A / px
        return (
            (rc[:, 0] >= -0.5 + mr)
            & (rc[:, 0] <= rows - 0.5 - mr)
            & (rc[:, 1] >= -0.5 + mc)
            & (rc[:, 1] <= cols - 0.5 - mc)
        )


@dataclass
class Frame:
    """One acquired image and everything needed to place it in space and time.

    ``image``: ``(rows, cols)`` float32 detector signal (counts or calibrated units).
    ``line_times_s``: ``(rows,)`` start time of each scan line; pixel ``(r, c)`` was acquired at
    ``line_times_s[r] + c * geometry.dwell_s``.
    ``dose_e_per_A2``: electron dose delivered to the scanned area by this frame.
    """

    image: np.ndarray
    geometry: ScanGeometry
    line_times_s: np.ndarray
    index: int
    dose_e_per_A2: float
    source: str = "unknown"
    detector: str = "HAADF"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows, cols = self.geometry.shape_px
        shape = tuple(getattr(self.image, "shape", ()))
        if shape != (rows, cols):
            raise InputError("image.shape", shape, f"must equal geometry.shape_px {(rows, cols)}")
        lt = np.asarray(self.line_times_s, dtype=np.float64)
        if lt.shape != (rows,):
            raise InputError("line_times_s.shape", lt.shape, f"must be ({rows},), one time per scan line")
        self.line_times_s = lt
        if not math.isfinite(self.dose_e_per_A2) or self.dose_e_per_A2 < 0:
            raise InputError("dose_e_per_A2", self.dose_e_per_A2, "must be a non-negative finite dose")

    @property
    def start_time_s(self) -> float:
        return float(self.line_times_s[0])

    @property
    def end_time_s(self) -> float:
        return float(self.line_times_s[-1] + self.geometry.line_time_s)

    def pixel_times_s(self) -> np.ndarray:
        """``(rows, cols)`` acquisition time of every pixel."""
        cols = self.geometry.shape_px[1]
        return self.line_times_s[:, None] + np.arange(cols)[None, :] * self.geometry.dwell_s

    def time_at_pixel(self, rc: np.ndarray) -> np.ndarray:
        """Acquisition time ``(N,)`` at fractional pixel positions ``(N, 2)`` (row, col)."""
        rc = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
        rows = self.geometry.shape_px[0]
        r = np.clip(np.rint(rc[:, 0]).astype(int), 0, rows - 1)
        return self.line_times_s[r] + rc[:, 1] * self.geometry.dwell_s


@dataclass
class Atoms:
    """Atoms (or atomic columns) found in one frame.

    ``positions_A``: ``(N, 2)`` (x, y) in Å, sample frame. ``classes``: ``(N,)`` int indices into
    ``class_names``. ``confidence``: ``(N,)`` in [0, 1]. ``uncertainty_A``: ``(N,)`` 1-sigma
    position uncertainty in Å, or None. ``times_s``: ``(N,)`` acquisition time of each atom, or None.
    ``evidence_nats``: ``(N,)`` what earned each atom its class: the log-likelihood ratio of its
    class against its sublattice's host class (0 for a host-class atom), or None.
    """

    positions_A: np.ndarray
    classes: np.ndarray
    confidence: np.ndarray
    frame_index: int
    class_names: tuple[str, ...] = ("atom",)
    uncertainty_A: np.ndarray | None = None
    times_s: np.ndarray | None = None
    evidence_nats: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.positions_A = np.asarray(self.positions_A, dtype=np.float64).reshape(-1, 2)
        n = len(self.positions_A)
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        self.confidence = np.asarray(self.confidence, dtype=np.float64).reshape(-1)
        if self.classes.shape != (n,):
            raise InputError("classes.shape", self.classes.shape, f"must be ({n},)")
        if self.confidence.shape != (n,):
            raise InputError("confidence.shape", self.confidence.shape, f"must be ({n},)")
        if n and (self.classes.min() < 0 or self.classes.max() >= len(self.class_names)):
            raise InputError("classes", self.classes.max(), f"must index class_names {self.class_names}")
        if self.uncertainty_A is not None:
            self.uncertainty_A = np.asarray(self.uncertainty_A, dtype=np.float64).reshape(-1)
            if self.uncertainty_A.shape != (n,):
                raise InputError("uncertainty_A.shape", self.uncertainty_A.shape, f"must be ({n},)")
        if self.times_s is not None:
            self.times_s = np.asarray(self.times_s, dtype=np.float64).reshape(-1)
            if self.times_s.shape != (n,):
                raise InputError("times_s.shape", self.times_s.shape, f"must be ({n},)")
        if self.evidence_nats is not None:
            self.evidence_nats = np.asarray(self.evidence_nats, dtype=np.float64).reshape(-1)
            if self.evidence_nats.shape != (n,):
                raise InputError("evidence_nats.shape", self.evidence_nats.shape, f"must be ({n},)")

    def __len__(self) -> int:
        return len(self.positions_A)

    def of_class(self, name: str) -> "Atoms":
        idx = self.class_names.index(name)
        keep = self.classes == idx
        return Atoms(
            positions_A=self.positions_A[keep],
            classes=self.classes[keep],
            confidence=self.confidence[keep],
            frame_index=self.frame_index,
            class_names=self.class_names,
            uncertainty_A=None if self.uncertainty_A is None else self.uncertainty_A[keep],
            times_s=None if self.times_s is None else self.times_s[keep],
            evidence_nats=None if self.evidence_nats is None else self.evidence_nats[keep],
        )


# --- beam commands ----------------------------------------------------------------------


@dataclass(frozen=True)
class ScanRegion:
    """Acquire one raster frame of ``geometry``."""

    geometry: ScanGeometry
    kind: Literal["scan"] = "scan"


@dataclass(frozen=True)
class Park:
    """Hold the beam at ``position_A`` (x, y, sample frame) for ``dwell_s``."""

    position_A: tuple[float, float]
    dwell_s: float
    kind: Literal["park"] = "park"

    def __post_init__(self) -> None:
        if len(self.position_A) != 2 or not all(math.isfinite(float(v)) for v in self.position_A):
            raise InputError("position_A", self.position_A, "must be two finite coordinates in Å")
        if not (math.isfinite(self.dwell_s) and self.dwell_s > 0):
            raise InputError("dwell_s", self.dwell_s, "must be a positive time in s")


@dataclass(frozen=True)
class Blank:
    """Blank the beam."""

    kind: Literal["blank"] = "blank"



BeamCommand = Union[ScanRegion, Park, Blank]


@dataclass(frozen=True)
class Decision:
    """What a policy wants done next and why. Policies return these; only the agent acts on them.

    ``details``: an optional JSON-able mapping a policy may add to make its choice checkable
    (e.g. the survey's candidate set, acquisition values, chosen index and model state); the
    codec (:func:`stemagent.codec.encode_decision`) writes it only when given, so run logs and
    replays carry it. A policy that has finished says so with its ``stop_reason``.
    """

    command: BeamCommand
    policy: str
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] | None = None


@dataclass(frozen=True)
class ParkResult:
    """Signal recorded while the beam was parked.

    ``signal``: ``(T,)`` detector signal sampled every ``sample_interval_s`` from ``start_time_s``.
    A beam-induced event (an atom hopping) shows as a step.
    """

    position_A: tuple[float, float]
    dwell_s: float
    start_time_s: float
    sample_interval_s: float
    signal: np.ndarray
    dose_e_per_A2: float = 0.0


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do; reported by :meth:`Driver.capabilities`."""

    name: str
    max_fov_A: float
    max_shape_px: tuple[int, int]  # (rows, cols)
    min_dwell_s: float
    max_dwell_s: float
    can_park: bool = True
    detectors: tuple[str, ...] = ("HAADF",)
    beam_energy_keV: float = 60.0
    beam_current_pA: float = 20.0
    #: FWHM of the Gaussian with the probe's peak intensity (``stemagent.dose``), if the device knows it
    probe_fwhm_A: float | None = None
    #: longest single park the device allows, s (None: the device sets no limit of its own)
    max_park_s: float | None = None
