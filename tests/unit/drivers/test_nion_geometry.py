"""Units and axes between stemagent and Nion (drivers/nion/geometry.py) and the backend's options.

Pure conversions: no Nion package needed. The Nion-shaped inputs (calibrations, metadata) are
written the way nionswift-instrumentation 23.6 writes them for a scan."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from stemagent.drivers.nion import geometry as ng
from stemagent.drivers.nion import make_driver
from stemagent.errors import ConfigError, InputError
from stemagent.types import ScanGeometry


def nion_scan(fp: dict, line_time_us: float | None = None) -> tuple[list[tuple[float, str]], dict, dict]:
    """Calibrations and metadata as Nion's scan hardware source makes them for frame parameters ``fp``."""
    rows, cols = fp["pixel_size"]
    pixel_nm = fp["fov_nm"] / max(rows, cols)
    cy, cx = fp["center_nm"]
    scan = {"center_x_nm": cx, "center_y_nm": cy, "fov_nm": fp["fov_nm"], "rotation": fp["rotation_rad"],
            "valid_rows": rows}
    det = {"pixel_time_us": fp["pixel_time_us"], "line_time_us": line_time_us or fp["pixel_time_us"] * cols}
    # Nion's offsets (-center - scale * n / 2) are not used; only the scales are
    return [(pixel_nm, "nm"), (pixel_nm, "nm")], scan, det


def test_frame_parameters_in_nions_units_and_axis_order() -> None:
    g = ScanGeometry(center_A=(12.3, -4.5), fov_A=(25.6, 25.6), shape_px=(256, 256), rotation_rad=0.25, dwell_s=4e-6)
    fp = ng.frame_parameters(g)
    assert fp["center_nm"] == pytest.approx((-0.45, 1.23))  # (y, x) in nm
    assert fp["fov_nm"] == pytest.approx(2.56) and fp["pixel_size"] == (256, 256)
    assert fp["pixel_time_us"] == pytest.approx(4.0) and fp["rotation_rad"] == 0.25
    # a non-square frame of square pixels: Nion's fov_nm is the larger extent
    tall = ScanGeometry(fov_A=(25.6, 51.2), shape_px=(512, 256))
    assert ng.frame_parameters(tall)["fov_nm"] == pytest.approx(5.12)
    with pytest.raises(InputError, match="geometry.fov_A.*square pixels"):
        ng.frame_parameters(ScanGeometry(fov_A=(25.6, 30.0), shape_px=(256, 256)))


@pytest.mark.parametrize("shape", [(256, 256), (128, 256), (300, 100)])
def test_round_trip_through_nions_calibrations_and_metadata(shape: tuple[int, int]) -> None:
    rows, cols = shape
    g = ScanGeometry(center_A=(-7.0, 3.5), fov_A=(0.1 * cols, 0.1 * rows), shape_px=shape, rotation_rad=-0.4, dwell_s=2e-6)
    fp = ng.frame_parameters(g)
    back = ng.geometry_from_scan(shape, *nion_scan(fp))
    assert ng.same_geometry(g, back)
    assert back.pixel_size_A == pytest.approx((0.1, 0.1))
    # a device that adds a flyback and rounds the pixel time reports a different geometry
    fp_dev = {**fp, "pixel_time_us": 2.1}
    other = ng.geometry_from_scan(shape, *nion_scan(fp_dev, line_time_us=2.1 * cols + 30.0))
    assert other.flyback_s == pytest.approx(30e-6) and other.dwell_s == pytest.approx(2.1e-6)
    assert not ng.same_geometry(g, other)


def test_calibration_units_and_bad_metadata() -> None:
    fp = ng.frame_parameters(ScanGeometry(fov_A=(10.0, 10.0), shape_px=(100, 100)))
    cal, scan, det = nion_scan(fp)
    in_um = ng.geometry_from_scan((100, 100), [(c[0] / 1000, "µm") for c in cal], scan, det)
    assert in_um.fov_A == pytest.approx((10.0, 10.0))
    with pytest.raises(InputError, match="calibrations\\[0\\].units"):
        ng.geometry_from_scan((100, 100), [(1.0, "px"), cal[1]], scan, det)
    with pytest.raises(InputError, match="metadata"):
        ng.geometry_from_scan((100, 100), cal, {"fov_nm": 1.0}, det)


def test_probe_fraction_origin_top_left_y_first() -> None:
    g = ScanGeometry(center_A=(10.0, -5.0), fov_A=(20.0, 20.0), shape_px=(100, 100))
    assert ng.probe_fraction(g, (10.0, -5.0)) == pytest.approx((0.5, 0.5))
    # the centre of the top-left pixel (row 0: smallest y; col 0: smallest x)
    assert ng.probe_fraction(g, (0.1, -14.9)) == pytest.approx((0.005, 0.005))
    # +x moves along the fast axis: the second number
    assert ng.probe_fraction(g, (15.0, -5.0)) == pytest.approx((0.5, 0.75))
    # a scan turned by 90 degrees: +y is now along the fast axis
    turned = ScanGeometry(center_A=(10.0, -5.0), fov_A=(20.0, 20.0), shape_px=(100, 100), rotation_rad=np.pi / 2)
    assert ng.probe_fraction(turned, (10.0, 0.0)) == pytest.approx((0.5, 0.75))
    with pytest.raises(InputError, match="position_A.*outside the last scanned field"):
        ng.probe_fraction(g, (25.0, -5.0))


def test_probe_fraction_round_trip() -> None:
    rng = np.random.default_rng(4)
    for _ in range(50):
        g = ScanGeometry(center_A=tuple(rng.uniform(-50, 50, 2)), fov_A=(30.0, 15.0), shape_px=(50, 100),
                         rotation_rad=float(rng.uniform(-3, 3)))
        p = tuple(g.pixel_to_sample(rng.uniform([0, 0], [49, 99], (1, 2)))[0])
        assert ng.position_from_fraction(g, ng.probe_fraction(g, p)) == pytest.approx(p, abs=1e-9)


def test_nion_timestamps_on_the_monotonic_clock() -> None:
    now_mono, now_epoch = 1000.0, 1_700_000_000.0
    stamp = dt.datetime.fromtimestamp(now_epoch - 0.25, tz=dt.UTC).replace(tzinfo=None)  # Nion: naive UTC
    end = ng.monotonic_of(stamp, now_mono, now_epoch)
    assert end == pytest.approx(999.75)
    g = ScanGeometry(shape_px=(100, 100), dwell_s=1e-5)  # 0.1 s
    assert ng.frame_start_s(end, g, called_s=999.5) == pytest.approx(999.65)
    assert ng.frame_start_s(end, g, called_s=999.7) == pytest.approx(999.7)  # never before the call


@pytest.mark.parametrize("options,field", [
    ({"mode": "console"}, "mode"),
    ({"usim": {"twin": {"specimen": "gold"}}}, "usim.twin.specimen"),
    ({"usim": {"generator": "twin", "speed": 2}}, "usim.speed"),
    ({"call_timeout_s": 0}, "call_timeout_s"),
    ({"beam_current_pA": -1}, "beam_current_pA"),
])
def test_bad_adapter_options_name_the_field(options: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"adapter_options: {field.replace('.', '[.]')}="):
        make_driver(**options)
