import math

import numpy as np
import pytest

from stemagent import Atoms, Frame, Park, ScanGeometry
from stemagent.errors import InputError
from stemagent.codec import decode_command, encode_command
from stemagent.types import Blank, ScanRegion, dose_e_per_A2


@pytest.mark.parametrize("rotation", [0.0, 0.3, -1.2, math.pi / 2])
def test_pixel_sample_round_trip(rotation):
    g = ScanGeometry(center_A=(12.5, -3.0), fov_A=(40.0, 20.0), shape_px=(100, 200), rotation_rad=rotation)
    rng = np.random.default_rng(1)
    rc = rng.uniform(-5, 250, size=(50, 2))
    np.testing.assert_allclose(g.sample_to_pixel(g.pixel_to_sample(rc)), rc, atol=1e-9)


def test_pixel_to_sample_axes_and_centre():
    g = ScanGeometry(center_A=(5.0, 7.0), fov_A=(10.0, 10.0), shape_px=(11, 11))
    # the middle pixel is the scan centre; +1 column is +x, +1 row is +y
    np.testing.assert_allclose(g.pixel_to_sample([[5, 5]]), [[5.0, 7.0]])
    np.testing.assert_allclose(g.pixel_to_sample([[5, 6]]) - g.pixel_to_sample([[5, 5]]), [[10 / 11, 0.0]])
    np.testing.assert_allclose(g.pixel_to_sample([[6, 5]]) - g.pixel_to_sample([[5, 5]]), [[0.0, 10 / 11]])
    rotated = ScanGeometry(center_A=(0, 0), fov_A=(10.0, 10.0), shape_px=(11, 11), rotation_rad=math.pi / 2)
    np.testing.assert_allclose(rotated.pixel_to_sample([[5, 6]]), [[0.0, 10 / 11]], atol=1e-12)


def test_times_follow_the_raster():
    g = ScanGeometry(shape_px=(4, 3), dwell_s=1e-3, flyback_s=5e-3)
    assert g.line_time_s == pytest.approx(8e-3)
    t = g.pixel_times_s(start_s=10.0)
    assert t[0, 0] == 10.0
    assert t[0, 2] == pytest.approx(10.002)
    assert t[1, 0] == pytest.approx(10.008)
    assert g.frame_time_s == pytest.approx(0.032)
    f = Frame(np.zeros((4, 3), np.float32), g, g.line_start_times_s(10.0), 0, 1.0)
    np.testing.assert_allclose(f.pixel_times_s(), t)
    assert f.end_time_s == pytest.approx(10.032)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"shape_px": (0, 5)}, "shape_px"),
        ({"fov_A": (-1.0, 5.0)}, "fov_A"),
        ({"fov_A": (float("nan"), 5.0)}, "fov_A"),
        ({"dwell_s": 0.0}, "dwell_s"),
        ({"flyback_s": -1.0}, "flyback_s"),
    ],
)
def test_bad_geometry_names_the_field(kwargs, field):
    with pytest.raises(InputError) as err:
        ScanGeometry(**kwargs)
    assert err.value.field == field
    assert field in str(err.value)


def test_frame_checks_shapes():
    g = ScanGeometry(shape_px=(8, 8))
    with pytest.raises(InputError, match="image.shape"):
        Frame(np.zeros((8, 9)), g, g.line_start_times_s(0), 0, 1.0)
    with pytest.raises(InputError, match="line_times_s"):
        Frame(np.zeros((8, 8)), g, np.zeros(7), 0, 1.0)
    with pytest.raises(InputError, match="dose"):
        Frame(np.zeros((8, 8)), g, g.line_start_times_s(0), 0, -1.0)


def test_atoms_checks_and_filters():
    a = Atoms(np.array([[0, 0], [1, 1], [2, 2]]), [0, 1, 1], [0.9, 0.8, 0.7], 3, class_names=("C", "Si"))
    si = a.of_class("Si")
    assert len(si) == 2
    np.testing.assert_array_equal(si.positions_A, [[1, 1], [2, 2]])
    with pytest.raises(InputError, match="classes"):
        Atoms(np.zeros((2, 2)), [0, 2], [1, 1], 0, class_names=("C", "Si"))
    with pytest.raises(InputError, match="confidence"):
        Atoms(np.zeros((2, 2)), [0, 0], [1], 0)


def test_commands_round_trip_and_reject_bad_values():
    g = ScanGeometry(center_A=(1.0, 2.0), shape_px=(64, 64))
    for cmd in (ScanRegion(g), Park((1.5, -2.0), 0.25), Blank()):
        assert decode_command(encode_command(cmd)) == cmd
    with pytest.raises(InputError, match="dwell_s"):
        Park((0.0, 0.0), -1.0)
    with pytest.raises(InputError, match="position_A"):
        Park((float("inf"), 0.0), 1.0)
    with pytest.raises(InputError, match="kind"):
        decode_command({"kind": "teleport"})


def test_dose_from_current_and_dwell():
    # 1 pA for 1 s over 1 Å² is 6.24e6 electrons per Å²
    assert dose_e_per_A2(1.0, 1.0, 1.0) == pytest.approx(6.2415e6, rel=1e-4)
    assert dose_e_per_A2(20.0, 1e-6, 0.01) == pytest.approx(20 * 6.2415e6 * 1e-6 / 0.01, rel=1e-4)
