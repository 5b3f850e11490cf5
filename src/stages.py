"""Protocols of the analysis stages between a frame and a decision.

``Frame -> Segmenter -> Atoms -> (drift correction) -> Observation -> Policy -> Decision``.
Stages are plain synchronous objects (the agent runs them in an executor); they never touch
a driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from stemagent.types import Atoms, Decision, Frame, ScanGeometry


@runtime_checkable
class Segmenter(Protocol):
    """Finds atoms in a frame; positions come back in the sample frame (Å)."""

    def find(self, frame: Frame) -> Atoms: ...


@dataclass
class Observation:
    """What a policy sees after a frame has been analysed."""

    frame_index: int
    time_s: float
    geometry: ScanGeometry
    atoms: Atoms
    features: dict[str, np.ndarray] = field(default_factory=dict)


@runtime_checkable
class Policy(Protocol):
    """Chooses the next beam command. Pure decision making: no driver, no I/O."""

    name: str

    def decide(self, observation: Observation) -> Decision: ...
