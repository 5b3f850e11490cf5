"""A scripted :class:`~stemagent.driver.Driver` for tests and dry runs: frames, faults, delays, a call log.

:class:`ScriptedDriver` implements the whole protocol with nothing behind it. What it returns
and how it misbehaves is scripted per operation (``connect``, ``close``, ``capabilities``,
``acquire``, ``stream``, ``park``, ``blank``) and per call number (1 = the first call of that
operation):

- **frames**: ``image(geometry, index) -> (rows, cols) array`` (default: seeded Poisson noise
  around ``counts_per_px``); the frame's dose is the areal dose of the scan at
  ``beam_current_pA`` (:mod:`stemagent.dose`), so a safety gate's prediction holds;
- **parks**: ``park_signal(position_A, dwell_s, n_samples) -> (n,) array`` (default: a ramp);
- **faults**: :meth:`fail` makes a call raise (``DriverFault``, ``CommandRefused``, an
  ``InputError``, anything); :meth:`hang` makes it wait until cancelled (a lost device);
- **hooks**: :meth:`on` runs a callable when a call starts (an operator's pause arriving while
  a scan is in flight), before any fault or hang scripted for the same call;
- **delays**: ``delay_s[op]`` seconds on the injected clock before a call answers, and
  ``delay_s["frame"]`` between streamed frames (a :class:`~stemagent.clock.VirtualClock` by
  default, so scripts never wait on wall time; on it a scan or park also takes its own time);
  :meth:`hold` returns an event a call waits for (released by the test);
- **call log**: :attr:`calls` (operation names in order) and :attr:`log` (:class:`Call` with
  arguments and clock time); :attr:`beam_blanked` follows the protocol (beam on from a scan or
  park until ``blank``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import numpy as np

from stemagent import dose as dose_model
from stemagent.clock import Clock, VirtualClock
from stemagent.driver import DriverFault
from stemagent.types import Capabilities, Frame, ParkResult, ScanGeometry

OPS = ("connect", "close", "capabilities", "acquire", "stream", "park", "blank")

ImageFn = Callable[[ScanGeometry, int], np.ndarray]
SignalFn = Callable[[tuple[float, float], float, int], np.ndarray]


@dataclass(frozen=True)
class Call:
    """One call the driver received: the operation, its arguments and the clock's time."""

    op: str
    args: tuple[Any, ...]
    t_s: float
    number: int  # 1 = the first call of this operation


def default_capabilities(name: str = "scripted", beam_current_pA: float = 20.0) -> Capabilities:
    return Capabilities(name=name, max_fov_A=1000.0, max_shape_px=(4096, 4096), min_dwell_s=1e-8, max_dwell_s=1e-2,
                        beam_current_pA=beam_current_pA, probe_fwhm_A=0.8)


class ScriptedDriver:
    """A :class:`~stemagent.driver.Driver` whose every answer and failure is scripted (see the module docstring)."""

    def __init__(
        self,
        *,
        capabilities: Capabilities | None = None,
        image: ImageFn | None = None,
        park_signal: SignalFn | None = None,
        counts_per_px: float = 5.0,
        frame_dose_e_per_A2: float | None = None,
        park_dose_e_per_A2: float | None = None,
        park_sample_interval_s: float = 1e-3,
        delay_s: dict[str, float] | None = None,
        clock: Clock | None = None,
        seed: int = 0,
        source: str = "scripted",
        frame_meta: dict[str, Any] | None = None,
    ) -> None:
        self.caps = capabilities or default_capabilities()
        self.clock: Clock = clock if clock is not None else VirtualClock()
        self._rng = np.random.default_rng(seed)
        self._image = image
        self._park_signal = park_signal
        self.counts_per_px = counts_per_px
        self.frame_dose_e_per_A2 = frame_dose_e_per_A2
        self.park_dose_e_per_A2 = park_dose_e_per_A2
        self.park_sample_interval_s = park_sample_interval_s
        self.delay_s = dict(delay_s or {})
        self.source = source
        self.frame_meta = dict(frame_meta or {})
        self.calls: list[str] = []
        self.log: list[Call] = []
        self.beam_blanked = True
        self.connected = False
        self.frames_made = 0
        self._counts: Counter[str] = Counter()
        self._faults: dict[tuple[str, int | None], BaseException] = {}
        self._hangs: set[tuple[str, int | None]] = set()
        self._hooks: dict[tuple[str, int | None], list[Callable[[], Any]]] = {}
        self._holds: dict[str, asyncio.Event] = {}

    # --- scripting ---------------------------------------------------------------------------
    @staticmethod
    def _check_op(op: str) -> None:
        if op not in OPS:
            raise ValueError(f"op={op!r}: must be one of {OPS}")

    def fail(self, op: str, exc: BaseException, at: int | None = None) -> ScriptedDriver:
        """Call number ``at`` of ``op`` (every call when None) raises ``exc``."""
        self._check_op(op)
        self._faults[(op, at)] = exc
        return self

    def recover(self, op: str) -> None:
        """Forget every fault and hang scripted for ``op``."""
        for key in [k for k in self._faults if k[0] == op]:
            del self._faults[key]
        self._hangs = {k for k in self._hangs if k[0] != op}

    def hang(self, op: str, at: int | None = None) -> ScriptedDriver:
        """Call number ``at`` of ``op`` (every call when None) never returns (until cancelled)."""
        self._check_op(op)
        self._hangs.add((op, at))
        return self

    def on(self, op: str, at: int | None, hook: Callable[[], Any]) -> ScriptedDriver:
        """Run ``hook()`` when call number ``at`` of ``op`` (every call when None) starts."""
        self._check_op(op)
        self._hooks.setdefault((op, at), []).append(hook)
        return self

    def hold(self, op: str) -> asyncio.Event:
        """Calls of ``op`` wait until the returned event is set."""
        self._check_op(op)
        return self._holds.setdefault(op, asyncio.Event())

    def count(self, op: str) -> int:
        return self._counts[op]

    # --- plumbing ------------------------------------------------------------------------------
    async def _enter(self, op: str, *args: Any, beam_on: bool = False) -> None:
        self._counts[op] += 1
        n = self._counts[op]
        self.calls.append(op)
        self.log.append(Call(op, args, self.clock.monotonic(), n))
        for key in ((op, n), (op, None)):
            for hook in self._hooks.get(key, ()):
                hook()
        if beam_on:
            self._require(op)
            self.beam_blanked = False  # the scan or park has started: the beam is on while it runs
        if (op, n) in self._hangs or (op, None) in self._hangs:
            await asyncio.Event().wait()  # until cancelled
        event = self._holds.get(op)
        if event is not None:
            await event.wait()
        delay = self.delay_s.get(op, 0.0)
        if delay > 0:
            await self.clock.sleep(delay)
        exc = self._faults.get((op, n), self._faults.get((op, None)))
        if exc is not None:
            raise exc

    def _require(self, op: str) -> None:
        if not self.connected:
            raise DriverFault(f"{op}: the scripted driver is not connected")

    def make_frame(self, geometry: ScanGeometry, start_s: float | None = None) -> Frame:
        """The next frame for ``geometry`` (what :meth:`acquire` returns, without the call)."""
        index = self.frames_made
        self.frames_made += 1
        if self._image is not None:
            image = np.asarray(self._image(geometry, index), dtype=np.float32)
        else:
            image = self._rng.poisson(self.counts_per_px, size=geometry.shape_px).astype(np.float32)
        dose = (self.frame_dose_e_per_A2 if self.frame_dose_e_per_A2 is not None
                else dose_model.scan_dose_e_per_A2(self.caps.beam_current_pA, geometry))
        start = self.clock.monotonic() if start_s is None else start_s
        return Frame(image=image, geometry=geometry, line_times_s=geometry.line_start_times_s(start), index=index,
                     dose_e_per_A2=float(dose), source=self.source, meta=dict(self.frame_meta))

    # --- Driver protocol -------------------------------------------------------------------------
    async def connect(self) -> None:
        await self._enter("connect")
        self.connected = True

    async def close(self) -> None:
        await self._enter("close")
        self.beam_blanked = True
        self.connected = False

    async def capabilities(self) -> Capabilities:
        await self._enter("capabilities")
        return self.caps

    async def acquire(self, geometry: ScanGeometry) -> Frame:
        start = self.clock.monotonic()
        await self._enter("acquire", geometry, beam_on=True)
        if isinstance(self.clock, VirtualClock):
            self.clock.advance(max(0.0, start + geometry.frame_time_s - self.clock.monotonic()))
        return self.make_frame(geometry, start)

    async def stream(self, geometry: ScanGeometry, n_frames: int | None = None) -> AsyncIterator[Frame]:
        await self._enter("stream", geometry, n_frames, beam_on=True)
        i = 0
        while n_frames is None or i < n_frames:
            start = self.clock.monotonic()
            between = self.delay_s.get("frame", 0.0)
            if between > 0:
                await self.clock.sleep(between)
            elif isinstance(self.clock, VirtualClock):
                await self.clock.sleep(geometry.frame_time_s)
            else:
                await asyncio.sleep(0)
            yield self.make_frame(geometry, start)
            i += 1

    async def park(self, position_A: tuple[float, float], dwell_s: float) -> ParkResult:
        start = self.clock.monotonic()
        await self._enter("park", position_A, dwell_s, beam_on=True)
        if isinstance(self.clock, VirtualClock):
            self.clock.advance(max(0.0, start + dwell_s - self.clock.monotonic()))
        n = max(1, int(round(dwell_s / self.park_sample_interval_s)))
        if self._park_signal is not None:
            signal = np.asarray(self._park_signal((float(position_A[0]), float(position_A[1])), dwell_s, n), dtype=np.float64)
        else:
            signal = np.arange(n, dtype=np.float64)
        fwhm = self.caps.probe_fwhm_A or 0.8
        dose = (self.park_dose_e_per_A2 if self.park_dose_e_per_A2 is not None
                else dose_model.park_dose_e_per_A2(self.caps.beam_current_pA, dwell_s, fwhm))
        return ParkResult(position_A=(float(position_A[0]), float(position_A[1])), dwell_s=float(dwell_s), start_time_s=start,
                          sample_interval_s=dwell_s / max(1, len(signal)), signal=signal, dose_e_per_A2=float(dose))

    async def blank(self) -> None:
        await self._enter("blank")
        self.beam_blanked = True
