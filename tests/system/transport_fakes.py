"""A small in-process fake microscope implementing ``Driver`` (for the transport tests)."""

from __future__ import annotations

import asyncio
import socket
from typing import AsyncIterator

import numpy as np

from stemagent.types import Capabilities, Frame, ParkResult, ScanGeometry


class FakeMicroscope:
    """A deterministic in-process ``Driver``: frames of noise, instant scans, a log of calls."""

    def __init__(self, seed: int = 0, frame_delay_s: float = 0.0) -> None:
        self.rng = np.random.default_rng(seed)
        self.calls: list[str] = []
        self.blanked = True
        self.index = 0
        self.frame_delay_s = frame_delay_s
        self.gate: asyncio.Event | None = None  # when set, acquire waits for it

    async def connect(self) -> None:
        self.calls.append("connect")

    async def close(self) -> None:
        self.calls.append("close")
        self.blanked = True

    async def capabilities(self) -> Capabilities:
        self.calls.append("capabilities")
        return Capabilities(name="fake", max_fov_A=512.0, max_shape_px=(4096, 4096), min_dwell_s=1e-7, max_dwell_s=1e-2)

    def _frame(self, geometry: ScanGeometry) -> Frame:
        img = self.rng.random(geometry.shape_px, dtype=np.float32)
        f = Frame(image=img, geometry=geometry, line_times_s=geometry.line_start_times_s(float(self.index)),
                  index=self.index, dose_e_per_A2=1.5, source="fake", meta={"seed": 0})
        self.index += 1
        return f

    async def acquire(self, geometry: ScanGeometry) -> Frame:
        self.calls.append("acquire")
        self.blanked = False
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), timeout=30)
        return self._frame(geometry)

    async def stream(self, geometry: ScanGeometry, n_frames: int | None = None) -> AsyncIterator[Frame]:
        self.calls.append("stream")
        self.blanked = False
        i = 0
        while n_frames is None or i < n_frames:
            await asyncio.sleep(self.frame_delay_s)
            yield self._frame(geometry)
            i += 1

    async def park(self, position_A: tuple[float, float], dwell_s: float) -> ParkResult:
        self.calls.append("park")
        self.blanked = False
        return ParkResult(position_A=position_A, dwell_s=dwell_s, start_time_s=0.0, sample_interval_s=dwell_s / 10,
                          signal=np.arange(10, dtype=np.float64), dose_e_per_A2=2.0)

    async def blank(self) -> None:
        self.calls.append("blank")
        self.blanked = True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
