"""Atom manipulation: move a dopant through a lattice, site by site, learning the hop rate online.

Pure stages (no driver, no I/O): :mod:`.lattice` (graph and path planning), :mod:`.changepoint`
(steps in a park signal), :mod:`.outcome` (what a park did, from a confirmation frame),
:mod:`.hopmodel` (GP of the hop rate vs beam offset), :mod:`.acquisition` (where and how long to
park), :mod:`.policy` (the policy that ties them together) and :mod:`.synthetic` (a test double).
See README, "Atom manipulation".

Names are imported lazily so that loading the configuration model (:mod:`.config`, pydantic
only) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "HopModel": "hopmodel",
    "LatticeGraph": "lattice",
    "PlanRefused": "lattice",
    "ManipulationConfig": "config",
    "ManipulationPolicy": "policy",
    "ManipulationStats": "policy",
    "Outcome": "outcome",
    "classify_outcome": "outcome",
    "Step": "changepoint",
    "detect_steps": "changepoint",
}

__all__ = [
    "HopModel", "LatticeGraph", "ManipulationConfig", "ManipulationPolicy", "ManipulationStats", "Outcome", "PlanRefused",
    "Step", "classify_outcome", "detect_steps",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
