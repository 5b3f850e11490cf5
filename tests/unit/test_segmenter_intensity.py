"""Column classes from fitted intensities (per-frame composition-level mixture)."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.errors import InputError
from stemagent.segmentation.intensity import classify_by_intensity

NAMES = ("C", "Si", "vacancy", "metal", "chalcogen", "substituted", "column-vacancy")
CH, SUB, CV = NAMES.index("chalcogen"), NAMES.index("substituted"), NAMES.index("column-vacancy")


def tmd_columns(rng: np.random.Generator, x_counts: float, y_counts: float) -> tuple[np.ndarray, np.ndarray]:
    """Poisson intensities and true classes of a chalcogen sublattice: S2, SSe, S, Se columns."""
    comp = [("XX", CH, 300), ("XY", SUB, 30), ("X", CV, 30), ("Y", CV, 4)]
    level = {"XX": 2 * x_counts, "XY": x_counts + y_counts, "X": x_counts, "Y": y_counts}
    v, c = [], []
    for key, cls, n in comp:
        v.append(rng.poisson(level[key], n).astype(float))
        c.append(np.full(n, cls))
    return np.concatenate(v), np.concatenate(c)


def probs_for(classes: np.ndarray, p_own: float) -> np.ndarray:
    """Network class probabilities: ``p_own`` on the given class, the rest spread over the family."""
    p = np.zeros((len(classes), len(NAMES)))
    fam = [CH, SUB, CV]
    for i, c in enumerate(classes):
        p[i, fam] = (1.0 - p_own) / 2.0
        p[i, c] = p_own
    return p


def test_hesitant_wrong_calls_are_corrected_and_confident_ones_stand() -> None:
    rng = np.random.default_rng(3)
    v, truth = tmd_columns(rng, 120.0, 300.0)
    net = truth.copy()
    p_own = np.full(len(v), 0.97)
    wrong = np.flatnonzero(truth == CV)[:10]  # ten S columns called S2, hesitantly
    net[wrong] = CH
    p_own[wrong] = 0.55
    stubborn = np.flatnonzero(truth == CV)[10]  # one called S2 with confidence: left alone
    net[stubborn] = CH
    probs = np.vstack([probs_for(net[i : i + 1], p_own[i]) for i in range(len(v))])
    res = classify_by_intensity(v, net, p_own, np.ones(len(v), bool), NAMES, class_probs=probs)
    assert res.families["tmd-chalcogen"].startswith("mixture")
    assert np.all(res.classes[wrong] == CV)
    assert res.classes[stubborn] == CH
    others = np.setdiff1d(np.arange(len(v)), np.r_[wrong, stubborn])
    assert np.all(res.classes[others] == truth[others])
    # the levels it found are the ones drawn from (the substituted anchor is X + Y, not 2Y)
    assert "substitutedXY=4" in res.families["tmd-chalcogen"]


def test_levels_too_close_leave_the_network_call() -> None:
    rng = np.random.default_rng(4)
    v, truth = tmd_columns(rng, 6.0, 14.0)  # about 1e2 e/Å2: S and S2 overlap
    net = truth.copy()
    wrong = np.flatnonzero(truth == CV)[:10]
    net[wrong] = CH
    probs = probs_for(net, 0.5)
    res = classify_by_intensity(v, net, np.full(len(v), 0.5), np.ones(len(v), bool), NAMES, class_probs=probs)
    assert "left to the network" in res.families["tmd-chalcogen"]
    # no move between classes whose levels are not separated
    assert np.all(res.classes[wrong] == CH)


def test_too_few_columns_and_unfitted_columns_are_untouched() -> None:
    v = np.array([240.0, 250.0, 120.0])
    net = np.array([CH, CH, CH])
    res = classify_by_intensity(v, net, np.full(3, 0.6), np.ones(3, bool), NAMES)
    assert np.array_equal(res.classes, net) and not res.decided.any()
    assert res.families["tmd-chalcogen"].startswith("too few")
    rng = np.random.default_rng(5)
    v, truth = tmd_columns(rng, 120.0, 300.0)
    net = truth.copy()
    s_col = np.flatnonzero(truth == CV)[0]
    net[s_col] = CH
    fitted = np.ones(len(v), bool)
    fitted[s_col] = False
    res = classify_by_intensity(v, net, np.full(len(v), 0.5), fitted, NAMES, class_probs=probs_for(net, 0.5))
    assert res.classes[s_col] == CH and not res.decided[s_col]


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(InputError, match="classes.shape"):
        classify_by_intensity(np.ones(4), np.zeros(3, int), np.ones(4), np.ones(4, bool), NAMES)
    with pytest.raises(InputError, match="classes"):
        classify_by_intensity(np.ones(2), np.array([0, 9]), np.ones(2), np.ones(2, bool), NAMES)


def test_segmenter_on_a_twin_frame_corrects_the_networks_classes() -> None:
    from stemagent.agent.segmenter_training import LABEL_OFFSET, twin_frame
    from stemagent.segmentation.metrics import match
    from stemagent.segmentation.unet_segmenter import UNetSegmenter
    from stemagent.types import Frame

    image, truth = twin_frame("mos2", 384, 0.1, 1e4, np.random.default_rng(11), clean=True, specimen_options={"vacancy_fraction": 0.08, "substitution_fraction": 0.05})
    frame = Frame(image=image, geometry=truth.geometry, line_times_s=truth.geometry.line_start_times_s(0.0), index=0, dose_e_per_A2=1e4)
    labels = truth.labels + LABEL_OFFSET["mos2"]
    keep = truth.geometry.contains(truth.positions_A, 1.0)
    errors = {}
    for on in (False, True):
        seg = UNetSegmenter(device="cpu", intensity_classes=on)
        atoms = seg.find(frame)
        m = match(atoms.positions_A, atoms.classes, truth.positions_A, labels, count_pred=truth.geometry.contains(atoms.positions_A, 1.0), count_true=keep)
        errors[on] = sum(m.fp.values()) + sum(m.fn.values())
        if on:
            assert seg.last_intensity_report["tmd-chalcogen"].startswith("mixture")
    # seeded frame: the network alone makes 6 class errors here, with the intensities 2
    assert errors[True] < errors[False], errors


def test_a_class_without_its_level_keeps_its_columns() -> None:
    # graphene with two Si columns: too few to fix the Si intensity, so Si has no level; the
    # Si calls must stand (no move into or out of a class the mixture cannot model)
    rng = np.random.default_rng(6)
    c_idx, si_idx = NAMES.index("C"), NAMES.index("Si")
    v = np.r_[rng.poisson(25.0, 200), rng.poisson(100.0, 2)].astype(float)
    net = np.r_[np.full(200, c_idx), np.full(2, si_idx)]
    probs = np.zeros((202, len(NAMES)))
    probs[np.arange(202), net] = 0.6
    probs[:200, si_idx] = 0.4
    probs[200:, c_idx] = 0.4
    res = classify_by_intensity(v, net, np.full(202, 0.6), np.ones(202, bool), NAMES, class_probs=probs)
    assert res.families["graphene"].startswith("mixture")
    assert np.all(res.classes[200:] == si_idx)
    assert np.all(res.classes[:200] == c_idx)
