"""Atom manipulation: move a dopant through a lattice, site by site, learning the hop rate online.

Pure stages (no driver, no I/O): :mod:`.lattice` (graph and path planning), :mod:`.changepoint`
(steps in a park signal), :mod:`.outcome` (what a park did, from a confirmation frame),
:mod:`.hopmodel` (GP of the hop rate vs beam offset), :mod:`.acquisition` (where and how long to
park) and :mod:`.policy` (the policy that ties them together). See README, "Atom manipulation".
"""

from stemagent.policies.manipulation.changepoint import Step, detect_steps
from stemagent.policies.manipulation.config import ManipulationConfig
from stemagent.policies.manipulation.hopmodel import HopModel
from stemagent.policies.manipulation.lattice import LatticeGraph, PlanRefused
from stemagent.policies.manipulation.outcome import Outcome, classify_outcome
from stemagent.policies.manipulation.policy import ManipulationPolicy, ManipulationStats

__all__ = [
    "HopModel",
    "LatticeGraph",
    "ManipulationConfig",
    "ManipulationPolicy",
    "ManipulationStats",
    "Outcome",
    "PlanRefused",
    "Step",
    "classify_outcome",
    "detect_steps",
]
