"""Twin support for surveys: clustered Si in graphene, and dose accounting per area."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemagent.clock import VirtualClock
from stemagent.config import TwinConfig
from stemagent.simulators.factory import twin_from_config
from stemagent.simulators.specimens import graphene, thomas_cluster_points
from stemagent.simulators.twin import TwinDriver
from stemagent.types import ELECTRON_CHARGE_C, ScanGeometry, dose_e_per_A2


def si_xy(sp) -> np.ndarray:  # type: ignore[no-untyped-def]
    return sp.positions_A[(sp.numbers == 14) & sp.present, :2]


def clark_evans(xy: np.ndarray, area_A2: float) -> float:
    """Mean nearest-neighbour distance over its value for a uniform (Poisson) pattern: ~1 uniform, << 1 clustered."""
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.mean(d[:, 1]) / (0.5 / np.sqrt(len(xy) / area_A2)))


def test_clustered_si_are_clustered_seeded_and_keep_their_separation() -> None:
    size = (300.0, 300.0)
    a = graphene(size_A=size, rng=np.random.default_rng(4), n_si=40, si_layout="clustered", si_n_clusters=3, si_cluster_sigma_A=10.0)
    b = graphene(size_A=size, rng=np.random.default_rng(4), n_si=40, si_layout="clustered", si_n_clusters=3, si_cluster_sigma_A=10.0)
    c = graphene(size_A=size, rng=np.random.default_rng(5), n_si=40, si_layout="clustered", si_n_clusters=3, si_cluster_sigma_A=10.0)
    u = graphene(size_A=size, rng=np.random.default_rng(4), n_si=40)
    xa, xu = si_xy(a), si_xy(u)
    assert len(xa) == 40 and len(xu) == 40
    assert np.array_equal(xa, si_xy(b)) and not np.array_equal(xa, si_xy(c))
    d, _ = cKDTree(xa).query(xa, k=2)
    assert d[:, 1].min() >= 6.0 - 1e-9  # every Si keeps three C neighbours
    assert clark_evans(xa, 300.0**2) < 0.6 < 0.8 < clark_evans(xu, 300.0**2)
    # the default (uniform) draws what an explicit uniform layout draws
    assert np.array_equal(xu, si_xy(graphene(size_A=size, rng=np.random.default_rng(4), n_si=40, si_layout="uniform")))
    with pytest.raises(ValueError, match="si_layout"):
        graphene(size_A=size, rng=np.random.default_rng(0), si_layout="lumpy")


def test_thomas_points_stay_in_the_box_and_follow_uneven_clusters() -> None:
    rng = np.random.default_rng(0)
    pts = thomas_cluster_points(rng, 500, 4, 8.0, np.array([-50.0, -50.0]), np.array([50.0, 50.0]))
    assert pts.shape == (500, 2) and np.all(np.abs(pts) <= 50.0)
    assert thomas_cluster_points(rng, 0, 4, 8.0, np.zeros(2), np.ones(2)).shape == (0, 2)


def test_twin_config_builds_a_clustered_field() -> None:
    cfg = TwinConfig(specimen="graphene", specimen_size_A=200.0, n_si=20, si_layout="clustered", si_n_clusters=2, dynamics=False)
    twin = twin_from_config(cfg, seed=3)
    xy = si_xy(twin.specimen)
    assert len(xy) == 20 and clark_evans(xy, 200.0**2) < 0.6


async def test_twin_accounts_dose_per_area() -> None:
    twin = TwinDriver(graphene(size_A=(120.0, 120.0), rng=np.random.default_rng(1), n_si=2), clock=VirtualClock(),
                      beam_current_pA=20.0, dynamics=False)
    a = ScanGeometry(center_A=(0.0, 0.0), fov_A=(40.0, 40.0), shape_px=(64, 64), dwell_s=2e-6)
    b = ScanGeometry(center_A=(20.0, 0.0), fov_A=(40.0, 40.0), shape_px=(32, 32), dwell_s=4e-6)
    fa = await twin.acquire(a)
    fb = await twin.acquire(b)
    await twin.park((5.0, 5.0), 0.01)
    gt = twin.ground_truth
    assert [e.kind for e in gt.exposures] == ["scan", "scan", "park"]
    da = dose_e_per_A2(20.0, 2e-6, (40.0 / 64) ** 2)
    db = dose_e_per_A2(20.0, 4e-6, (40.0 / 32) ** 2)
    assert fa.dose_e_per_A2 == pytest.approx(da) and fb.dose_e_per_A2 == pytest.approx(db)
    park_e = 20e-12 * 0.01 / ELECTRON_CHARGE_C
    assert gt.electrons_total == pytest.approx(da * 1600.0 + db * 1600.0 + park_e, rel=1e-9)
    m = gt.dose_map_e_per_A2((-60.0, -60.0), (60.0, 60.0), 2.0)
    assert m.shape == (60, 60)
    assert m.max() == pytest.approx(da + db)  # where the two fields overlap
    assert m[30, 5] == 0.0 and m[30, 22] == pytest.approx(da) and m[30, 48] == pytest.approx(db) and m[30, 50] == 0.0
