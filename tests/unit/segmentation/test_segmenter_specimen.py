"""The specimen prior: classes restricted to the specimen's; ``auto`` says what it chose (issue 12 item 4)."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.errors import InputError
from stemagent.segmentation.metrics import match
from stemagent.segmentation.unet_segmenter import SPECIMEN_CLASSES, UNetSegmenter
from stemagent.simulators import render_sample
from stemagent.types import Frame, ScanGeometry
from tests.unit.segmentation.test_segmenter_detector_model import twin

GEOM = ScanGeometry(fov_A=(25.6, 25.6), shape_px=(256, 256), dwell_s=2e-6)


def frame_of(image: np.ndarray) -> Frame:
    return Frame(image=image, geometry=GEOM, line_times_s=GEOM.line_start_times_s(0.0), index=0, dose_e_per_A2=1e3)


@pytest.fixture(scope="module")
def seg() -> UNetSegmenter:
    return UNetSegmenter(device="cpu")


def names_of(atoms) -> set[str]:  # type: ignore[no-untyped-def]
    return {atoms.class_names[c] for c in atoms.classes}


def test_auto_keeps_tmd_classes_off_graphene_and_graphene_classes_off_mos2(seg: UNetSegmenter) -> None:
    # at low dose the one network for all specimens put a chalcogen on graphene and carbons on MoS2
    img, _ = render_sample("graphene", GEOM, 1e3, np.random.default_rng(1))
    atoms = seg.find(frame_of(img))
    assert seg.last_report["specimen"] == "graphene" and "auto" in seg.last_report["specimen_choice"]
    assert names_of(atoms) <= set(SPECIMEN_CLASSES["graphene"]) and len(atoms) > 200
    atoms = seg.find(frame_of(twin("mos2", 1e3, "analog uint16, offset 200")))
    assert seg.last_report["specimen"] == "tmd"
    assert names_of(atoms) <= set(SPECIMEN_CLASSES["tmd"]) and len(atoms) > 120


def test_a_configured_specimen_is_obeyed() -> None:
    img, _ = render_sample("graphene", GEOM, 1e4, np.random.default_rng(3))
    seg = UNetSegmenter(device="cpu", specimen="graphene")
    atoms = seg.find(frame_of(img))
    assert seg.last_report["specimen_choice"] == "configured" and names_of(atoms) <= {"C", "Si", "vacancy"}


def test_auto_reads_a_perovskite_and_finds_its_a_and_b_columns(seg: UNetSegmenter) -> None:
    img, truth = render_sample("srtio3", GEOM, 1e4, np.random.default_rng(1))
    atoms = seg.find(frame_of(img))
    assert seg.last_report["specimen"] == "perovskite" and "square lattice" in seg.last_report["specimen_choice"]
    assert atoms.class_names[:2] == ("A", "B")
    inner_t, inner_p = GEOM.contains(truth.positions_A, 1.0), GEOM.contains(atoms.positions_A, 1.0)
    m = match(atoms.positions_A, atoms.classes, truth.positions_A, truth.labels, count_pred=inner_p, count_true=inner_t)
    for k in (0, 1):  # A and B: every column found and classed, none wrong
        assert m.tp.get(k, 0) >= 30 and m.fp.get(k, 0) == 0 and m.fn.get(k, 0) == 0, (k, m.tp, m.fp, m.fn)


def test_an_unknown_specimen_is_an_input_error() -> None:
    with pytest.raises(InputError, match="specimen"):
        UNetSegmenter(device="cpu", specimen="diamond")
