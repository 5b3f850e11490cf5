"""Overlap: stream the field the policy keeps asking for, analysing frame n while frame n+1 is acquired.

:class:`Streamer` works for an :class:`~stemagent.agent.loop.Agent` (``agent.overlap``). Its
acquisition task (in the agent's ``TaskGroup``) streams the field with ``Driver.stream`` in
bursts of ``stream_burst_frames``; each burst passes the safety gate as a whole before it starts
(one prediction per frame) and the beam is blanked after it. Every frame is logged as it
arrives and put into a :class:`FrameSlot` of one frame, where the newest wins: when analysis
falls behind, the waiting frame is dropped, counted and logged (``drops`` stream). A decision
for another field, a pause, a stop or ``max_frames`` ends the stream; frames still waiting are
dropped the same way.

The slot: bounded, and the newest frame wins (``size`` frames at most; the oldest waiting one is
dropped and reported to ``on_drop``); the acquisition ends it with :meth:`FrameSlot.close`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Callable

from stemagent.agent.safety import Prediction
from stemagent.types import BeamCommand, Frame, ScanGeometry, ScanRegion

if TYPE_CHECKING:
    from stemagent.agent.loop import Agent

log = logging.getLogger("stemagent.agent")


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


class Streamer:
    """Streams one field for ``agent`` while it analyses (see the module docstring)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def may_stream(self, cmd: BeamCommand) -> bool:
        a = self.agent
        return (a.overlap and not a._stream_blocked and isinstance(cmd, ScanRegion) and a._last_obs is not None
                and cmd.geometry == a._last_geometry and not (a._pause_requested or a._stop_requested))

    def dropped(self, frame: Frame, why: str) -> None:
        a = self.agent
        a.summary.frames_dropped += 1
        n = a.summary.frames_dropped
        a._safe_write(lambda: a.writer.write_event("drops", {"frame_index": int(frame.index), "reason": why,
                                                          "dropped_so_far": n, "t_s": a._now()}), "drop")
        if n == 1 or n % 100 == 0:
            log.warning("analysis behind: frame %d dropped (%d so far)", frame.index, n)

    async def stream(self, geometry: ScanGeometry) -> BeamCommand | None:
        """Stream ``geometry`` while the policy keeps asking for it; returns the next other command
        (None when the stream ended first: refused by the gate, or the source ran out)."""
        a = self.agent
        assert a._tasks is not None
        slot = FrameSlot(1, on_drop=lambda f: self.dropped(f, "analysis behind: a newer frame arrived"))
        keep_going = asyncio.Event()
        keep_going.set()
        task = a._tasks.create_task(self._acquire(geometry, slot, keep_going), name="stemagent-stream")
        try:
            while True:
                frame = await a._race(slot.get(), None, "stream")
                if frame is None:
                    return None
                cmd = await a._analyse_frame(frame, logged=True)
                if (not self.may_stream(cmd) or a.summary.frames >= a.max_frames
                        or a._policy_finished()):
                    return cmd
        finally:
            keep_going.clear()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for f in slot.drain():
                self.dropped(f, "the stream ended before it was analysed")

    async def _acquire(self, geometry: ScanGeometry, slot: FrameSlot, keep_going: asyncio.Event) -> None:
        """The acquisition task: bursts of frames through the gate into ``slot``. Never raises
        (an error ends the slot with it), and blanks the beam after each burst."""
        a = self.agent
        try:
            while keep_going.is_set():
                cmd, extra = a._to_device(ScanRegion(geometry))
                now = a._now()
                predictions: list[Prediction] = []
                for _ in range(a.stream_burst_frames):
                    verdict = a.gate.check(cmd, now)
                    if not verdict.allowed:
                        if not predictions:
                            a._refused(cmd, verdict.rule, verdict.detail, "refused", extra)
                        break
                    predictions.append(a.gate.record(cmd, now))
                if not predictions:
                    slot.close()
                    return
                a.summary.commands_sent += len(predictions)
                a._last_refusal = None
                a.writer.write_command(cmd, outcome="sent", t_s=now, frames=len(predictions), converted=extra["converted"])
                assert isinstance(cmd, ScanRegion)
                frames = a.driver.stream(cmd.geometry, len(predictions))
                try:
                    for prediction in predictions:
                        frame = await a._race(anext(frames), geometry.frame_time_s + a.gate.config.watchdog_s, "stream frame")
                        a.gate.finished(prediction, a._now())
                        a.completed()
                        frame = a._identify(frame)
                        a._reconcile(prediction, frame.dose_e_per_A2)
                        a._last_geometry = geometry
                        a.writer.write_frame(frame)  # every frame is logged, analysed or dropped
                        slot.put(frame)
                finally:
                    close = getattr(frames, "aclose", None)  # an async generator: end it on the device's side too
                    if close is not None:
                        try:
                            await a._race(close(), a.gate.config.watchdog_s, "stream close")
                        except Exception as exc:  # noqa: BLE001 - e.g. still unwinding a cancelled step; blank anyway
                            log.warning("closing the stream failed: %r", exc)
                    await a._blank("stream burst done")
        except StopAsyncIteration:
            slot.close()
        except asyncio.CancelledError:
            slot.close()
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which faults, aborts or stops
            slot.close(exc)
