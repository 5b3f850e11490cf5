"""What flows through the analysis pipeline, and the protocols of its parts.

``Frame -> Segmenter -> Atoms -> (drift) -> (encode) -> Observation -> Policy -> Decision``,
composed by :class:`stemagent.pipeline.Pipeline`. Parts are plain synchronous objects (the
agent runs the pipeline in an executor); they never touch a driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from stemagent.types import Atoms, Decision, Frame, ParkResult, ScanGeometry


@runtime_checkable
class Segmenter(Protocol):
    """Finds atoms in a frame; positions come back in the sample frame (Å)."""

    def find(self, frame: Frame) -> Atoms: ...


@dataclass
class Observation:
    """What the stages build up and the policy sees: one per analysed frame, and one per park.

    - ``kind``: ``"frame"`` (a frame was analysed) or ``"park"`` (a park ended: ``park`` holds its
      :class:`~stemagent.types.ParkResult`; ``frame_index``, ``geometry`` and ``atoms`` are those of
      the last frame analysed before it);
    - ``frame``: the frame (``None`` for a park observation);
    - ``atoms``: the atoms found (sample frame once a drift stage has run);
    - ``features``: observation-wide arrays (e.g. ``target_A`` from the operator, ``refused``
      when the last command was refused, ``replaced`` when a stage replaced a command since the
      last observation: what the policy asked for did not run);
    - ``atom_features``: per-atom arrays ``(N, ...)`` added by stages (motif features, latents);
    - ``drift``: the drift stage's estimate of this frame (its own type), or ``None``;
    - ``parks``: the parks since the previous frame, oldest first;
    - ``decision``: what the policy stage decided (``None``: no decision; the agent scans the
      last field again);
    - ``records``: per stage, a JSON-able document of what it found (logged with the
      observation; what ``replay --verify`` compares);
    - ``timings_ms``: per stage, its wall time on this observation (logged and published);
    - ``errors``: per stage, why it failed on this observation (its output is missing).
    """

    frame_index: int
    time_s: float
    geometry: ScanGeometry
    atoms: Atoms
    features: dict[str, np.ndarray] = field(default_factory=dict)
    kind: Literal["frame", "park"] = "frame"
    frame: Frame | None = None
    park: ParkResult | None = None
    atom_features: dict[str, np.ndarray] = field(default_factory=dict)
    drift: Any = None
    parks: list[ParkResult] = field(default_factory=list)
    decision: Decision | None = None
    records: dict[str, Any] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Policy(Protocol):
    """Chooses the next beam command. Pure decision making: no driver, no I/O.

    A policy may also implement ``observe_park(observation) -> Decision | None``: after a park it
    receives the park observation (``observation.park``: signal and times) and may ask for a
    small confirmation scan, another park, or (``None``) the agent's default, a scan of the
    last field. A policy that has finished says so in ``stop_reason`` (a non-empty string ends
    the run after its last decision). A policy with a goal (reach a target site) also says
    whether it got there in ``goal_reached`` (``None``: no goal, or not finished); a run whose
    policy finished with ``goal_reached`` False ends ``fail``, never ``success``."""

    name: str

    def decide(self, observation: Observation) -> Decision: ...


def no_atoms(frame_index: int = -1) -> Atoms:
    """An empty :class:`~stemagent.types.Atoms` (a stage that found nothing, or was off)."""
    return Atoms(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), np.zeros(0), frame_index)
