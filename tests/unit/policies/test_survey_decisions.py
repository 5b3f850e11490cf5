"""Survey decisions: reproducible, explained, refused with a reason, and within the dose budget."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stemagent.codec import encode_decision
from stemagent.config import ConfigError, config_from_dict
from stemagent.errors import InputError
from stemagent.policies.survey import SurveyPolicy
from stemagent.policies.survey_config import SurveyPolicyConfig
from stemagent.policies.survey_testing import PointField, clustered_targets
from stemagent.types import Blank, ScanRegion, dose_e_per_A2

HALF_A = 100.0
CURRENT_pA = 20.0


def field(seed: int = 3) -> PointField:
    rng = np.random.default_rng(seed)
    targets = clustered_targets(rng, 30, np.array([[-50.0, 40.0], [45.0, -35.0]]), 9.0, HALF_A)
    return PointField(targets, HALF_A, seed=seed, spot_counts=10.0)


def policy(seed: int = 0, **kw: object) -> SurveyPolicy:
    base = dict(subscan_fov_A=25.0, subscan_shape_px=64, subscan_dwell_s=1e-5, overlap=0.0, refit_every=4, fit_maxiter=20)
    base.update(kw)
    cfg = SurveyPolicyConfig(**base)  # type: ignore[arg-type]
    return SurveyPolicy(cfg, area_center_A=(0.0, 0.0), area_half_width_A=HALF_A, beam_current_pA=CURRENT_pA,
                        local_dose_budget_e_per_A2=kw.pop("local", math.inf) if "local" in kw else math.inf, seed=seed)


def run(pol: SurveyPolicy, world: PointField, steps: int) -> list[dict]:
    out = []
    obs = world.overview(256)
    for _ in range(steps):
        d = pol.decide(obs)
        out.append(encode_decision(d))
        if isinstance(d.command, Blank):
            break
        obs = world.subscan(d.command.geometry)
    return out


@pytest.mark.parametrize("kw", [{}, {"acquisition": "qlognei", "mc_samples": 32}, {"model": "deep_kernel", "fit_maxiter": 10}])
def test_survey_decisions_are_reproducible_and_carry_their_evidence(kw: dict) -> None:
    a = run(policy(seed=5, **kw), field(), 8)
    b = run(policy(seed=5, **kw), field(), 8)
    assert json.dumps(a) == json.dumps(b)
    last = a[-1]["details"]
    n = len(last["candidates_A"])
    assert n == 64
    assert last["phase"] == "model" and len(last["acquisition"]) == n and last["chosen"] in range(n)
    assert last["model"]["n_train"] >= 3 and last["model"]["model"] == kw.get("model", "gp")
    json.dumps(last)  # plain JSON, as the run log stores it


def test_survey_finds_the_clustered_targets() -> None:
    world = field()
    pol = policy(seed=1)
    run(pol, world, 40)
    assert pol.stopped is not None, "stops by itself within 40 decisions"
    found = len(pol.found_A)
    assert found >= 0.9 * len(world.targets_A)
    assert pol.n_subscans < 0.6 * len(pol.candidates_A), f"{pol.n_subscans} sub-scans of {len(pol.candidates_A)}"


def test_survey_refuses_targets_outside_the_field_or_on_a_pending_subscan() -> None:
    pol = policy()
    world = field()
    d = pol.decide(world.overview(128))
    assert isinstance(d.command, ScanRegion)
    inside_lim = HALF_A - 12.5
    why = pol.check_target((inside_lim + 5.0, 0.0))
    assert why is not None and "leaves the allowed area" in why and "target_A=(92.50, 0.00)" in why
    pending = tuple(d.command.geometry.center_A)
    why = pol.check_target((pending[0] + 3.0, pending[1] - 3.0))
    assert why is not None and "occupied by the pending sub-scan" in why
    with pytest.raises(InputError) as err:
        pol.add_pending(pending)
    assert err.value.field == "pending_A" and "pending" in str(err.value)
    assert pol.check_target((float("nan"), 0.0)) is not None
    # an operator target through the observation: refused with the reason in the decision
    obs = world.subscan(d.command.geometry)
    obs.features["target_A"] = np.array([500.0, 0.0])
    d2 = pol.decide(obs)
    assert "leaves the allowed area" in d2.details["target_refused"] and "operator target refused" in d2.reason
    # a valid operator target is scanned once, as asked
    obs2 = world.subscan(d2.command.geometry)
    obs2.features["target_A"] = np.array([10.0, -20.0])
    d3 = pol.decide(obs2)
    assert d3.command.geometry.center_A == (10.0, -20.0) and d3.details["phase"] == "target"


def test_survey_a_refused_command_is_never_asked_for_again() -> None:
    pol = policy()
    world = field()
    obs = world.overview(128)
    d = pol.decide(obs)
    first = d.details["chosen"]
    obs.features["refused"] = np.ones(1)  # what the agent does when the safety gate refuses
    d2 = pol.decide(obs)
    assert d2.details["chosen"] != first and pol.refused[first]
    assert first not in d2.details["pending"]


def test_survey_plans_within_its_dose_budget() -> None:
    world = field()
    sub_dose = dose_e_per_A2(CURRENT_pA, 1e-5, (25.0 / 64) ** 2)
    area = (2 * HALF_A) ** 2
    ov = world.overview(128)
    ov_dose = dose_e_per_A2(CURRENT_pA, ov.geometry.dwell_s, ov.geometry.pixel_size_A[0] ** 2)
    budget_e = ov_dose * area + 5.5 * sub_dose * 25.0**2
    pol = policy(dose_budget_field_e_per_A2=budget_e / area)
    obs = ov
    scans = 0
    for _ in range(20):
        d = pol.decide(obs)
        if isinstance(d.command, Blank):
            break
        scans += 1
        obs = world.subscan(d.command.geometry)
    assert scans == 5, "five sub-scans fit in the budget, the sixth would overrun it"
    assert "dose budget" in d.reason and d.details["stop"]
    assert pol.electrons_used <= budget_e
    assert pol.electrons_used == pytest.approx(ov_dose * area + 5 * sub_dose * 25.0**2, rel=1e-9)


def test_survey_respects_the_local_dose_budget() -> None:
    world = field()
    ov = world.overview(128)
    ov_dose = dose_e_per_A2(CURRENT_pA, ov.geometry.dwell_s, ov.geometry.pixel_size_A[0] ** 2)
    sub_dose = dose_e_per_A2(CURRENT_pA, 1e-5, (25.0 / 64) ** 2)
    cfg = SurveyPolicyConfig(subscan_fov_A=25.0, subscan_shape_px=64, subscan_dwell_s=1e-5, overlap=0.0, revisit_gain_fraction=1.0,
                             min_expected_gain=0.0, fit_maxiter=10, refit_every=8)
    # one sub-scan on top of the overview fits anywhere; a second one on the same place does not
    pol = SurveyPolicy(cfg, area_center_A=(0.0, 0.0), area_half_width_A=50.0, beam_current_pA=CURRENT_pA,
                       local_dose_budget_e_per_A2=ov_dose + 1.5 * sub_dose, seed=0)
    world = PointField(world.targets_A[np.all(np.abs(world.targets_A) < 49, axis=1)], 50.0)
    obs = world.overview(64)
    seen = []
    for _ in range(30):
        d = pol.decide(obs)
        if isinstance(d.command, Blank):
            break
        seen.append(d.details["chosen"])
        obs = world.subscan(d.command.geometry)
    # on the gate's dose model (fields grown by the probe's reach), abutting sub-scans share their
    # edge cells: no place twice, and some neighbours of visited places are left out
    assert len(seen) == len(set(seen)) and 4 <= len(seen) < len(pol.candidates_A) == 16
    assert "local dose budget" in d.reason
    assert pol.ledger.map is not None and pol.ledger.map.peak <= ov_dose + 1.5 * sub_dose + 1e-9
    assert not pol.ledger.candidates_fit().any()


@pytest.mark.parametrize("seed", [0, 2])
def test_survey_with_nothing_found_does_not_stop_on_expected_gain_before_the_coverage_guard(seed: int) -> None:
    # a dim overview (no spots): the first sub-scans find nothing and the model expects nothing anywhere
    rng = np.random.default_rng(seed)
    targets = clustered_targets(rng, 12, np.array([[70.0, -70.0]]), 8.0, HALF_A)
    unguarded = policy(seed=seed, min_coverage_before_empty_stop=0.0)
    run(unguarded, PointField(targets, HALF_A, seed=seed, spot_counts=0.0), 64)
    assert unguarded.n_subscans == 8 and len(unguarded.found_A) == 0  # the failure the guard is for
    guarded = policy(seed=seed)
    decisions = run(guarded, PointField(targets, HALF_A, seed=seed, spot_counts=0.0), 64)
    n = len(guarded.candidates_A)
    if len(guarded.found_A) == 0:
        assert guarded.n_subscans >= 0.25 * n, f"stopped after {guarded.n_subscans} of {n} with nothing found"
    assert any("nothing found yet" in d["reason"] for d in decisions)


def test_survey_remaining_stop_rule_stops_on_its_estimate_of_what_is_unfound() -> None:
    world = field()
    pol = policy(seed=1, stop_rule="remaining", stop_remaining_share=0.05)
    decisions = run(pol, world, 48)
    assert pol.stopped is not None and "estimated unfound" in pol.stopped, pol.stopped
    last_model = [d for d in decisions if d["details"]["model"]][-1]["details"]["model"]
    unfound, found = last_model["unfound_estimate"], last_model["found_total"]
    assert found == len(pol.found_A) and unfound < 0.05 * (unfound + found)
    assert len(pol.found_A) >= 0.9 * len(world.targets_A)
    # a share of 0 never stops on the estimate: the survey runs on to max_subscans
    never = policy(seed=1, stop_rule="remaining", stop_remaining_share=0.0, max_subscans=20)
    run(never, field(), 48)
    assert never.n_subscans == 20 and "max_subscans" in (never.stopped or "")


def test_survey_stop_rule_errors_name_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"policy": {"kind": "survey", "stop_rule": "budget"}})
    assert "policy.stop_rule" in str(err.value) and "budget" in str(err.value)
    with pytest.raises(ConfigError) as err:
        config_from_dict({"policy": {"kind": "survey", "stop_remaining_share": 1.5}})
    assert "policy.stop_remaining_share" in str(err.value)
