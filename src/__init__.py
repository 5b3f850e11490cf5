"""stemagent: a real-time autonomous-experiment agent for STEM.

Core types live in :mod:`stemagent.types`, the device protocol in :mod:`stemagent.driver`.
"""

from stemagent.types import (
    Atoms,
    Blank,
    BeamCommand,
    Capabilities,
    Decision,
    Frame,
    Park,
    ParkResult,
    ScanGeometry,
    ScanRegion,
)
from stemagent.driver import Driver, DriverFault

__version__ = "0.1.0"

__all__ = [
    "Atoms",
    "Blank",
    "BeamCommand",
    "Capabilities",
    "Decision",
    "Driver",
    "DriverFault",
    "Frame",
    "Park",
    "ParkResult",
    "ScanGeometry",
    "ScanRegion",
    "__version__",
]
