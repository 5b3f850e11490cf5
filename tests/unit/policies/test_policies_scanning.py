"""The placeholder policies, without any driver: the raster covers the area in a serpentine, the
random policy stays inside it and is reproducible from its seed."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.config import ScanConfig
from stemagent.policies.scanning import RandomPolicy, RasterPolicy
from stemagent.stages import Observation, no_atoms
from stemagent.types import ScanRegion

SCAN = ScanConfig(fov_A=10.0, shape_px=32, dwell_s=1e-5)


def obs() -> Observation:
    return Observation(frame_index=0, time_s=0.0, geometry=SCAN.geometry(), atoms=no_atoms(0))


def test_the_raster_visits_every_field_once_then_starts_over():
    p = RasterPolicy(SCAN, (5.0, -5.0), 20.0, overlap=0.0)
    centres = [p.decide(obs()).command.geometry.center_A for _ in range(len(p.centres))]  # type: ignore[union-attr]
    assert len(p.centres) == 16  # 40 Å square, 10 Å fields: 4 x 4
    assert len(set(centres)) == 16 and centres[-1] == tuple(p.centres[0])  # field 0 was the initial scan
    xs = np.array(centres)
    assert np.all(np.abs(xs - (5.0, -5.0)) <= 20.0 - 5.0 + 1e-9)  # every field stays inside the area
    assert p.decide(obs()).reason == "field 2 of 16 in the raster"
    with pytest.raises(ValueError, match="fields"):
        RasterPolicy(ScanConfig(fov_A=1.0), (0.0, 0.0), 1e5)


def test_random_fields_stay_inside_and_repeat_with_the_seed():
    a = RandomPolicy(SCAN, (0.0, 0.0), 30.0, np.random.default_rng(5))
    b = RandomPolicy(SCAN, (0.0, 0.0), 30.0, np.random.default_rng(5))
    da = [a.decide(obs()) for _ in range(50)]
    db = [b.decide(obs()) for _ in range(50)]
    assert [d.command for d in da] == [d.command for d in db]
    centres = np.array([d.command.geometry.center_A for d in da if isinstance(d.command, ScanRegion)])
    assert np.all(np.abs(centres) <= 30.0 - 5.0) and len({tuple(c) for c in centres}) == 50
