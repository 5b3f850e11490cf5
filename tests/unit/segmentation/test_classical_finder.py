import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemagent import Frame, ScanGeometry
from stemagent.errors import InputError
from stemagent.segmentation.classical import LoGFinder


def _gaussians(geometry: ScanGeometry, positions_A: np.ndarray, sigma_A: float, amplitude=1.0) -> np.ndarray:
    rows, cols = geometry.shape_px
    rr, cc = np.mgrid[0:rows, 0:cols]
    rc = geometry.sample_to_pixel(positions_A)
    s = sigma_A / geometry.pixel_size_A[0]
    img = np.zeros((rows, cols))
    for r, c in rc:
        img += amplitude * np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / (2 * s**2))
    return img


@pytest.mark.parametrize("rotation", [0.0, 0.4])
def test_exact_on_isolated_gaussians(rotation):
    rng = np.random.default_rng(3)
    g = ScanGeometry(center_A=(4.0, -2.0), fov_A=(25.6, 25.6), shape_px=(256, 256), rotation_rad=rotation)
    gx, gy = np.meshgrid(np.arange(-7, 8, 3.5), np.arange(-7, 8, 3.5))  # kept 3 Å clear of the edges
    truth = np.stack([gx.ravel(), gy.ravel()], 1) + g.center_A + rng.uniform(-0.5, 0.5, (gx.size, 2))
    frame = Frame(_gaussians(g, truth, 0.45), g, g.line_start_times_s(0), 0, 1.0)
    atoms = LoGFinder(sigma_A=0.45).find(frame)
    assert len(atoms) == len(truth)
    d, _ = cKDTree(truth).query(atoms.positions_A)
    assert d.max() < 1e-4  # Å: exact up to the tails of neighbours 3.5 Å away


def test_refinement_beats_integer_peaks():
    rng = np.random.default_rng(4)
    g = ScanGeometry(fov_A=(25.6, 25.6), shape_px=(128, 128))  # 0.2 Å/px: integer peaks are coarse
    gx, gy = np.meshgrid(np.arange(-9, 10, 4.5), np.arange(-9, 10, 4.5))
    truth = np.stack([gx.ravel(), gy.ravel()], 1) + rng.uniform(-0.5, 0.5, (gx.size, 2))
    frame = Frame(_gaussians(g, truth, 0.5), g, g.line_start_times_s(0), 0, 1.0)
    errs = {}
    for refine in ("none", "centroid", "gaussian"):
        d, _ = cKDTree(truth).query(LoGFinder(sigma_A=0.5, refine=refine).find(frame).positions_A)
        errs[refine] = float(np.sqrt(np.mean(d**2)))
    assert errs["gaussian"] < 0.1 * errs["none"]
    assert errs["centroid"] < errs["none"]


def test_finds_lattice_in_noisy_twin_frame():
    import asyncio

    from stemagent.config import MinimalTwinConfig
    from stemagent.simulators.minimal import MinimalTwinDriver

    twin = MinimalTwinDriver(MinimalTwinConfig(), seed=11)
    g = ScanGeometry(center_A=(3.0, 5.0), fov_A=(25.6, 25.6), shape_px=(256, 256), dwell_s=4e-6)

    async def grab():
        await twin.connect()
        return await twin.acquire(g)

    frame = asyncio.run(grab())
    atoms = LoGFinder(sigma_A=0.45, threshold=0.15).find(frame)
    truth = twin.ground_truth_positions(g, margin_A=1.0)
    d, _ = cKDTree(atoms.positions_A).query(truth)
    recall = float(np.mean(d < 0.5))
    d2, _ = cKDTree(twin.atoms_A).query(atoms.positions_A)
    precision = float(np.mean(d2 < 0.5))
    assert recall > 0.97 and precision > 0.97
    assert np.sqrt(np.mean(d[d < 0.5] ** 2)) < 0.15  # Å
    # times come from the scan line each atom was acquired on
    assert atoms.times_s is not None and np.all(np.diff(frame.line_times_s) > 0)
    assert atoms.times_s.min() >= frame.start_time_s and atoms.times_s.max() <= frame.end_time_s


@pytest.mark.parametrize(
    "image, field",
    [
        (np.full((16, 16), np.nan), "frame.image[0,0]"),
        (np.zeros((16,)), "frame.image.shape"),
        (np.zeros((2, 2)), "frame.image.shape"),
        (np.zeros((8, 8), dtype=complex), "frame.image.dtype"),
    ],
)
def test_bad_images_are_named(image, field):
    with pytest.raises(InputError) as err:
        LoGFinder().find_pixels(image, 0.1)
    assert err.value.field == field


def test_empty_frame_has_no_atoms():
    g = ScanGeometry(shape_px=(32, 32))
    atoms = LoGFinder().find(Frame(np.zeros((32, 32), np.float32), g, g.line_start_times_s(0), 0, 0.0))
    assert len(atoms) == 0


@pytest.mark.parametrize("level", [3.0, 1e4])
def test_a_flat_field_has_no_atoms(level):
    # a constant frame: the LoG's response is float rounding only (it gave hundreds of atoms before)
    g = ScanGeometry(shape_px=(96, 96), fov_A=(19.2, 19.2))
    atoms = LoGFinder().find(Frame(np.full((96, 96), level, np.float32), g, g.line_start_times_s(0), 0, 0.0))
    assert len(atoms) == 0


def _suppress_brute(points, strength, d):
    kept = []
    for i in np.argsort(-strength, kind="stable"):
        if all(np.hypot(*(points[i] - points[j])) > d for j in kept):
            kept.append(i)
    return np.sort(kept)


@pytest.mark.parametrize("seed", range(5))
def test_suppression_matches_brute_force(seed):
    from stemagent.segmentation.classical import suppress_close

    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 30, size=(200, 2))
    strength = rng.random(200)
    np.testing.assert_array_equal(suppress_close(pts, strength, 2.0), _suppress_brute(pts, strength, 2.0))


def test_dim_neighbour_beside_a_bright_atom_is_found():
    # a column 1.8 Å from one 3x brighter: a wide maximum filter would hide it behind the
    # bright atom's shoulder although min_separation_A is only 1.4 Å
    g = ScanGeometry(fov_A=(12.8, 12.8), shape_px=(64, 64))
    truth = np.array([[0.0, 0.0], [1.8, 0.0]])
    img = _gaussians(g, truth[:1], 0.5, 3.0) + _gaussians(g, truth[1:], 0.5, 1.0)
    atoms = LoGFinder(sigma_A=0.5, threshold=0.1, min_separation_A=1.4).find(Frame(img, g, g.line_start_times_s(0), 0, 1.0))
    assert len(atoms) == 2
    d, _ = cKDTree(truth).query(atoms.positions_A)
    assert d.max() < 0.1
