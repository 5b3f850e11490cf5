"""The frame slot between the acquisition task and the analysis: bounded, and the newest frame wins.

When the agent streams a field (``agent.overlap``), one task acquires frames while the loop
analyses the previous one. Frames meet in a :class:`FrameSlot` holding at most ``size`` frames:
when analysis falls behind, the oldest waiting frame is dropped (it is already in the run log)
and the drop is counted and reported to ``on_drop``. The acquisition task ends the slot with
:meth:`FrameSlot.close` (the stream's end, or the error that ended it).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable

from stemagent.types import Frame


class FrameSlot:
    """A bounded queue of frames where the newest wins (see the module docstring)."""

    def __init__(self, size: int = 1, on_drop: Callable[[Frame], None] | None = None) -> None:
        if size < 1:
            raise ValueError(f"size={size}: a frame slot holds at least one frame")
        self._frames: deque[Frame] = deque()
        self._size = size
        self._ready = asyncio.Event()
        self._on_drop = on_drop
        self.dropped = 0
        self.closed = False
        self.error: BaseException | None = None

    def put(self, frame: Frame) -> None:
        if len(self._frames) >= self._size:
            old = self._frames.popleft()
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop(old)
        self._frames.append(frame)
        self._ready.set()

    def close(self, error: BaseException | None = None) -> None:
        self.closed = True
        self.error = error
        self._ready.set()

    def drain(self) -> list[Frame]:
        """Take every waiting frame (they will not be analysed)."""
        out = list(self._frames)
        self._frames.clear()
        return out

    async def get(self) -> Frame | None:
        """The oldest waiting frame; ``None`` once the slot is closed and empty (raises the
        acquisition's error, if it ended with one)."""
        while True:
            if self._frames:
                frame = self._frames.popleft()
                if not self._frames and not self.closed:
                    self._ready.clear()
                return frame
            if self.closed:
                if self.error is not None:
                    raise self.error
                return None
            self._ready.clear()
            await self._ready.wait()
