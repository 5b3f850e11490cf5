"""Replay a run log as a :class:`~stemagent.driver.Driver`.

Frames come back in the order they were logged, whatever geometry is asked for (the log is
what the microscope saw); parks return the logged park signals and doses in order. The clock
follows the recorded times: with ``pace="recorded"`` frames are released at their recorded
times relative to the first; with ``pace="fast"`` at once, a virtual clock moving by the
recorded amounts. Each replayed frame carries ``meta["replayed_from"]``, its ``log_index`` in
the original log (its identity there). A frame whose chunk cannot be read raises
:class:`~stemagent.errors.InputError` (the agent logs it as bad input and asks for the next);
when the log is exhausted :class:`~stemagent.driver.EndOfData` is raised.
"""

from __future__ import annotations

from pathlib import Path

from stemagent.clock import Clock
from stemagent.codec import decode_capabilities, decode_geometry
from stemagent.driver import Driver, EndOfData
from stemagent.drivers.files import FileDriver, is_acquisition_file
from stemagent.drivers.playback import PlaybackDriver
from stemagent.runlog import RunLog
from stemagent.types import Capabilities, Frame, ParkResult, ScanGeometry


class ReplayDriver(PlaybackDriver):
    name = "replay"

    def __init__(self, path: str | Path, *, pace: str = "fast", clock: Clock | None = None) -> None:
        super().__init__(pace=pace, clock=clock)
        self.log = RunLog.open(path)
        self._frames = self.log.event_data("frames")
        self._parks = self.log.park_results()
        self._next_frame = 0
        self._next_park = 0
        self._t0_clock: float | None = None
        self._t0_log: float | None = None

    @property
    def n_frames(self) -> int:
        return len(self._frames)

    async def capabilities(self) -> Capabilities:
        if self._frames:
            g = decode_geometry(self._frames[0]["geometry"], "frames[0].geometry")
            shape = g.shape_px
            fov = max(g.fov_A)
        else:
            shape, fov = (4096, 4096), 1000.0
        return Capabilities(
            name=f"replay:{self.log.path.name}",
            max_fov_A=max(fov, 1e6),
            max_shape_px=(max(shape[0], 4096), max(shape[1], 4096)),
            min_dwell_s=1e-9,
            max_dwell_s=10.0,
            can_park=bool(self._parks),
            beam_current_pA=float(self.log.start.get("beam_current_pA", 20.0)),
            probe_fwhm_A=self._logged_probe_fwhm_A(),
        )

    def _logged_probe_fwhm_A(self) -> float | None:
        logged = self.log.start.get("capabilities")
        return decode_capabilities(logged, "start.capabilities").probe_fwhm_A if logged else None

    async def _pace_to(self, t_log: float) -> None:
        if self._t0_clock is None or self._t0_log is None:
            self._t0_clock, self._t0_log = self.clock.monotonic(), t_log
            return
        due = self._t0_clock + (t_log - self._t0_log)
        await self._pass(due - self.clock.monotonic())

    async def acquire(self, geometry: ScanGeometry) -> Frame:
        self._check_next(self._next_frame, len(self._frames), str(self.log.path))
        position = self._next_frame
        data = self._frames[position]
        self._next_frame += 1
        end_s = float(data["line_times_s"][-1]) + decode_geometry(data["geometry"], f"frames[{position}].geometry").line_time_s
        await self._pace_to(end_s)
        frame = self.log.frame_from_data(data)  # InputError if its chunk is unreadable: skipped
        frame.meta = {**frame.meta, "replayed_from": int(data.get("log_index", position))}
        return self._deliver(frame, geometry)

    async def park(self, position_A: tuple[float, float], dwell_s: float) -> ParkResult:
        if self._next_park >= len(self._parks):
            raise EndOfData(f"no more logged parks in {self.log.path}")
        result = self._parks[self._next_park]  # logs before version 2 kept no dose: 0
        self._next_park += 1
        await self._pace_to(result.start_time_s + result.dwell_s)
        return result


def open_replay(path: str | Path, *, pace: str = "fast", clock: Clock | None = None, pixel_size_A: float | None = None,
                beam_current_pA: float | None = None, dwell_s: float | None = None) -> Driver:
    """A run log, or an acquisition file from other software (``drivers/files.py``, with
    ``pixel_size_A`` for files that carry no calibration, and ``beam_current_pA`` / ``dwell_s``
    for files that record no current or dwell), as a driver."""
    if is_acquisition_file(path):
        return FileDriver(path, pace=pace, clock=clock, pixel_size_A=pixel_size_A, beam_current_pA=beam_current_pA, dwell_s=dwell_s)
    return ReplayDriver(path, pace=pace, clock=clock)
