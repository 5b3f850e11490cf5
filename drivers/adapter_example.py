"""Worked example of a backend adapter: a vendor console API behind the ``Driver`` protocol.

``drivers/ADAPTERS.md`` walks through it. :class:`ToyConsole` stands in for a vendor's Python
API with the habits such APIs have: blocking calls, nanometres and microseconds, a scan that
returns ``(image, start_timestamp)``, a probe positioned in scan-field fractions. The adapter
:class:`ConsoleAdapter` turns it into the async, Å/s, sample-frame ``Driver`` the bridge serves.

Serve it with::

    # bridge.yaml
    adapter: stemagent.drivers.adapter_example:make_driver
    adapter_options: {seed: 1}
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from typing import Any, AsyncIterator, Callable, TypeVar

import numpy as np

from stemagent.driver import DriverFault
from stemagent.errors import InputError
from stemagent.dose import dose_e_per_A2
from stemagent.types import Capabilities, Frame, ParkResult, ScanGeometry

T = TypeVar("T")


class ToyConsole:
    """A pretend vendor API (synchronous, nm and µs, its own clock). Not part of stemagent proper."""

    MAX_FOV_NM = 100.0
    BEAM_CURRENT_PA = 15.0

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.blanked = True
        self.probe_fraction = (0.5, 0.5)
        self.field = {"center_nm": (0.0, 0.0), "fov_nm": 5.0, "rotation_deg": 0.0}

    def set_scan_field(self, center_nm: tuple[float, float], fov_nm: float, rotation_deg: float) -> None:
        if not 0 < fov_nm <= self.MAX_FOV_NM:
            raise RuntimeError(f"ERR 17: field of view {fov_nm} nm out of range")
        self.field = {"center_nm": center_nm, "fov_nm": fov_nm, "rotation_deg": rotation_deg}

    def scan_image(self, width: int, height: int, pixel_time_us: float, flyback_us: float) -> tuple[np.ndarray, float]:
        """Blocks for the scan; returns a uint16 image and the start time (console clock, s)."""
        with self._lock:
            self.blanked = False
            t0 = time.monotonic()
            img = self._rng.poisson(100.0, size=(height, width)).astype(np.uint16)
            return img, t0

    def park_probe(self, fx: float, fy: float, dwell_us: float, samples: int) -> np.ndarray:
        with self._lock:
            self.blanked = False
            self.probe_fraction = (fx, fy)
            return self._rng.poisson(50.0, size=samples).astype(np.float64)

    def blank_beam(self) -> None:
        self.blanked = True


class ConsoleAdapter:
    """``Driver`` over :class:`ToyConsole`: async, Å and s, sample frame, timeouts, DriverFault."""

    name = "toy-console"

    def __init__(self, console: ToyConsole, *, call_timeout_s: float = 30.0, park_samples: int = 100) -> None:
        self.console = console
        self.call_timeout_s = call_timeout_s
        self.park_samples = park_samples
        # one worker: the console API is not thread-safe and the device does one thing at a time
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="console")
        self._index = 0
        self._geometry = ScanGeometry()

    async def _call(self, fn: Callable[..., T], *args: Any, extra_s: float = 0.0) -> T:
        """Run a blocking console call in the worker with a timeout; its errors become DriverFault."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._pool, fn, *args), timeout=self.call_timeout_s + extra_s)
        except TimeoutError:
            raise DriverFault(f"console call {fn.__name__} did not return within {self.call_timeout_s + extra_s:.1f} s") from None
        except RuntimeError as exc:  # the vendor API's error type
            raise DriverFault(f"console refused {fn.__name__}: {exc}") from None

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        await self.blank()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def capabilities(self) -> Capabilities:
        return Capabilities(
            name=self.name,
            max_fov_A=ToyConsole.MAX_FOV_NM * 10.0,  # nm -> Å
            max_shape_px=(4096, 4096),
            min_dwell_s=1e-7,
            max_dwell_s=1e-3,
            beam_current_pA=ToyConsole.BEAM_CURRENT_PA,
        )

    async def acquire(self, geometry: ScanGeometry) -> Frame:
        rows, cols = geometry.shape_px
        if geometry.fov_A[0] != geometry.fov_A[1] or rows != cols:
            raise InputError("geometry.fov_A", geometry.fov_A, "this console scans square fields only")
        cx, cy = geometry.center_A
        await self._call(self.console.set_scan_field, (cx / 10.0, cy / 10.0), geometry.fov_A[0] / 10.0,
                         math.degrees(geometry.rotation_rad))
        image, t0 = await self._call(
            self.console.scan_image, cols, rows, geometry.dwell_s * 1e6, geometry.flyback_s * 1e6,
            extra_s=geometry.frame_time_s,
        )
        self._geometry = geometry
        px, py = geometry.pixel_size_A
        frame = Frame(
            image=image.astype(np.float32),
            geometry=geometry,
            line_times_s=geometry.line_start_times_s(t0),  # the console reports the start; lines follow
            index=self._index,
            dose_e_per_A2=dose_e_per_A2(ToyConsole.BEAM_CURRENT_PA, geometry.dwell_s, px * py),
            source=self.name,
        )
        self._index += 1
        return frame

    async def stream(self, geometry: ScanGeometry, n_frames: int | None = None) -> AsyncIterator[Frame]:
        i = 0
        while n_frames is None or i < n_frames:
            yield await self.acquire(geometry)
            i += 1

    async def park(self, position_A: tuple[float, float], dwell_s: float) -> ParkResult:
        # the console positions the probe in fractions of the last scan field: sample frame -> pixel -> fraction
        g = self._geometry
        row, col = g.sample_to_pixel(np.asarray([position_A]))[0]
        fx, fy = (col + 0.5) / g.shape_px[1], (row + 0.5) / g.shape_px[0]
        if not (0.0 <= fx <= 1.0 and 0.0 <= fy <= 1.0):
            raise InputError("position_A", position_A, "lies outside the last scanned field")
        start = time.monotonic()
        signal = await self._call(self.console.park_probe, fx, fy, dwell_s * 1e6, self.park_samples, extra_s=dwell_s)
        return ParkResult(
            position_A=(float(position_A[0]), float(position_A[1])),
            dwell_s=dwell_s,
            start_time_s=start,
            sample_interval_s=dwell_s / self.park_samples,
            signal=signal,
        )

    async def blank(self) -> None:
        await self._call(self.console.blank_beam)


def make_driver(seed: int = 0, call_timeout_s: float = 30.0) -> ConsoleAdapter:
    """The factory a bridge config names: ``adapter: stemagent.drivers.adapter_example:make_driver``."""
    return ConsoleAdapter(ToyConsole(seed=seed), call_timeout_s=call_timeout_s)
