"""A frame unlike the trained specimens is said to be so, a fallback can be chosen, and no atom
is ever reported outside the frame (issue 12 item 5)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from stemagent.pipeline import SegmentStage
from stemagent.segmentation.ood import frame_check
from stemagent.segmentation.unet_segmenter import UNetSegmenter
from stemagent.simulators import render_sample
from stemagent.simulators.nanoparticle import gold_nanoparticle
from stemagent.simulators.render import render_frame
from stemagent.stages import Observation, no_atoms
from stemagent.types import Frame, ScanGeometry

GEOM = ScanGeometry(fov_A=(25.6, 25.6), shape_px=(256, 256), dwell_s=2e-6)


def frame_of(image: np.ndarray, index: int = 0) -> Frame:
    return Frame(image=image, geometry=GEOM, line_times_s=GEOM.line_start_times_s(0.0), index=index, dose_e_per_A2=1e4)


@pytest.fixture(scope="module")
def seg() -> UNetSegmenter:
    return UNetSegmenter(device="cpu")


def gold_frame(seed: int = 2) -> Frame:
    # a 9 Å-radius Au particle down [001] on vacuum, 1e4 e/Å2: nothing like graphene or a TMD
    img, _ = render_frame(gold_nanoparticle(radius_A=9.0), GEOM, 1e4 * 0.01, np.random.default_rng(seed))
    return frame_of(img)


def test_no_atom_is_reported_outside_the_frame(seg: UNetSegmenter) -> None:
    # on main the Gaussian fit pushed edge columns of this frame outside it (4 atoms)
    for kind, dose, seed in (("graphene", 1e5, 1), ("graphene", 1e4, 1), ("ws2", 1e4, 1)):
        img, _ = render_sample(kind, GEOM, dose, np.random.default_rng(seed))
        atoms = seg.find(frame_of(img))
        assert len(atoms) > 100
        assert GEOM.contains(atoms.positions_A).all(), (kind, dose, int((~GEOM.contains(atoms.positions_A)).sum()))


@pytest.mark.parametrize(("kind", "dose"), [("graphene", 1e3), ("mos2", 1e4), ("mose2", 1e4)])
def test_trained_specimens_are_typical(seg: UNetSegmenter, kind: str, dose: float, caplog: pytest.LogCaptureFixture) -> None:
    img, _ = render_sample(kind, GEOM, dose, np.random.default_rng(1))
    with caplog.at_level(logging.WARNING, logger="stemagent.segmentation"):
        seg.find(frame_of(img))
    check = seg.last_report["check"]
    assert check["typical"] and check["ood_score"] < 0.5, check
    assert not caplog.records


def test_a_gold_particle_is_flagged_and_the_log_fallback_replaces_the_networks_atoms(seg: UNetSegmenter, caplog: pytest.LogCaptureFixture) -> None:
    frame = gold_frame()
    with caplog.at_level(logging.WARNING, logger="stemagent.segmentation"):
        atoms = seg.find(frame)
    check = seg.last_report["check"]
    assert not check["typical"] and check["ood_score"] >= 1.0
    assert any("unlike the trained specimens" in r.getMessage() for r in caplog.records)
    assert atoms.class_names == seg.class_names  # "warn" keeps the network's atoms
    fallback = UNetSegmenter(device="cpu", ood_fallback="log")
    atoms = fallback.find(frame)
    assert fallback.last_report["fallback"] == "log"
    assert atoms.class_names == ("atom",) and len(atoms) > 20
    assert GEOM.contains(atoms.positions_A).all()
    # the LoG atoms sit on the particle (radius 9 Å about the centre), not at the frame's edge
    assert np.median(np.hypot(*atoms.positions_A.T)) < 9.0


def test_the_check_goes_into_the_segment_stages_record(seg: UNetSegmenter) -> None:
    frame = gold_frame()
    obs = Observation(frame_index=0, time_s=0.0, geometry=GEOM, atoms=no_atoms(0), frame=frame)
    obs = SegmentStage(seg).process(obs)
    report = obs.records["segment"]["report"]
    assert report["check"]["typical"] is False and report["detector_kind"] == "counting"


def test_too_few_atoms_is_atypical() -> None:
    c = frame_check(np.array([[10.0, 10.0], [20.0, 20.0]]), (0.1, 0.1), (256, 256))
    assert not c.typical and "too few atoms" in c.reason
