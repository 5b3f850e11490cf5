"""The bridge's own safety limits and its rate-limited log of rejected messages.

:class:`BridgeLimits` is the ``limits`` section of a bridge config: what the bridge lets reach
the device whatever a client asks (allowed square, field of view, pixels, frame size in memory,
dwell range, frame time, park time), tightened by the device's capabilities at start.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stemagent.limits import InstrumentLimits
from stemagent.types import Capabilities, ScanGeometry


class BridgeLimits(BaseModel):
    """What the bridge lets reach the device, whatever the client asks. The device's capabilities
    tighten these further (the smaller field, the narrower dwell range)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    area_center_A: tuple[float, float] = (0.0, 0.0)
    area_half_width_A: float = Field(500.0, gt=0, description="scans and parks stay inside this square, Å")
    max_fov_A: float = Field(1000.0, gt=0)
    max_shape_px: int = Field(4096, ge=1, le=16384)
    max_frame_mb: float = Field(256.0, gt=0, description="largest frame held in memory (float32), MB")
    min_dwell_s: float = Field(1e-8, gt=0)
    max_dwell_s: float = Field(1e-2, gt=0)
    max_scan_s: float = Field(120.0, gt=0, description="longest single frame (lines x (pixels x dwell + flyback)), s")
    max_park_s: float = Field(10.0, gt=0, description="longest single park, s")
    can_park: bool = Field(True, description="parks allowed at all (the device's capabilities may only turn them off)")

    @model_validator(mode="after")
    def _order(self) -> "BridgeLimits":
        if self.min_dwell_s > self.max_dwell_s:
            raise ValueError(f"min_dwell_s={self.min_dwell_s} exceeds max_dwell_s={self.max_dwell_s}")
        return self

    def tightened(self, caps: Capabilities) -> "BridgeLimits":
        """These limits merged with the device's capabilities, the stricter winning
        (:meth:`stemagent.limits.InstrumentLimits.stricter`, as the agent's gate does)."""
        site = InstrumentLimits.site(max_fov_A=self.max_fov_A, max_shape_px=self.max_shape_px, min_dwell_s=self.min_dwell_s,
                                     max_dwell_s=self.max_dwell_s, max_park_s=self.max_park_s, can_park=self.can_park)
        merged = site.stricter(InstrumentLimits.of_capabilities(caps))
        return self.model_copy(update={
            "max_fov_A": merged.max_fov_A,
            "max_shape_px": min(merged.max_shape_px),
            "min_dwell_s": merged.min_dwell_s,
            "max_dwell_s": merged.max_dwell_s,
            "max_park_s": merged.max_park_s,
            "can_park": merged.can_park,
        })

    def _in_area(self, xy: Any) -> bool:
        return all(abs(float(v) - c) <= self.area_half_width_A + 1e-9 for v, c in zip(xy, self.area_center_A))

    def check_scan(self, g: ScanGeometry) -> str | None:
        """Why ``g`` is refused, or None."""
        rows, cols = g.shape_px
        if max(g.fov_A) > self.max_fov_A:
            return f"fov_A={g.fov_A} exceeds the bridge's max_fov_A={self.max_fov_A}"
        if max(rows, cols) > self.max_shape_px:
            return f"shape_px={g.shape_px} exceeds the bridge's max_shape_px={self.max_shape_px}"
        if rows * cols * 4 / 1e6 > self.max_frame_mb:
            return f"shape_px={g.shape_px} needs {rows * cols * 4 / 1e6:.4g} MB, above max_frame_mb={self.max_frame_mb}"
        if not self.min_dwell_s <= g.dwell_s <= self.max_dwell_s:
            return f"dwell_s={g.dwell_s} outside the bridge's [{self.min_dwell_s}, {self.max_dwell_s}] s"
        if g.frame_time_s > self.max_scan_s:
            return f"the frame takes {g.frame_time_s:.4g} s, above max_scan_s={self.max_scan_s}"
        corners = g.pixel_to_sample(np.array([[-0.5, -0.5], [-0.5, cols - 0.5], [rows - 0.5, -0.5], [rows - 0.5, cols - 0.5]]))
        if not all(self._in_area(c) for c in corners):
            return (f"the field centred at {tuple(round(v, 3) for v in g.center_A)} Å leaves the bridge's area "
                    f"({self.area_half_width_A} Å around {self.area_center_A})")
        return None

    def check_park(self, position_A: Any, dwell_s: float) -> str | None:
        if not self.can_park:
            return "the device cannot park the beam (its capabilities say can_park=false)"
        if not dwell_s <= self.max_park_s:
            return f"dwell_s={dwell_s} exceeds the bridge's max_park_s={self.max_park_s}"
        if not self._in_area(position_A):
            return f"park position {tuple(position_A)} Å is outside the bridge's area ({self.area_half_width_A} Å around {self.area_center_A})"
        return None

    def describe(self) -> str:
        return (f"area ±{self.area_half_width_A} Å around {tuple(self.area_center_A)}, fov ≤ {self.max_fov_A} Å, "
                f"≤ {self.max_shape_px} px ({self.max_frame_mb} MB), dwell {self.min_dwell_s:g}-{self.max_dwell_s:g} s, "
                f"scan ≤ {self.max_scan_s} s, park ≤ {self.max_park_s} s")


class RejectionLog:
    """Rejected messages at WARNING: the first few one by one, then a count every ``every_s``."""

    def __init__(self, logger: logging.Logger, first: int = 10, every_s: float = 10.0) -> None:
        self._log, self._first, self._every_s = logger, first, every_s
        self._n = 0
        self._held = 0
        self._last: str = ""
        self._since = time.monotonic()

    def note(self, what: str) -> None:
        self._n += 1
        if self._n <= self._first:
            self._log.warning("bridge: rejected %s", what)
            if self._n == self._first:
                self._log.warning("bridge: further rejections are counted and logged every %g s", self._every_s)
            return
        self._held += 1
        self._last = what
        self.flush()

    def flush(self) -> None:
        if self._held and time.monotonic() - self._since >= self._every_s:
            self._log.warning("bridge: rejected %d more messages in the last %.0f s (last: %s)", self._held,
                              time.monotonic() - self._since, self._last)
            self._held = 0
            self._since = time.monotonic()
