"""The backend's axes and units against Nion's own renderer: usim's built-in sample, no twin.

The twin generator and the backend are both ours; this test has none of our rendering in it.
usim draws its sample (flakes, or the test sample's discs) for the scan it runs, with its own
idea of centre, rotation and pixel size. A wide reference frame and a smaller, shifted, rotated
frame are acquired through the backend; each pixel of the second is predicted from the first by
mapping it through the two frames' geometries (``ScanGeometry.pixel_to_sample`` and back). Only
the right convention predicts it: a flipped rotation, a centre with the wrong sign or swapped
x and y do not.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("nion.usim_device", reason="the Nion packages are not installed: pip install 'stemagent[nion]'")

from stemagent.drivers.nion import make_driver  # noqa: E402
from stemagent.types import ScanGeometry  # noqa: E402

pytestmark = [pytest.mark.system, pytest.mark.slow]


def predict(reference: np.ndarray, g_ref: ScanGeometry, g: ScanGeometry) -> np.ndarray:
    """``g``'s image as the reference frame says it looks (NaN outside the reference)."""
    rows, cols = g.shape_px
    rc = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), axis=-1).reshape(-1, 2)
    rc_ref = g_ref.sample_to_pixel(g.pixel_to_sample(rc))
    return ndimage.map_coordinates(reference, rc_ref.T, order=1, cval=np.nan).reshape(rows, cols)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    m = np.isfinite(a) & np.isfinite(b)
    x, y = a[m] - a[m].mean(), b[m] - b[m].mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


@pytest.fixture
async def nion() -> AsyncIterator[Any]:
    # usim's sample 0: flakes, rectangles of several heights with nothing symmetric about them
    driver = make_driver(mode="usim", usim={"generator": "sample", "sample_index": 0})
    await driver.connect()
    try:
        yield driver
    finally:
        await driver.close()


async def test_geometry_matches_usims_own_rendering(nion: Any) -> None:
    caps = await nion.capabilities()
    assert caps.max_fov_A == pytest.approx(16000.0)  # usim's scan device: 1600 nm, read from the device
    assert caps.beam_current_pA == pytest.approx(200.0) and caps.beam_energy_keV == pytest.approx(100.0)
    g_ref = ScanGeometry(fov_A=(2000.0, 2000.0), shape_px=(200, 200), dwell_s=1e-6)
    reference = ndimage.gaussian_filter((await nion.acquire(g_ref)).image, 1.0)
    g = ScanGeometry(center_A=(300.0, -150.0), fov_A=(1000.0, 1000.0), shape_px=(128, 128), rotation_rad=0.5, dwell_s=1e-6)
    frame = await nion.acquire(g)
    assert frame.geometry == g
    image = ndimage.gaussian_filter(frame.image, 0.5)
    right = ncc(predict(reference, g_ref, g), image)
    assert right > 0.8, right
    wrong = {
        "rotation sign": ScanGeometry(center_A=g.center_A, fov_A=g.fov_A, shape_px=g.shape_px, rotation_rad=-0.5),
        "x sign": ScanGeometry(center_A=(-300.0, -150.0), fov_A=g.fov_A, shape_px=g.shape_px, rotation_rad=0.5),
        "y sign": ScanGeometry(center_A=(300.0, 150.0), fov_A=g.fov_A, shape_px=g.shape_px, rotation_rad=0.5),
        "x and y swapped": ScanGeometry(center_A=(-150.0, 300.0), fov_A=g.fov_A, shape_px=g.shape_px, rotation_rad=0.5),
        "field twice as large": ScanGeometry(center_A=g.center_A, fov_A=(2000.0, 2000.0), shape_px=g.shape_px, rotation_rad=0.5),
    }
    for name, w in wrong.items():
        assert ncc(predict(reference, g_ref, w), image) < 0.5 * right, name
    # the image itself, mirrored, is not predicted either (an axis flip in the read-out)
    assert ncc(predict(reference, g_ref, g), image[:, ::-1]) < 0.5 * right
