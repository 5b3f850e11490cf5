"""The survey under trouble: failing fits and models, unreadable objectives, odd observations. It
never raises from ``decide``; it says in the decision what went wrong and carries on."""

from __future__ import annotations

import math

import numpy as np
from linear_operator.utils.errors import NotPSDError

import stemagent.policies.survey_model as survey_model
from stemagent.policies.survey import SurveyPolicy
from stemagent.policies.survey_config import SurveyPolicyConfig
from stemagent.policies.survey_testing import PointField, clustered_targets
from stemagent.stages import Observation
from stemagent.types import Atoms, Blank, ScanGeometry, ScanRegion

HALF_A = 50.0


def world() -> PointField:
    rng = np.random.default_rng(4)
    return PointField(clustered_targets(rng, 12, np.array([[-20.0, 15.0]]), 6.0, HALF_A), HALF_A, seed=4, spot_counts=10.0)


def policy(**kw: object) -> SurveyPolicy:
    base = dict(subscan_fov_A=25.0, subscan_shape_px=64, subscan_dwell_s=1e-5, overlap=0.0, n_initial=2,
                min_subscans_before_stop=2, fit_maxiter=10, refit_every=1)
    base.update(kw)
    return SurveyPolicy(SurveyPolicyConfig(**base), area_center_A=(0.0, 0.0), area_half_width_A=HALF_A,  # type: ignore[arg-type]
                        beam_current_pA=20.0, seed=0)


def steps(pol: SurveyPolicy, w: PointField, n: int) -> list:
    out, obs = [], w.overview(128)
    for _ in range(n):
        d = pol.decide(obs)
        out.append(d)
        if isinstance(d.command, Blank):
            break
        obs = w.subscan(d.command.geometry)
    return out


def test_a_failing_refit_keeps_the_last_good_hyperparameters(monkeypatch) -> None:
    pol, w = policy(), world()
    good = steps(pol, w, 3)  # two initial sub-scans, then a first fit that works
    assert good[-1].details["phase"] == "model"
    before = {k: v.clone() for k, v in pol.surrogate._state.items()}  # type: ignore[union-attr]

    def broken(*args, **kwargs):
        raise NotPSDError("matrix not positive definite (injected)")

    monkeypatch.setattr(survey_model, "fit_gpytorch_mll_scipy", broken)
    d = pol.decide(w.subscan(good[-1].command.geometry))
    assert isinstance(d.command, ScanRegion) and d.details["phase"] == "model"
    assert d.details["model"]["refit"] and "NotPSDError" in d.details["model"]["refit_failed"]
    after = pol.surrogate._state  # type: ignore[union-attr]
    assert all(np.allclose(before[k].numpy(), after[k].numpy()) for k in before if k in after)


def test_a_failing_model_falls_back_to_a_space_filling_choice(monkeypatch) -> None:
    pol, w = policy(), world()
    ds = steps(pol, w, 3)

    def broken(*args, **kwargs):
        raise RuntimeError("cholesky_cpu: the factorization could not be completed (injected)")

    monkeypatch.setattr(survey_model, "posterior_mean_sd", broken)
    monkeypatch.setattr("stemagent.policies.survey.candidate_moments", broken)
    d = pol.decide(w.subscan(ds[-1].command.geometry))
    assert isinstance(d.command, ScanRegion) and d.details["phase"] == "fallback"
    assert "RuntimeError" in d.details["error"] and "space-filling" in d.reason
    assert d.details["chosen"] not in {r.candidate for r in pol.records[:-1]}


def test_an_unreadable_objective_counts_as_no_value() -> None:
    pol = policy(objective={"kind": "feature_scalar", "feature": "score"})
    w = world()
    obs = w.overview(128)
    d = pol.decide(obs)
    for value in (np.array([math.nan]), np.array([math.inf]), np.array(["x"]), np.zeros(0)):
        sub = w.subscan(d.command.geometry)  # type: ignore[union-attr]
        sub.features["score"] = value
        d = pol.decide(sub)
        assert isinstance(d.command, ScanRegion)
        assert pol.records[-1].value is None
    assert not pol.value_of  # nothing went into the model


def test_a_sub_scan_outside_every_candidate_and_a_repeated_frame_are_harmless() -> None:
    pol, w = policy(), world()
    d = pol.decide(w.overview(128))
    # a frame the policy did not ask for, off the candidate grid (an operator's scan elsewhere)
    odd = ScanGeometry(center_A=(300.0, 300.0), fov_A=(25.0, 25.0), shape_px=(64, 64), dwell_s=1e-5)
    obs = Observation(frame_index=99, time_s=99.0, geometry=odd,
                      atoms=Atoms(np.array([[300.0, 300.0]]), np.array([1]), np.ones(1), 99, ("C", "Si")))
    d2 = pol.decide(obs)
    assert isinstance(d2.command, ScanRegion) and pol.records[-1].candidate is None
    d3 = pol.decide(obs)  # the same frame again (a refused command's re-ask): nothing counted twice
    assert len(pol.records) == 1 and isinstance(d3.command, ScanRegion)
    assert d is not None
