"""Survey candidates and overview features."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.config import ConfigError, config_from_dict
from stemagent.errors import InputError
from stemagent.policies.survey_features import candidate_grid, features_from_atoms, features_from_image, find_spots, spot_map
from stemagent.policies.survey_testing import PointField
from stemagent.types import Atoms, ScanGeometry


@pytest.mark.parametrize("half, fov, overlap", [(250.0, 25.6, 0.02), (45.0, 25.6, 0.1), (100.0, 25.0, 0.0), (12.8, 25.6, 0.0)])
def test_survey_grid_tiles_the_allowed_square_without_gaps(half: float, fov: float, overlap: float) -> None:
    c = candidate_grid((10.0, -5.0), half, fov, overlap)
    xs = np.unique(np.round(c[:, 0], 6))
    assert len(c) == len(xs) ** 2
    assert np.all(np.abs(c - (10.0, -5.0)) <= half - fov / 2 + 1e-9)  # every sub-scan inside the square
    if len(xs) > 1:
        assert np.max(np.diff(xs)) <= fov * (1 - overlap) + 1e-9  # neighbours overlap as asked: no gaps
        assert xs[0] - fov / 2 == pytest.approx(10.0 - half) and xs[-1] + fov / 2 == pytest.approx(10.0 + half)
    with pytest.raises(InputError, match="subscan_fov_A"):
        candidate_grid((0.0, 0.0), 10.0, 25.6, 0.0)


def test_survey_spot_map_finds_bright_spots_and_not_the_frame_edges() -> None:
    targets = np.array([[-30.0, 20.0], [40.0, -40.0], [0.0, 0.0]])
    obs = PointField(targets, 60.0, seed=2, spot_counts=12.0).overview(256)
    g = obs.geometry
    z = spot_map(obs.features["image"], g)
    spots = find_spots(z, g, threshold=5.0)
    d = np.min(np.linalg.norm(spots[:, None, :] - targets[None, :, :], axis=2), axis=0)
    assert np.all(d < 1.0), "every spot found"
    assert len(spots) <= 6, f"{len(spots)} spots for 3 targets"
    # pure noise: as many false spots near the edges as in the middle (no mirrored-border excess)
    noise = np.random.default_rng(0).poisson(2.0, size=(512, 512)).astype(np.float32)
    g2 = ScanGeometry(fov_A=(200.0, 200.0), shape_px=(512, 512))
    s2 = find_spots(spot_map(noise, g2), g2, threshold=3.0)
    edge = np.any(np.abs(s2) > 90.0, axis=1)
    area_edge = 200.0**2 - 180.0**2
    assert edge.sum() / area_edge < 2.0 * (~edge).sum() / 180.0**2 + 1e-3
    with pytest.raises(InputError, match="image.shape"):
        spot_map(noise[:10], g2)


def test_survey_features_rank_the_cells_with_targets_first() -> None:
    targets = np.array([[-37.5, 12.5], [-36.0, 14.0], [-39.0, 10.0], [37.5, -37.5]])
    world = PointField(targets, 50.0, seed=1, spot_counts=12.0)
    obs = world.overview(256)
    cand = candidate_grid((0.0, 0.0), 50.0, 25.0, 0.0)
    f = features_from_image(obs.features["image"], obs.geometry, cand, 25.0)
    assert f.names == ("max_z", "excess", "spots", "spot_density") and f.values.shape == (16, 4)
    rich = int(np.argmin(np.linalg.norm(cand - [-37.5, 12.5], axis=1)))
    assert int(np.argmax(f.values[:, 1])) == rich and f.values[rich, 2] >= 2
    atoms = Atoms(np.concatenate([targets, [[5.0, 5.0]]]), np.array([1, 1, 1, 1, 0]), np.ones(5), 0, ("C", "Si"))
    fa = features_from_atoms(atoms, cand, 25.0, ("Si",))
    assert fa.values[rich, 0] == 3 and fa.values[:, 0].sum() == 4 and fa.values[:, 2].sum() == 5


def test_survey_config_errors_name_the_field() -> None:
    ok = config_from_dict({"policy": {"kind": "survey", "objective": {"kind": "motif_count", "feature": "motif", "motif": 2}}})
    assert ok.policy.kind == "survey" and ok.policy.objective.motif == 2
    with pytest.raises(ConfigError) as err:
        config_from_dict({"policy": {"kind": "survey", "acquisition": "ei"}})
    assert "policy.acquisition" in str(err.value) and "ei" in str(err.value)
    with pytest.raises(ConfigError) as err:
        config_from_dict({"policy": {"kind": "survey", "subscan_fov_A": -1}})
    assert "policy.subscan_fov_A" in str(err.value)
    with pytest.raises(ConfigError, match="n_initial"):
        config_from_dict({"policy": {"kind": "survey", "n_initial": 10, "min_subscans_before_stop": 2}})
