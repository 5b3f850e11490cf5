"""The manipulation policy through its plain interface, against the synthetic hop environment (no driver)."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.codec import encode_command
from stemagent.errors import InputError
from stemagent.policies.manipulation import ManipulationConfig, ManipulationPolicy
from stemagent.policies.manipulation.config import AcquisitionConfig, StopConfig
from stemagent.policies.manipulation.synthetic import SyntheticHopEnv, bump_rate, drive
from stemagent.stages import Observation
from stemagent.types import Blank, Decision, Park, ParkResult, ScanRegion


def _env(seed: int = 0) -> SyntheticHopEnv:
    return SyntheticHopEnv(bump_rate(2.0, 0.0, 0.0, 0.5), seed=seed)  # fast hops with the beam on the carbon


def _target(env: SyntheticHopEnv, hops: int) -> tuple[float, float]:
    d = np.linalg.norm(env.sites_A - env.sites_A[env.dopant], axis=1)
    ring = np.flatnonzero((d > hops * 1.2 - 0.3) & (d < hops * 1.42 + 0.1) & (env.sites_A[:, 0] > 0))
    return tuple(env.sites_A[ring[np.argmax(d[ring])]])


def _cfg(env: SyntheticHopEnv, hops: int = 2, **kw: object) -> ManipulationConfig:
    kw.setdefault("acquisition", AcquisitionConfig(n_dwells=6))
    return ManipulationConfig(target_A=_target(env, hops), **kw)  # type: ignore[arg-type]


def test_survey_gives_a_park_next_to_the_dopant_with_its_scores() -> None:
    env = _env()
    pol = ManipulationPolicy(_cfg(env), seed=1)
    d = pol.decide(env.survey())
    assert isinstance(d.command, Park)
    si = env.sites_A[env.dopant]
    assert 0.5 < np.linalg.norm(np.asarray(d.command.position_A) - si) < 3.5
    for key in ("acquisition", "knowledge_gradient_per_s", "p_hop", "p_wrong", "p_damage", "rate_per_s", "dwell_s"):
        assert key in d.scores and np.isfinite(d.scores[key])
    assert pol.path and pol.path[0] == pol.dopant and len(pol.path) >= 3


def test_a_step_in_the_signal_asks_for_a_confirmation_scan_and_the_outcome_moves_the_plan() -> None:
    env = _env(2)
    pol = ManipulationPolicy(_cfg(env), seed=2)
    d = pol.decide(env.survey())
    for _ in range(50):
        assert isinstance(d.command, Park)
        n_hops = len(env.hops)
        d = pol.observe_park(env.park(d.command.position_A, d.command.dwell_s))
        if len(env.hops) > n_hops:
            break
    assert isinstance(d.command, ScanRegion) and "step" in d.reason
    g = d.command.geometry
    assert g.fov_A[0] <= 12.0 and np.linalg.norm(np.asarray(g.center_A) - env.sites_A[env.hops[0][1]]) < 0.3
    d = pol.decide(env.observe(g))
    events = dict(pol.drain_events())
    assert events["outcomes"]["kind"] in ("intended", "other_site", "none")
    assert pol.dopant == int(np.argmin(np.linalg.norm(pol.graph.positions_A - env.sites_A[env.dopant], axis=1)))


def test_the_policy_reaches_the_target_and_then_blanks() -> None:
    env = _env(3)
    pol = ManipulationPolicy(_cfg(env, hops=3), seed=3)
    drive(pol, env, max_commands=400)
    assert pol.done and pol.stop_reason == "target reached"
    assert np.linalg.norm(env.sites_A[env.dopant] - np.asarray(pol.cfg.target_A)) < 0.2
    assert pol.stats.hops >= 3 and pol.stats.parks >= 3
    kinds = [s for s, _ in pol.drain_events()]
    assert kinds.count("plans") >= 3 and "outcomes" in kinds and "parks_seen" in kinds
    assert isinstance(pol.decide(env.survey()).command, Blank)


@pytest.mark.parametrize("strategy", ["random", "bo"])
def test_decisions_are_deterministic_given_seed_and_inputs(strategy: str) -> None:
    runs = []
    for _ in range(2):
        env = SyntheticHopEnv(bump_rate(0.2, 0.5, 0.3, 0.4), seed=4)
        pol = ManipulationPolicy(_cfg(env, hops=4, strategy=strategy), seed=7)
        d = pol.decide(env.survey())
        out = []
        for _ in range(6):
            out.append((encode_command(d.command), d.reason, d.scores))
            if isinstance(d.command, Park):
                d = pol.observe_park(env.park(d.command.position_A, d.command.dwell_s))
            elif isinstance(d.command, ScanRegion):
                d = pol.decide(env.observe(d.command.geometry))
            else:
                break
        runs.append(out)
    assert runs[0] == runs[1] and len(runs[0]) == 6


def test_stopping_rules_dose_budgets_and_refusals() -> None:
    env = _env(5)
    pol = ManipulationPolicy(_cfg(env, stop=StopConfig(dose_budget_e_per_A2=2.5 * env.dose_per_s)), seed=5)
    drive(pol, SyntheticHopEnv(bump_rate(1e-6, 0.0, 0.0, 0.5), seed=5), max_commands=200)  # nothing ever hops
    assert pol.done and "run dose budget" in pol.stop_reason
    assert pol.stats.dose_e_per_A2 <= 2.5 * env.dose_per_s

    pol = ManipulationPolicy(_cfg(env, stop=StopConfig(local_dose_budget_e_per_A2=1.5 * env.dose_per_s)), seed=5)
    drive(pol, SyntheticHopEnv(bump_rate(1e-6, 0.0, 0.0, 0.5), seed=5), max_commands=200)
    assert pol.done and "local dose budget" in pol.stop_reason

    pol = ManipulationPolicy(_cfg(env), seed=5)
    obs = env.survey()
    pol.decide(obs)
    refused = Observation(obs.frame_index, obs.time_s, obs.geometry, obs.atoms, features={"refused": np.ones(1)})
    d = pol.decide(refused)
    assert isinstance(d.command, Blank) and pol.done and "safety gate" in pol.stop_reason


def test_bad_targets_stop_with_the_planner_reason_and_the_operator_can_retarget() -> None:
    env = _env(6)
    pol = ManipulationPolicy(ManipulationConfig(target_A=(0.7, 0.1)), seed=6)  # between two sites
    d = pol.decide(env.survey())
    assert isinstance(d.command, Blank) and "off-lattice" in pol.stop_reason

    pol = ManipulationPolicy(ManipulationConfig(), seed=6)  # no target yet: wait for one
    obs = env.survey()
    d = pol.decide(obs)
    assert isinstance(d.command, Blank) and not pol.done
    obs.features["target_A"] = np.asarray(_target(env, 2))
    assert isinstance(pol.decide(obs).command, Park)
    with pytest.raises(InputError, match="out-of-field"):
        pol.set_target((50.0, 0.0))
    assert pol.target_A == _target(env, 2)  # the refused target left the plan alone


def test_a_loop_without_the_park_hook_still_works_from_frames_alone() -> None:
    """The current agent loop re-scans the field after a park instead of passing the park result."""
    env = _env(8)
    pol = ManipulationPolicy(_cfg(env, hops=2), seed=8)
    survey = env.survey()
    d = pol.decide(survey)
    for _ in range(300):
        if not isinstance(d.command, Park):
            break
        env.park(d.command.position_A, d.command.dwell_s)
        d = pol.decide(env.observe(survey.geometry))  # no observe_park: the frame is all it sees
    assert pol.done and pol.stop_reason == "target reached"


def test_observe_park_without_a_pending_park_is_refused() -> None:
    pol = ManipulationPolicy(ManipulationConfig(target_A=(0.0, 0.0)))
    with pytest.raises(InputError, match="park"):
        pol.observe_park(ParkResult((0.0, 0.0), 1.0, 0.0, 1e-3, np.zeros(1000)))
    assert isinstance(Decision(Blank(), "x").command, Blank)


def test_the_multi_park_lookahead_option_gives_a_valid_park() -> None:
    env = _env(9)
    pol = ManipulationPolicy(_cfg(env, acquisition=AcquisitionConfig(n_dwells=6, lookahead_batches=(1, 4))), seed=9)
    d = pol.decide(env.survey())
    assert isinstance(d.command, Park) and d.scores["knowledge_gradient_per_s"] >= 0.0
    assert pol.cfg.acquisition.dwell_min_s <= d.command.dwell_s <= pol.cfg.acquisition.dwell_max_s


def test_the_loops_park_observation_is_taken_like_a_bare_park_result() -> None:
    """The agent loop passes a park Observation (``obs.park``); the policy decides the same as from the bare result."""
    out = []
    for wrap in (False, True):
        env = _env(8)
        pol = ManipulationPolicy(_cfg(env), seed=8)
        survey = env.survey()
        d = pol.decide(survey)
        for _ in range(5):
            assert isinstance(d.command, Park)
            res = env.park(d.command.position_A, d.command.dwell_s)
            obs = Observation(survey.frame_index, res.start_time_s + res.dwell_s, survey.geometry, survey.atoms,
                              kind="park", park=res)
            d = pol.observe_park(obs if wrap else res)
            if not isinstance(d.command, Park):
                break
        out.append((encode_command(d.command), pol.stats.to_dict()))
    assert out[0] == out[1]
    pol = ManipulationPolicy(_cfg(_env(8)), seed=8)
    pol.decide(_env(8).survey())
    with pytest.raises(InputError, match="observation.park"):
        pol.observe_park(Observation(0, 0.0, survey.geometry, survey.atoms, kind="park"))


def test_an_operator_target_the_lattice_cannot_use_is_refused_once_and_the_old_target_kept() -> None:
    env = _env(9)
    good = _target(env, 2)
    pol = ManipulationPolicy(ManipulationConfig(target_A=good), seed=9)
    obs = env.survey()
    assert isinstance(pol.decide(obs).command, Park)
    pol.drain_events()
    obs.features["target_A"] = np.asarray([0.7, 0.1])  # between two sites
    for _ in range(3):  # the loop repeats the operator's target on every observation: refused once
        pol._pending = None
        assert isinstance(pol.decide(obs).command, Park)
    refused = [doc for s, doc in pol.drain_events() if doc.get("event") == "target_refused"]
    assert len(refused) == 1 and "off-lattice" in refused[0]["reason"]
    assert pol.target_A == good and not pol.done
    obs.features["target_A"] = np.asarray([np.nan, 1.0])  # not a position
    pol._pending = None
    pol.decide(obs)
    refused = [doc for s, doc in pol.drain_events() if doc.get("event") == "target_refused"]
    assert len(refused) == 1 and "finite" in refused[0]["reason"] and pol.target_A == good


def test_an_operator_target_refused_before_any_plan_leaves_the_policy_waiting() -> None:
    env = _env(10)
    pol = ManipulationPolicy(ManipulationConfig(), seed=10)
    obs = env.survey()
    obs.features["target_A"] = np.asarray([50.0, 0.0])  # outside the surveyed field
    d = pol.decide(obs)
    assert isinstance(d.command, Blank) and not pol.done and "waiting" in d.reason
    assert any(doc.get("event") == "target_refused" for _, doc in pol.drain_events())
    obs.features["target_A"] = np.asarray(_target(env, 2))
    assert isinstance(pol.decide(obs).command, Park)


def test_with_any_closer_site_the_park_aims_at_a_site_nearer_the_target() -> None:
    env = _env(11)
    pol = ManipulationPolicy(_cfg(env, hops=3, acquisition=AcquisitionConfig(n_dwells=6, any_closer_site=True)), seed=11)
    d = pol.decide(env.survey())
    assert isinstance(d.command, Park) and pol.graph is not None and pol.target is not None
    aim = int(d.scores["aim_node"])
    assert aim in pol.graph.closer_neighbours(pol.dopant, pol.target)
    assert pol.pending_park is not None and pol.pending_park.intended_node == aim
    assert d.scores["progress_rate_per_s"] >= d.scores["rate_per_s"]


def test_a_park_the_loop_replaced_is_neither_learned_nor_counted() -> None:
    """The drift stage may replace a park by a scan of the reference field (it cannot place the
    beam): the frame that follows carries the feature ``replaced``; the park never ran."""
    import dataclasses

    env = _env(3)
    pol = ManipulationPolicy(_cfg(env), seed=3)
    survey = env.survey()
    d = pol.decide(survey)
    assert isinstance(d.command, Park) and d.scores["park_index"] == 0
    cells, hops = pol.model.n_cells, pol.model.n_hops
    again = dataclasses.replace(env.observe(survey.geometry), features={"replaced": np.ones(1)})
    d2 = pol.decide(again)
    assert isinstance(d2.command, Park) and d2.scores["park_index"] == 0  # the same park asked for again
    assert pol.stats.parks == 0 and pol.stats.park_s == 0.0
    assert pol.model.n_cells == cells and pol.model.n_hops == hops  # no "no hop for the dwell" learned
    plans = [doc for stream, doc in pol.drain_events() if stream == "plans"]
    assert any(p.get("event") == "park_not_run" and p["park"] == 0 for p in plans)
    assert not [s for s, _ in pol.drain_events() if s == "outcomes"]


def _ambiguous_park(pol: ManipulationPolicy, env: SyntheticHopEnv, cmd: Park) -> Decision:
    """A park whose signal holds a step too small to call (0.75 of the per-sample noise at 400 counts)."""
    rng = np.random.default_rng(11)
    signal = np.concatenate([rng.poisson(400.0, 1100), rng.poisson(410.0, 900)]).astype(float)
    return pol.observe_park(ParkResult(cmd.position_A, 2.0, 0.0, 1e-3, signal, dose_e_per_A2=3e8))


def test_an_ambiguous_park_signal_is_confirmed_by_a_scan_and_a_move_it_shows_is_this_parks() -> None:
    env = _env(4)
    cp = {"long_windows": (), "ambiguous_evidence": 0.3}
    pol = ManipulationPolicy(_cfg(env, changepoint=cp), seed=4)
    d = pol.decide(env.survey())
    assert isinstance(d.command, Park)
    p = pol.pending_park
    assert p is not None
    d = _ambiguous_park(pol, env, d.command)
    assert isinstance(d.command, ScanRegion) and "ambiguous" in d.reason
    assert pol.stats.parks_with_steps == 0 and pol.stats.ambiguous_parks == 1
    # the dopant did move in that park: the scan shows it on the intended site
    env.dopant = int(np.argmin(np.linalg.norm(env.sites_A - p.positions_A[p.intended_node], axis=1)))
    d = pol.decide(env.observe(d.command.geometry))
    assert pol.stats.ambiguous_moves == 1 and pol.moved_parks == {p.index} and pol.dopant == p.intended_node
    # with the grey zone off the same signal is learned as "no move" and the next park follows
    off = ManipulationPolicy(_cfg(env, changepoint={"long_windows": (), "ambiguous_evidence": 1.0}), seed=4)
    d = off.decide(_env(4).survey())
    assert isinstance(d.command, Park)
    d = _ambiguous_park(off, env, d.command)
    assert isinstance(d.command, Park) and off.stats.ambiguous_parks == 0 and off.moved_parks == set()


def test_the_fallback_leaves_the_physics_prior_once_the_carbon_is_known_to_be_bad() -> None:
    env = SyntheticHopEnv(bump_rate(1.0, 0.0, 0.9, 0.3, 0.001), seed=5)  # nothing on the carbon, a bump 0.9 Å across
    pol = ManipulationPolicy(_cfg(env), seed=5)  # on by default
    drive(pol, env, max_commands=80)
    assert pol.fallback_at_park is not None
    events = [doc for stream, doc in pol.drain_events() if stream == "plans" and doc.get("event") == "fallback"]
    assert len(events) == 1 and events[0]["p_rate_below"] >= 0.8 and events[0]["near_sd_fraction"] == pytest.approx(0.66)
    assert pol.model.cfg.near_sd_fraction == pytest.approx(0.66)
    # switched off, the same run keeps trusting the physics on the carbon
    trust = ManipulationPolicy(_cfg(env, fallback={"enabled": False}), seed=5)
    drive(trust, SyntheticHopEnv(bump_rate(1.0, 0.0, 0.9, 0.3, 0.001), seed=5), max_commands=80)
    assert trust.fallback_at_park is None and trust.model.cfg.near_sd_fraction == pytest.approx(0.33)
    # on a carbon as good as the prior says, it stays
    good = _env(5)
    stay = ManipulationPolicy(_cfg(good), seed=5)
    drive(stay, good, max_commands=80)
    assert stay.fallback_at_park is None
