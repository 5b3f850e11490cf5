"""The stemagent twin as a scan-data generator of Nion's simulated microscope (nionswift-usim).

usim's scan device asks its generator for the whole image when a frame starts
(``generate_scan_data(instrument, scan_frame_parameters)``) and then reveals it at the pixel
clock, through the same scan hardware source, acquisition tasks and metadata as a real Nion
scan. :class:`TwinScanDataGenerator` answers with a frame of the stemagent twin
(:class:`~stemagent.simulators.twin.TwinDriver`: atoms, probe optics, drift, detector noise,
dose and beam-induced dynamics), so a closed loop through Nion's acquisition path still has
the twin's ground truth.

Where a pixel looks follows usim's own rendering (``nion.usim_device.InstrumentDevice.ScanDataGenerator``):
the scan rectangle is centred on ``center_nm`` (y, x) minus usim's offset (stage position minus
beam shift), with square pixels of ``fov_nm / max(rows, cols)``, rotated by ``rotation_rad`` about
its centre, row 0 at the top. It is written out here from Nion's definitions and deliberately does
not use the backend's conversions (``geometry.py``), so the backend cannot agree with it by
construction.

A parked probe (``probe_state == "parked"``) sits at Nion's normalised ``probe_position`` (y, x)
in the scan context; :meth:`sample_park` runs the twin's park there for the dwell and returns its
ADF signal. While the instrument's blanker (``C_Blank``) is set, frames are dark and deliver no dose.

No Nion import: the generator only reads the objects usim hands it (duck typing), and is
thread-safe (usim calls it from its acquisition thread, the backend from its worker).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

import numpy as np

from stemagent.simulators.render import FrameTruth
from stemagent.simulators.twin import TwinDriver
from stemagent.types import Frame, ParkResult, ScanGeometry


class TwinScanDataGenerator:
    """usim ``ScanDataGeneratorLike`` over a :class:`TwinDriver` (built on a system clock)."""

    def __init__(self, twin: TwinDriver, *, blank_control: str = "C_Blank",
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.twin = twin
        self.blank_control = blank_control
        self._sleep = sleep
        self._lock = threading.RLock()
        self._listener: Any = None
        #: for the k-th frame usim scanned: the twin's frame index (None: the beam was blanked)
        self.frame_indices: list[int | None] = []
        self.last_frame: Frame | None = None

    @property
    def probe_fwhm_A(self) -> float:
        return self.twin.probe_fwhm_A

    @property
    def beam_current_pA(self) -> float:
        return self.twin.beam_current_pA

    @property
    def energy_keV(self) -> float:
        return self.twin.optics.energy_keV

    @property
    def limits(self) -> tuple[float, tuple[int, int], float, float]:
        """The twin's own limits: max field of view (Å), max shape, dwell range (s)."""
        caps = self.twin._caps  # noqa: SLF001 - the twin's capabilities, read synchronously
        return caps.max_fov_A, caps.max_shape_px, caps.min_dwell_s, caps.max_dwell_s

    def attach(self, instrument: Any) -> None:
        """Follow the instrument's blanker, so the twin's beam log and idle dose end when it blanks."""
        event = getattr(instrument, "property_changed_event", None)
        if event is not None:
            self._listener = event.listen(lambda name: self._on_property(instrument, name))

    def detach(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _on_property(self, instrument: Any, name: str) -> None:
        if name == "is_blanked" and self._blanked(instrument):
            with self._lock:
                self.twin.blank_now()

    def _blanked(self, instrument: Any) -> bool:
        ok, value = instrument.TryGetVal(self.blank_control)
        return bool(ok and value)

    @staticmethod
    def offset_A(instrument: Any) -> tuple[float, float]:
        """usim's specimen offset under the scan (stage minus beam shift plus its drift), (x, y) Å."""
        vm = getattr(instrument, "value_manager", None)
        off = getattr(vm, "actual_offset_m", None)
        if off is None:
            return (0.0, 0.0)
        return (float(off.x) * 1e10, float(off.y) * 1e10)

    def geometry_of(self, instrument: Any, p: Any) -> ScanGeometry:
        """The twin's geometry (beam frame, Å) of usim's scan frame parameters ``p``."""
        rows, cols = int(p.size.height), int(p.size.width)
        pixel_A = float(p.fov_nm) * 10.0 / max(rows, cols)
        ox, oy = self.offset_A(instrument)
        center = p.center_nm
        return ScanGeometry(
            center_A=(float(center.x) * 10.0 - ox, float(center.y) * 10.0 - oy),
            fov_A=(cols * pixel_A, rows * pixel_A),
            shape_px=(rows, cols),
            rotation_rad=float(p.rotation_rad),
            dwell_s=float(p.pixel_time_us) * 1e-6,
            flyback_s=0.0,  # usim's pixel clock has no flyback
        )

    # --- usim's ScanDataGeneratorLike ------------------------------------------------------
    def generate_scan_data(self, instrument: Any, scan_frame_parameters: Any) -> np.ndarray:
        geometry = self.geometry_of(instrument, scan_frame_parameters)
        with self._lock:
            if self._blanked(instrument):
                self.twin.blank_now()
                dark = self.twin.detector.sample(np.zeros(geometry.shape_px), self.twin.rng)
                self.frame_indices.append(None)
                return np.asarray(dark, dtype=np.float32)
            frame = self.twin.scan_now(geometry, self.twin.clock.monotonic())
            self.frame_indices.append(frame.index)
            self.last_frame = frame
        return np.asarray(frame.image, dtype=np.float32)

    # --- the parked probe ------------------------------------------------------------------
    def park_position_A(self, instrument: Any) -> tuple[float, float]:
        """Where the parked probe is (beam frame, Å), from Nion's probe position and scan context."""
        pos = instrument.probe_position
        if pos is None or instrument.probe_state != "parked":
            raise RuntimeError(f"the probe is not parked (state {instrument.probe_state!r}, position {pos!r})")
        ctx = instrument.scan_context
        rows, cols = int(ctx.size.height), int(ctx.size.width)
        pixel_A = float(ctx.fov_nm) * 10.0 / max(rows, cols)
        u = (float(pos.x) - 0.5) * cols * pixel_A
        v = (float(pos.y) - 0.5) * rows * pixel_A
        th = float(ctx.rotation_rad or 0.0)
        ox, oy = self.offset_A(instrument)
        cx = float(ctx.center_nm.x) * 10.0 - ox
        cy = float(ctx.center_nm.y) * 10.0 - oy
        return (cx + math.cos(th) * u - math.sin(th) * v, cy + math.sin(th) * u + math.cos(th) * v)

    def sample_park(self, instrument: Any, dwell_s: float) -> ParkResult:
        """Hold the parked probe for ``dwell_s`` (real time) and return the twin's ADF signal."""
        position = self.park_position_A(instrument)
        with self._lock:
            start = self.twin.clock.monotonic()
            if self._blanked(instrument):
                self.twin.blank_now()
                result = ParkResult(position, dwell_s, start, dwell_s, np.zeros(0))
            else:
                result = self.twin.park_now(position, dwell_s, start)
        self._sleep(max(0.0, start + dwell_s - self.twin.clock.monotonic()))
        return result

    # --- ground truth ----------------------------------------------------------------------
    def frame_truth(self, nion_frame: int) -> FrameTruth | None:
        """The twin's truth of the ``nion_frame``-th frame usim scanned (counting from 0)."""
        if not 0 <= nion_frame < len(self.frame_indices):
            return None
        index = self.frame_indices[nion_frame]
        return None if index is None else self.twin.ground_truth.frame_truth(index)
