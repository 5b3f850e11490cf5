"""Drift and scan distortion: a Gaussian-process model of specimen drift over acquisition time.

- :mod:`~stemagent.drift.stage`: :class:`DriftStage`, ``update(frame, atoms) -> DriftEstimate``,
  ``forecast(t)``, ``to_beam`` / ``to_sample``, ``check(t)``.
- :mod:`~stemagent.drift.tracking`: gated, lattice-aware assignment of atoms between frames.
- :mod:`~stemagent.drift.gp`: the GPyTorch model of drift over time.
- :mod:`~stemagent.drift.commands`: beam commands from the sample frame to the beam frame.
- :mod:`~stemagent.drift.resample`: the drift-corrected image of a frame.
- :mod:`~stemagent.drift.config`: :class:`DriftConfig`.
"""

from stemagent.drift.config import DriftConfig
from stemagent.drift.estimate import DriftCheck, DriftEstimate
from stemagent.drift.stage import DriftStage

__all__ = ["DriftCheck", "DriftConfig", "DriftEstimate", "DriftStage"]
