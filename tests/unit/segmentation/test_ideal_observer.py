"""Ideal-observer bound: the image model matches the twin, likelihoods match a direct sum, and
the bound behaves at the dose extremes."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.agent.app.segmenter_training import twin_frame
from stemagent.errors import InputError
from stemagent.segmentation.ideal_observer import (
    class_loglik,
    composition_atoms,
    f1_scores,
    incoherent_image,
    max_f1_over_thresholds,
    oracle_posteriors,
    posteriors,
    site_loglik,
)
from stemagent.simulators.elements import atomic_number
from stemagent.simulators.fast_adf import psf

GRAPHENE = {"si_per_nm2": 1.0, "vacancy_per_nm2": 1.0}  # 7 Si, 6 vacancies at seed 0, 256 px
MOS2 = {"vacancy_fraction": 0.1, "substitution_fraction": 0.1}


def _psf(truth):
    u = 0.08 if truth.specimen_kind == "graphene" else 0.07
    return psf(truth.optics, u, spacing_A=0.02, size_A=8.0), 0.02 / truth.geometry.pixel_size_A[0]


def _frame(kind, dose, seed=0, shape=256):
    opts = GRAPHENE if kind == "graphene" else MOS2
    return twin_frame(kind, shape, 0.1, dose, np.random.default_rng(seed), clean=True, specimen_options=opts)


def _weights(truth):
    out = []
    for comp in truth.species:
        z = np.asarray([atomic_number(a) for a in composition_atoms(str(comp))], dtype=np.float64)
        out.append(truth.electrons_per_pixel * float(np.sum(truth.adf.cross_section_A2(z))) if len(z) else 0.0)
    return np.asarray(out)


@pytest.mark.parametrize("kind", ["graphene", "mos2"])
def test_site_model_reproduces_twin_expected_image(kind):
    _, truth = _frame(kind, 1e4)
    p, spacing = _psf(truth)
    e = truth.expected_image.astype(np.float64)
    model = incoherent_image(e.shape, truth.pixels_rc, _weights(truth), p, spacing)
    # atoms outside the field (not sites) spill into the border: compare 6 Å inside it
    inner = (slice(60, -60), slice(60, -60))
    assert abs(model[inner].sum() / e[inner].sum() - 1.0) < 0.02
    # the twin splats atoms bilinearly and undoes the splat's mean transfer, which leaves a
    # sub-pixel-position-dependent error of about 3 % of a column's peak
    assert np.max(np.abs(model - e)[inner]) < 0.05 * e.max()
    assert np.sqrt(np.mean((model - e)[inner] ** 2)) < 0.01 * e.max()


def test_loglik_difference_matches_direct_sum():
    rng = np.random.default_rng(3)
    p, spacing = psf(_frame("graphene", 1e4)[1].optics, 0.08, spacing_A=0.02, size_A=8.0), 0.2
    shape = (64, 64)
    rc = np.array([[31.3, 32.6]])
    bg = 0.5
    s, a = 40.0, 15.0
    unit = incoherent_image(shape, rc, np.array([1.0]), p, spacing)
    expected = bg + s * unit
    y = rng.poisson(expected).astype(np.float64)
    ll = site_loglik(y, expected, rc, np.array([s]), np.array([[s, a]]), p, spacing)
    lam_s, lam_a = bg + s * unit, bg + a * unit
    direct = np.sum(y * np.log(lam_s) - lam_s) - np.sum(y * np.log(lam_a) - lam_a)
    assert ll[0, 0] - ll[0, 1] == pytest.approx(direct, rel=1e-9, abs=1e-6)
    assert direct > 0  # the truth is the likelier weight here


def _bound(kind, dose, seed=0):
    image, truth = _frame(kind, dose, seed)
    p, spacing = _psf(truth)
    r = oracle_posteriors(image, truth, p, spacing, atomic_number)
    return r, f1_scores(r.posterior, r.labels)


def test_bound_is_perfect_at_very_high_dose():
    r, (map_f1, max_f1) = _bound("graphene", 1e6)
    present = [c for c in range(len(r.class_names)) if np.any(r.labels == c)]
    assert {r.class_names[c] for c in present} == {"C", "Si", "vacancy"}
    assert np.all(max_f1[present] == 1.0)
    assert np.all(map_f1[present] == 1.0)


def test_bound_collapses_without_signal():
    r, (_, max_f1) = _bound("graphene", 10.0)
    for name in ("Si", "vacancy"):
        assert max_f1[r.class_names.index(name)] < 0.5, (name, max_f1)


def test_mos2_bound_covers_metal_and_chalcogen_families():
    r, (_, max_f1) = _bound("mos2", 1e5)
    metal = r.class_names.index("metal")
    assert np.all(r.posterior[r.labels == metal, metal] == 1.0)
    assert np.allclose(r.posterior.sum(axis=1), 1.0)
    assert max_f1[metal] == 1.0
    assert max_f1[r.class_names.index("chalcogen")] > 0.99


def _brute_max_f1(score, positive):
    best = 0.0
    for t in np.unique(score):
        pred = score >= t
        tp = np.sum(pred & positive)
        best = max(best, 2 * tp / (pred.sum() + positive.sum()))
    return best


def test_max_f1_matches_brute_force():
    rng = np.random.default_rng(7)
    for trial in range(20):
        n, c = 60, 3
        labels = rng.integers(0, c, n)
        logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[labels] * (trial % 4)
        post = posteriors(np.round(logits, 1), np.ones(c) / c)  # rounded: ties
        _, max_f1 = f1_scores(post, labels)
        for k in range(c):
            assert max_f1[k] == pytest.approx(_brute_max_f1(post[:, k], labels == k), abs=1e-12)


def test_max_f1_never_below_map_for_two_classes():
    # with two classes MAP is itself a threshold on P(c | y), so the best threshold cannot lose;
    # with more classes argmax is not a threshold on one column and only the expectation is bounded
    rng = np.random.default_rng(11)
    for trial in range(50):
        n = 40
        labels = rng.integers(0, 2, n)
        logits = rng.normal(size=(n, 2)) + np.eye(2)[labels] * (trial % 5) * 0.7
        post = posteriors(np.round(logits, 1), np.array([0.3, 0.7]))
        map_f1, max_f1 = f1_scores(post, labels)
        for k in range(2):
            if np.isfinite(map_f1[k]) and np.isfinite(max_f1[k]):
                assert max_f1[k] >= map_f1[k] - 1e-12


def test_max_f1_not_below_map_on_a_twin_frame():
    _, (map_f1, max_f1) = _bound("graphene", 3e3)
    ok = np.isfinite(map_f1) & np.isfinite(max_f1)
    assert ok.sum() == 3
    assert np.all(max_f1[ok] >= map_f1[ok] - 1e-12)


def test_max_f1_edge_cases():
    assert np.isnan(max_f1_over_thresholds(np.array([0.2, 0.3]), np.array([False, False])))
    assert max_f1_over_thresholds(np.array([0.5, 0.5, 0.5]), np.array([True, False, True])) == pytest.approx(0.8)
    assert max_f1_over_thresholds(np.array([0.9, 0.1]), np.array([True, False])) == 1.0


def test_class_loglik_mixture_and_posteriors():
    ll = np.array([[0.0, np.log(3.0), -5.0]])
    cll = class_loglik(ll, np.array([0, 0, 1]), np.array([1.0, 1.0, 1.0]), 3)
    assert cll[0, 0] == pytest.approx(np.log(2.0))  # (1 + 3) / 2
    assert cll[0, 1] == pytest.approx(-5.0)
    assert cll[0, 2] == -np.inf
    post = posteriors(cll, np.array([0.5, 0.5, 0.0]))
    assert post[0, 2] == 0.0
    assert post[0, 0] / post[0, 1] == pytest.approx(2.0 / np.exp(-5.0))


def test_composition_atoms():
    assert composition_atoms("SSe") == ["S", "Se"]
    assert composition_atoms("S2") == ["S", "S"]
    assert composition_atoms("") == []
    with pytest.raises(InputError) as exc:
        composition_atoms("s2")
    assert exc.value.field == "composition"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"centers_rc": np.zeros((2, 3))}, "centers_rc.shape"),
        ({"true_weight": np.ones(3)}, "true_weight.shape"),
        ({"alt_weights": np.ones(2)}, "alt_weights.shape"),
        ({"psf_spacing_px": 0.0}, "psf_spacing_px"),
        ({"psf_spacing_px": -0.2}, "psf_spacing_px"),
        ({"image": np.ones((8, 8))}, "image.shape"),
        ({"expected": np.ones(16)}, "expected.shape"),
        ({"psf": np.ones(5)}, "psf.shape"),
    ],
)
def test_bad_inputs_name_the_field(kwargs, field):
    args = {
        "image": np.ones((16, 16)),
        "expected": np.ones((16, 16)),
        "centers_rc": np.full((2, 2), 8.0),
        "true_weight": np.ones(2),
        "alt_weights": np.ones((2, 3)),
        "psf": np.ones((20, 20)),
        "psf_spacing_px": 0.2,
    }
    args.update(kwargs)
    with pytest.raises(InputError) as exc:
        site_loglik(**args)
    assert exc.value.field == field


def test_bad_scoring_inputs_name_the_field():
    with pytest.raises(InputError) as exc:
        f1_scores(np.ones((4, 2)) / 2, np.zeros(3, dtype=int))
    assert exc.value.field == "labels.shape"
    with pytest.raises(InputError) as exc:
        f1_scores(np.ones((4, 2)) / 2, np.array([0, 1, 2, 0]))
    assert exc.value.field == "labels"
    with pytest.raises(InputError) as exc:
        max_f1_over_thresholds(np.ones(3), np.ones(4, dtype=bool))
    assert exc.value.field == "positive.shape"
