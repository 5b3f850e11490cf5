"""What every driver that plays recorded frames back shares (run logs, acquisition files).

The recording is what the microscope saw, so a requested geometry is not obeyed: a mismatch
is counted in :attr:`PlaybackDriver.mismatched_geometries`. When the recording runs out,
:class:`~stemagent.driver.EndOfData` ends the run.

Time: the injected clock follows the recorded times at every pace. ``pace="recorded"`` waits
them out; ``pace="fast"`` with a :class:`~stemagent.clock.VirtualClock` (what the agent's
factory builds for it) moves the virtual clock by the same amounts at once, so time-based rules
(the safety gate's command rate) see the run's own timing.
"""

from __future__ import annotations

from typing import AsyncIterator

from stemagent.clock import Clock, VirtualClock
from stemagent.driver import DriverFault, EndOfData
from stemagent.errors import InputError
from stemagent.types import Frame, ScanGeometry

PACES = ("fast", "recorded")


class PlaybackDriver:
    """Base of the playback drivers; subclasses provide ``capabilities``, ``acquire`` and ``park``."""

    name = "playback"

    def __init__(self, *, pace: str = "fast", clock: Clock | None = None) -> None:
        if pace not in PACES:
            raise InputError("pace", pace, f"must be one of {PACES}")
        self.pace = pace
        self.clock: Clock = clock if clock is not None else VirtualClock()
        self.connected = False
        self.beam_blanked = True
        self.mismatched_geometries = 0

    async def connect(self) -> None:
        self.connected = True

    async def close(self) -> None:
        self.connected = False
        self.beam_blanked = True

    async def blank(self) -> None:
        self.beam_blanked = True

    def _check_next(self, position: int, total: int, what: str) -> None:
        """Raise unless connected and frame ``position`` of ``total`` exists."""
        if not self.connected:
            raise DriverFault(f"{self.name} driver is not connected")
        if position >= total:
            raise EndOfData(f"all {total} frames of {what} replayed")

    async def _pass(self, seconds: float) -> None:
        """Let ``seconds`` of recorded time pass on the clock (at once on a virtual clock)."""
        if seconds > 0 and (self.pace == "recorded" or isinstance(self.clock, VirtualClock)):
            await self.clock.sleep(seconds)

    def _deliver(self, frame: Frame, requested: ScanGeometry) -> Frame:
        if frame.geometry != requested:
            self.mismatched_geometries += 1
        self.beam_blanked = False
        return frame

    async def acquire(self, geometry: ScanGeometry) -> Frame:  # pragma: no cover - subclasses
        raise NotImplementedError

    async def stream(self, geometry: ScanGeometry, n_frames: int | None = None) -> AsyncIterator[Frame]:
        i = 0
        while n_frames is None or i < n_frames:
            try:
                yield await self.acquire(geometry)
            except EndOfData:
                return
            i += 1
