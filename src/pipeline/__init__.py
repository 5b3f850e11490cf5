"""The analysis pipeline: stages between a frame (or a park) and a decision.

:class:`Pipeline` runs :class:`Stage` objects in order on an :class:`~stemagent.stages.Observation`
(``segment -> drift -> encode -> policy``); see :mod:`stemagent.pipeline.core` for the
protocol and :mod:`stemagent.pipeline.stages` for the adapters.
"""

from stemagent.pipeline.core import DeviceCommand, Pipeline, Stage, StageFailed, StageOptions
from stemagent.pipeline.stages import (
    AtomFeatureStage,
    BoundaryTraceStage,
    DriftAdapter,
    EncodingAdapter,
    PolicyStage,
    RVAEAdapter,
    SegmentStage,
)

__all__ = [
    "AtomFeatureStage",
    "BoundaryTraceStage",
    "DeviceCommand",
    "DriftAdapter",
    "EncodingAdapter",
    "Pipeline",
    "PolicyStage",
    "RVAEAdapter",
    "SegmentStage",
    "Stage",
    "StageFailed",
    "StageOptions",
]
