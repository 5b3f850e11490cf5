"""Per-site features (coordination, site and neighbour intensities) on a synthetic honeycomb with a
known vacancy and a known bright dopant, in the stage, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from stemagent.encoding import EncodingConfig, EncodingStage
from stemagent.encoding.site_features import site_features, site_intensities, soft_coordination, transform_intensity
from stemagent.errors import InputError
from stemagent.types import Atoms, Frame, ScanGeometry

BOND_A = 1.42
PIXEL_A = 0.1


def honeycomb(n: int = 8) -> np.ndarray:
    """Sites of a graphene-like honeycomb (bond ``BOND_A``) centred on the origin."""
    a = BOND_A * np.sqrt(3.0)
    a1, a2 = np.array([a, 0.0]), np.array([a / 2, a * np.sqrt(3.0) / 2])
    basis = (np.zeros(2), np.array([a / 2, BOND_A / 2]))
    pts = np.asarray([i * a1 + j * a2 + b for i in range(-n, n) for j in range(-n, n) for b in basis])
    pts -= pts.mean(axis=0)
    return pts[np.all(np.abs(pts) < 11.0, axis=1)]


def render(positions_A: np.ndarray, weights: np.ndarray, shape: int = 256, seed: int = 0) -> tuple[np.ndarray, ScanGeometry]:
    """Gaussian atoms (sigma 0.35 Å) on a ``shape``^2 frame at ``PIXEL_A``, Poisson counts (seeded)."""
    geo = ScanGeometry(fov_A=(shape * PIXEL_A, shape * PIXEL_A), shape_px=(shape, shape), rotation_rad=0.3, dwell_s=1e-6)
    rc = geo.sample_to_pixel(positions_A)
    rr, cc = np.mgrid[0:shape, 0:shape].astype(np.float64)
    img = np.zeros((shape, shape))
    s = 0.35 / PIXEL_A
    for (r, c), w in zip(rc, weights):
        img += w * np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / (2 * s * s))
    return np.random.default_rng(seed).poisson(img * 20.0).astype(np.float64), geo


def lattice_with_defects():
    """Honeycomb with site ``vac`` removed and a 4x brighter atom at ``dop`` (far from the vacancy)."""
    pts = honeycomb()
    centre = int(np.argmin(np.linalg.norm(pts, axis=1)))
    vac_pos = pts[centre]
    dop = int(np.argmin(np.linalg.norm(pts - (vac_pos + np.array([5.0, 3.0])), axis=1)))
    weights = np.ones(len(pts))
    weights[dop] = 4.0
    keep = np.ones(len(pts), dtype=bool)
    keep[centre] = False
    return pts, keep, vac_pos, dop, weights


def test_coordination_is_two_next_to_a_vacancy_and_three_elsewhere() -> None:
    pts, keep, vac_pos, _, _ = lattice_with_defects()
    atoms = pts[keep]
    coord, i, j, w = soft_coordination(atoms, BOND_A)
    d_vac = np.linalg.norm(atoms - vac_pos, axis=1)
    beside = d_vac < 1.1 * BOND_A
    assert beside.sum() == 3
    np.testing.assert_allclose(coord[beside], 2.0)
    # the interior (away from the vacancy and the patch border) is threefold
    interior = ~beside & np.all(np.abs(atoms) < 8.0, axis=1)
    np.testing.assert_allclose(coord[interior], 3.0)
    assert np.all(coord <= 3.0 + 1e-12)
    # pairs are symmetric: every (i, j) also appears as (j, i) with the same weight
    fwd = {(int(a), int(b)): float(x) for a, b, x in zip(i, j, w)}
    assert all(fwd[(b, a)] == x for (a, b), x in fwd.items())
    # a neighbour moved half-way to the second shell counts partly (soft edge)
    moved = atoms.copy()
    k = int(np.flatnonzero(interior)[0])
    nb = j[i == k][0]
    moved[nb] = atoms[k] + (atoms[nb] - atoms[k]) * 1.45
    c2, _, _, _ = soft_coordination(moved, BOND_A)
    assert 2.0 < c2[k] < 3.0


def test_intensities_find_the_dopant_and_the_vacancy_neighbours() -> None:
    pts, keep, vac_pos, dop, weights = lattice_with_defects()
    # the image has no atom at the vacancy; the atom list gives one record for it (as the twin's truth does)
    img, geo = render(pts[keep], weights[keep], seed=1)
    rc = geo.sample_to_pixel(pts)
    f = site_features(img, pts, rc, BOND_A, PIXEL_A)
    inside = np.all(np.abs(pts) < 8.0, axis=1)
    host = inside & keep
    host[dop] = False
    vac = int(np.flatnonzero(~keep)[0])
    beside_vac = inside & (np.linalg.norm(pts - vac_pos, axis=1) < 1.1 * BOND_A) & keep
    beside_dop = inside & (np.linalg.norm(pts - pts[dop], axis=1) < 1.1 * BOND_A)
    beside_dop[dop] = False
    assert np.all(np.abs(f.intensity[host] - np.median(f.intensity[host])) < 0.5)
    assert f.intensity[dop] > 3.0 * np.median(f.intensity[host])
    assert f.intensity[vac] < 0.1 * np.median(f.intensity[host])
    # neighbour statistics: min / mean / max
    assert np.all(f.neighbour_intensity[beside_vac, 0] < 0.1)  # the empty site is their darkest neighbour
    assert np.all(f.neighbour_intensity[beside_dop, 2] > 3.0 * np.median(f.intensity[host]))
    nominal = host & ~beside_vac & ~beside_dop
    assert np.all(f.neighbour_intensity[nominal, 0] > 0.4) and np.all(f.neighbour_intensity[nominal, 2] < 2.0)
    assert np.all(f.neighbour_intensity[:, 0] <= f.neighbour_intensity[:, 1] + 1e-12)
    assert np.all(f.neighbour_intensity[:, 1] <= f.neighbour_intensity[:, 2] + 1e-12)
    # the blocks: widths, weights, the square-root scale of the intensities
    m = f.matrix(["coordination", "intensity", "neighbour_intensity"], {"coordination": 2.0})
    assert m.shape == (len(pts), 5)
    np.testing.assert_allclose(m[:, 0], 2.0 * f.coordination)
    np.testing.assert_allclose(m[host, 1] ** 2, f.intensity[host])


def test_site_intensity_is_subpixel_and_scale_free() -> None:
    centre = np.array([20.3, 30.7])  # not on a pixel
    rr, cc = np.mgrid[0:48, 0:48].astype(np.float64)
    img = np.exp(-((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) / (2 * 1.5**2))
    at = site_intensities(img, centre[None], 1.5)[0]
    shifts = np.array([[dr, dc] for dr in (-0.4, 0.0, 0.4) for dc in (-0.4, 0.0, 0.4) if dr or dc])
    near = site_intensities(img, centre + shifts, 1.5)
    assert np.all(near < at)  # the weighting follows the sub-pixel centre, not the nearest pixel
    np.testing.assert_allclose(site_intensities(7.0 * img, centre[None], 1.5), 7.0 * at)
    # centres on the frame's last half pixel are allowed; a flat frame reads its value everywhere
    corners = np.array([[-0.5, -0.5], [47.5, 47.5], [0.0, 47.4]])
    np.testing.assert_allclose(site_intensities(np.full((48, 48), 3.0), corners, 2.0), 3.0)


def test_stage_with_site_features_outputs_and_clusters_them() -> None:
    pts, keep, _, dop, weights = lattice_with_defects()
    img, geo = render(pts[keep], weights[keep], seed=2)
    frame = Frame(image=img, geometry=geo, line_times_s=geo.line_start_times_s(0.0), index=0, dose_e_per_A2=1e4)
    atoms = Atoms(pts[keep], np.zeros(int(keep.sum()), dtype=int), np.ones(int(keep.sum())), 0)
    stage = EncodingStage(EncodingConfig(seed=0, site_features=["coordination", "intensity", "neighbour_intensity"]))
    out = stage.process(frame, atoms)
    n = len(atoms)
    assert out["coordination"].shape == (n,) and out["site_intensity"].shape == (n,)
    assert out["neighbour_intensity"].shape == (n, 3)
    plain = EncodingStage(EncodingConfig(seed=0, site_features=[], refine_iterations=0)).process(frame, atoms)
    assert "coordination" not in plain
    np.testing.assert_array_equal(plain["zernike_magnitude"], out["zernike_magnitude"])
    enc = out["encoded"]
    dop_k = int(np.flatnonzero(keep)[:dop].size) if keep[dop] else -1
    assert dop_k >= 0 and enc[dop_k]
    host_id = np.bincount(out["motif"][enc]).argmax()
    assert out["motif"][dop_k] != host_id  # the bright site is not host
    # the hierarchy and the library still work on the longer feature vectors; a second frame keeps the ids
    assert "motif_cells" in stage.last_report and stage.last_report["motif_cells"]["types"]
    assert len(stage.library) >= 2
    again = stage.process(frame, atoms)
    assert np.bincount(again["motif"][enc]).argmax() == host_id


def test_site_features_bad_input() -> None:
    pts = honeycomb()
    with pytest.raises(InputError, match="nn_A"):
        soft_coordination(pts, 0.0)
    with pytest.raises(InputError, match="atoms.positions_A"):
        soft_coordination(np.array([[0.0, np.nan]]), BOND_A)
    with pytest.raises(InputError, match=r"atoms.positions_A.shape"):
        soft_coordination(np.zeros((0, 2)), BOND_A)
    with pytest.raises(InputError, match="coordination_shell"):
        soft_coordination(pts, BOND_A, inner=1.5, outer=1.2)
    img = np.ones((32, 32))
    with pytest.raises(InputError, match=r"atoms.pixels_rc\[0\]"):
        site_intensities(img, np.array([[40.0, 3.0]]), 2.0)
    with pytest.raises(InputError, match="sigma_px"):
        site_intensities(img, np.array([[4.0, 3.0]]), -1.0)
    with pytest.raises(InputError, match="frame.image.shape"):
        site_intensities(np.ones(5), np.array([[1.0, 1.0]]), 1.0)
    with pytest.raises(InputError, match="pixels_rc.shape"):
        site_features(img, pts[:3], pts[:2], BOND_A, PIXEL_A)
    with pytest.raises(ValidationError, match="site_features"):
        EncodingConfig(site_features=["coordination", "coordination"])
    with pytest.raises(ValidationError, match="site_features"):
        EncodingConfig(site_features=["colour"])
    with pytest.raises(ValidationError, match="coordination_shell"):
        EncodingConfig(coordination_shell=(1.5, 1.2))
    with pytest.raises(ValidationError, match="intensity_weight"):
        EncodingConfig(intensity_weight=-1.0)


def test_a_run_config_asks_for_site_features_and_the_policy_sees_them() -> None:
    from stemagent.agent.app.factory import build_encoding
    from stemagent.config import config_from_dict
    from stemagent.stages import Observation

    cfg = config_from_dict({"pipeline": {"segmenter": {"kind": "log"},
                                         "encoding": {"site_features": ["coordination", "intensity"], "refine_iterations": 2}}})
    adapter = build_encoding(cfg)
    assert adapter.stage.config.site_features == ["coordination", "intensity"]
    assert adapter.stage.config.refine_iterations == 2
    pts, keep, _, _, weights = lattice_with_defects()
    img, geo = render(pts[keep], weights[keep], seed=4)
    frame = Frame(image=img, geometry=geo, line_times_s=geo.line_start_times_s(0.0), index=0, dose_e_per_A2=1e4)
    atoms = Atoms(pts[keep], np.zeros(int(keep.sum()), dtype=int), np.ones(int(keep.sum())), 0)
    obs = adapter.process(Observation(frame_index=0, time_s=0.0, geometry=geo, atoms=atoms, frame=frame))
    n = len(atoms)
    assert obs.atom_features["coordination"].shape == (n,) and obs.atom_features["neighbour_intensity"].shape == (n, 3)
    assert np.sum(np.abs(obs.atom_features["coordination"] - 2.0) < 1e-9) >= 3  # the vacancy's three neighbours


def test_intensity_transforms() -> None:
    v = np.array([0.0, 0.5, 1.0, 4.0])
    np.testing.assert_allclose(transform_intensity(v, "sqrt"), np.sqrt(v))
    logv = transform_intensity(v, "log")
    np.testing.assert_allclose(logv, np.log(v + 0.05))
    # the log stretches the dark end: an empty site lies further below a half-dark one than in sqrt
    assert (logv[1] - logv[0]) / (logv[2] - logv[1]) > (np.sqrt(0.5) - 0.0) / (1.0 - np.sqrt(0.5))
    np.testing.assert_allclose(transform_intensity(np.array([-1.0]), "sqrt"), 0.0)  # negative counts clip
    with pytest.raises(InputError, match="intensity_transform"):
        transform_intensity(v, "cube")
    pts = honeycomb()
    img, geo = render(pts, np.ones(len(pts)), shape=128, seed=5)
    with pytest.raises(InputError, match="intensity_transform"):
        site_features(img, pts, geo.sample_to_pixel(pts), BOND_A, PIXEL_A, transform="cube")
    f = site_features(img, pts, geo.sample_to_pixel(pts), BOND_A, PIXEL_A, transform="log")
    ok = np.isfinite(f.intensity)
    np.testing.assert_allclose(f.block("intensity")[ok, 0], np.log(f.intensity[ok] + 0.05))
    with pytest.raises(ValidationError, match="intensity_transform"):
        EncodingConfig(intensity_transform="cube")
