"""The transport tests' microscope: the package's :class:`~stemagent.drivers.scripted.ScriptedDriver`
set up as a small deterministic console (noise frames, instant scans, a log of calls)."""

from __future__ import annotations

import socket

import numpy as np

from stemagent.clock import SystemClock
from stemagent.drivers.scripted import ScriptedDriver
from stemagent.types import Capabilities


def FakeMicroscope(seed: int = 0, frame_delay_s: float = 0.0) -> ScriptedDriver:  # noqa: N802 - reads as the class it was
    """Noise frames of dose 1.5 e/Å², parks of 10 samples and 2 e/Å², on the system clock."""
    return ScriptedDriver(
        capabilities=Capabilities(name="fake", max_fov_A=512.0, max_shape_px=(4096, 4096), min_dwell_s=1e-7, max_dwell_s=1e-2),
        image=lambda g, i, rng=np.random.default_rng(seed): rng.random(g.shape_px, dtype=np.float32),
        park_signal=lambda position_A, dwell_s, n: np.arange(10, dtype=np.float64),
        frame_dose_e_per_A2=1.5,
        park_dose_e_per_A2=2.0,
        delay_s={"frame": frame_delay_s},
        clock=SystemClock(),
        seed=seed,
        source="fake",
        frame_meta={"seed": 0},
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
