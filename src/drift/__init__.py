"""Drift and scan distortion: a Gaussian-process model of specimen drift over acquisition time.

- :mod:`~stemagent.drift.stage`: :class:`DriftStage`, ``update(frame, atoms) -> DriftEstimate``,
  ``forecast(t)``, ``to_beam`` / ``to_sample``, ``check(t)``.
- :mod:`~stemagent.drift.tracking`: gated, lattice-aware assignment of atoms between frames.
- :mod:`~stemagent.drift.gp`: the GPyTorch model of drift over time.
- :mod:`~stemagent.drift.commands`: beam commands from the sample frame to the beam frame.
- :mod:`~stemagent.drift.loop_stage`: :class:`DriftLoopStage`, the stage in the agent's pipeline
  (commands converted at execution time, refits off the frame path, re-acquisition when unreliable).
- :mod:`~stemagent.drift.resample`: the drift-corrected image of a frame.
- :mod:`~stemagent.drift.config`: :class:`DriftConfig`.
"""

from importlib import import_module
from typing import Any

# names re-exported lazily, so that importing the config model (stemagent.config does) does not import torch
_EXPORTS = {"DriftConfig": "config", "DriftCheck": "estimate", "DriftEstimate": "estimate", "DriftStage": "stage",
            "DriftLoopStage": "loop_stage"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"stemagent.drift.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'stemagent.drift' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)  # noqa: PLE0605 - the lazily imported names
