"""Counting vs analog from an image's statistics (offset, variance-to-mean, quantisation), not its dtype."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.segmentation.detector import estimate_detector
from stemagent.simulators import render_sample
from stemagent.simulators.scan import DetectorModel
from stemagent.types import ScanGeometry

DEFECT_FREE = {"graphene": {"si_per_nm2": 0.0, "vacancy_per_nm2": 0.0}, "mos2": {"vacancy_fraction": 0.0, "substitution_fraction": 0.0}}
# (name, detector, stored as): like real scan-generator outputs
DETECTORS = {
    "counting uint16": (DetectorModel(), "uint16"),
    "analog float": (DetectorModel(gain=7.3, offset=12.5, read_noise=3.0), None),
    "analog uint32, offset 3e6": (DetectorModel(gain=40.0, offset=3e6, read_noise=20.0), "uint32"),
    "analog uint16, offset 200": (DetectorModel(gain=3.0, offset=200.0, read_noise=4.0), "uint16"),
}


def twin(kind: str, dose: float, detector: str, seed: int = 5, size: int = 256) -> np.ndarray:
    det, dtype = DETECTORS[detector]
    g = ScanGeometry(fov_A=(size * 0.1,) * 2, shape_px=(size, size), dwell_s=2e-6)
    img, _ = render_sample(kind, g, dose, np.random.default_rng(seed), detector=det, specimen_options=DEFECT_FREE[kind])
    return img if dtype is None else np.clip(np.rint(img), 0, None).astype(dtype)


@pytest.mark.parametrize("kind", ["graphene", "mos2"])
@pytest.mark.parametrize("dose", [1e3, 1e5])
@pytest.mark.parametrize("detector", list(DETECTORS))
def test_counting_or_analog_is_read_from_the_statistics(kind: str, dose: float, detector: str) -> None:
    est = estimate_detector(twin(kind, dose, detector))
    assert est.kind == ("counting" if detector.startswith("counting") else "analog"), est.describe()
    if detector == "analog uint32, offset 3e6":  # whole numbers, yet far from electrons
        assert est.whole_numbers and abs(est.offset - 3e6) < 300 and est.gain > 3


def test_whole_numbers_with_a_step_above_one_are_not_counts() -> None:
    img = twin("mos2", 1e5, "counting uint16").astype(np.int64) * 4  # a gain of 4, no read noise
    est = estimate_detector(img)
    assert est.kind == "analog" and est.quantum == 4 and est.gain == pytest.approx(4, rel=0.3)


def test_a_constant_image_is_unknown_and_left_as_it_is() -> None:
    est = estimate_detector(np.full((64, 64), 7, np.uint16))
    assert est.kind == "unknown" and np.all(est.to_electrons(np.full((4, 4), 7.0)) == 7.0)
