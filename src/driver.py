"""The device protocol every microscope backend implements.

The digital twin, the ZeroMQ client driver and the replay driver all implement
:class:`Driver`, so the agent cannot tell them apart. Every method is async; every call that
waits on I/O is expected to time out rather than hang, raising :class:`DriverFault`.

Beam state: ``acquire``/``stream``/``park`` unblank the beam while they run and leave it
where the scan or park ended; only ``blank`` blanks it. The agent blanks whenever it is idle,
paused, stopped or faulted.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol, runtime_checkable

from stemagent.errors import StemAgentError
from stemagent.types import Capabilities, Frame, ParkResult, ScanGeometry


class DriverFault(StemAgentError):
    """The device failed or was lost; the agent blanks, logs the fault and pauses."""


class CommandRefused(StemAgentError):
    """The device refused a command under its own limits (nothing was done; the beam stayed blanked)."""


class EndOfData(StemAgentError):
    """A finite source (a replayed log or file) has no more frames."""


@runtime_checkable
class Driver(Protocol):
    """An asynchronous STEM device."""

    async def connect(self) -> None:
        """Open the device. Idempotent."""

    async def close(self) -> None:
        """Blank the beam and release the device. Idempotent."""

    async def capabilities(self) -> Capabilities:
        """Field-of-view, pixel and dwell limits, detectors and beam settings."""

    async def acquire(self, geometry: ScanGeometry) -> Frame:
        """Scan ``geometry`` once and return the frame."""

    def stream(self, geometry: ScanGeometry, n_frames: int | None = None) -> AsyncIterator[Frame]:
        """Scan ``geometry`` repeatedly, yielding frames as they complete (``None``: until closed)."""

    async def park(self, position_A: tuple[float, float], dwell_s: float) -> ParkResult:
        """Hold the beam at a sample-frame position for ``dwell_s`` and return the signal."""

    async def blank(self) -> None:
        """Blank the beam."""
