"""Beam commands from the sample frame to the beam (scan) frame, with the drift forecast.

Policies decide in the **sample frame** (Å, fixed to the specimen: the drift stage's reference
lattice). A microscope, and the digital twin, execute in the **beam frame**: the scan
coordinates the deflectors are driven to. This module converts one into the other at the time
the command will act, and says when the estimate cannot be trusted to do so.

How the twin reads coordinates under drift (``simulators/scan.py``, ``simulators/twin.py``)
-----------------------------------------------------------------------------------------------
- ``DriftModel.displacement_A(t)`` is ``d(t)``: where the specimen has moved relative to the
  beam frame by time ``t`` (zero at the drift origin, the twin's construction time).
  ``driver.ground_truth.drift_at(t)`` returns the same.
- ``driver.park(position_A, dwell_s)``: ``position_A`` is a beam position ``b``. The park starts
  at the clock's time ``t0`` when ``park`` is called; at each sample ``t`` of the dwell the beam
  sits on the specimen point ``b - d(t)`` (so over a long dwell it slides along the drift).
- ``driver.acquire(geometry)``: ``geometry.center_A`` (and the whole pixel grid) are beam
  positions. The frame starts at the clock's time; pixel ``(r, c)`` is acquired at
  ``start + r * line_time + c * dwell``, and shows the specimen point
  ``geometry.pixel_to_sample((r, c)) - d(t_pixel)``. Equivalently a specimen point ``X``
  appears at the pixel of the beam position ``X + d(t)``. The returned ``Frame.geometry`` is the
  commanded (beam) geometry, so atom positions a segmenter reports from it are beam positions.
- With no drift the two frames coincide.

So, to act on the sample point ``X`` at time ``t``: send the beam to ``X + d(t)``. The stage's
``d`` is measured relative to its reference lattice instead of the twin's origin, but that is
a constant offset shared by the positions the stage reports and the conversions it makes, so it
cancels: a sample-frame position from the stage, converted by the same stage, lands on the
same specimen point (``tests/system/test_drift_twin_park.py`` checks it on the drifting twin).

Execution times
---------------
- :class:`~stemagent.types.Park`: the park's start (``start_s``); the drift during the dwell is
  not compensated (a 10 ms park at 0.5 Å/s moves 0.005 Å).
- :class:`~stemagent.types.ScanRegion`: the centre at the scan's mid-time,
  ``start_s + frame_time / 2``; the drift during the scan is measured from the frame afterwards.
- :class:`~stemagent.types.Blank`: unchanged.

``start_s`` is when the driver will start the command on the run's clock: for the twin, the
clock's time when ``park``/``acquire`` is called (the agent passes its clock's ``monotonic()``
right before the call, plus any known latency of its transport).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from stemagent.codec import encode_command
from stemagent.drift.estimate import DriftCheck
from stemagent.drift.stage import DriftStage
from stemagent.types import BeamCommand, Blank, Park, ScanRegion


@dataclass(frozen=True)
class ConvertedCommand:
    """A command converted to the beam frame.

    ``command``: what to send to the driver (beam frame). ``sample_command``: what the policy
    asked (sample frame). ``time_s``: the time the conversion is for; ``offset_A``: the drift
    forecast added ``(x, y)``; ``std_A``: its 1-sigma uncertainty ``(x, y)``; ``check``: whether
    the estimate is reliable there (if not, re-acquire a reference frame instead of acting).
    """

    command: BeamCommand
    sample_command: BeamCommand
    time_s: float
    offset_A: tuple[float, float]
    std_A: tuple[float, float]
    check: DriftCheck

    def to_dict(self) -> dict:
        return {
            "command": encode_command(self.command),
            "sample_command": encode_command(self.sample_command),
            "time_s": float(self.time_s),
            "offset_A": [float(v) for v in self.offset_A],
            "std_A": [float(v) for v in self.std_A],
            "reliable": bool(self.check.reliable),
            "band_A": float(self.check.band_A),
            "reason": self.check.reason,
        }


def execution_time_s(command: BeamCommand, start_s: float) -> float:
    """When ``command``'s position matters: a park's start, a scan's mid-time, a blank's start."""
    if isinstance(command, ScanRegion):
        return float(start_s) + 0.5 * command.geometry.frame_time_s
    return float(start_s)


def to_beam_command(command: BeamCommand, stage: DriftStage, start_s: float) -> ConvertedCommand:
    """Convert a sample-frame ``command`` that will start at ``start_s`` to the beam frame."""
    t = execution_time_s(command, start_s)
    check = stage.check(t)
    if isinstance(command, Blank):
        return ConvertedCommand(command, command, t, (0.0, 0.0), (0.0, 0.0), check)
    mean, std = stage.forecast(t)
    d = mean[0]
    if isinstance(command, Park):
        b = np.asarray(command.position_A, dtype=np.float64) + d
        beam: BeamCommand = Park(position_A=(float(b[0]), float(b[1])), dwell_s=command.dwell_s)
    elif isinstance(command, ScanRegion):
        c = np.asarray(command.geometry.center_A, dtype=np.float64) + d
        beam = ScanRegion(replace(command.geometry, center_A=(float(c[0]), float(c[1]))))
    else:  # pragma: no cover - BeamCommand is a closed union
        raise TypeError(f"command={command!r}: not a beam command")
    return ConvertedCommand(beam, command, t, (float(d[0]), float(d[1])), (float(std[0, 0]), float(std[0, 1])), check)
