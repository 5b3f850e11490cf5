"""The survey policy on a known 2-D objective finds the optimum faster than random sub-scans."""

from __future__ import annotations

import numpy as np

from stemagent.policies.survey import SurveyPolicy
from stemagent.policies.survey_config import SurveyPolicyConfig
from stemagent.stages import Observation
from stemagent.types import Atoms, Blank, ScanGeometry

HALF_A = 125.0
FOV_A = 25.0
BUDGET = 20


def bump(xy: np.ndarray, peak: np.ndarray) -> float:
    """A smooth objective with one maximum at ``peak`` (Å)."""
    return float(10.0 * np.exp(-np.sum((xy - peak) ** 2) / (2 * 40.0**2)))


def no_atoms(i: int) -> Atoms:
    return Atoms(np.zeros((0, 2)), np.zeros(0), np.zeros(0), i, ("C", "Si"))


def overview() -> Observation:
    g = ScanGeometry(center_A=(0.0, 0.0), fov_A=(2 * HALF_A, 2 * HALF_A), shape_px=(64, 64), dwell_s=1e-6)
    return Observation(0, 0.0, g, no_atoms(0))  # no pixels, no atoms: nothing but position to learn from


def steps_to_optimum_bo(peak: np.ndarray, seed: int) -> int:
    cfg = SurveyPolicyConfig(
        subscan_fov_A=FOV_A, subscan_shape_px=32, subscan_dwell_s=1e-6, overlap=0.0, n_initial=3, refit_every=5,
        fit_maxiter=20, min_subscans_before_stop=BUDGET, max_subscans=BUDGET,
        objective={"kind": "feature_scalar", "feature": "value", "transform": "none"},
    )
    pol = SurveyPolicy(cfg, area_center_A=(0.0, 0.0), area_half_width_A=HALF_A, beam_current_pA=20.0, seed=seed)
    best = int(np.argmax([bump(c, peak) for c in pol.grid_A]))
    obs = overview()
    for i in range(1, BUDGET + 1):
        d = pol.decide(obs)
        assert not isinstance(d.command, Blank), d.reason
        k = d.details["chosen"]
        if k == best:
            return i
        g = d.command.geometry
        obs = Observation(i, float(i), g, no_atoms(i), {"value": np.array([bump(np.asarray(g.center_A), peak)])})
    return BUDGET + 1


def steps_to_optimum_random(peak: np.ndarray, grid: np.ndarray, rng: np.random.Generator) -> int:
    best = int(np.argmax([bump(c, peak) for c in grid]))
    order = rng.permutation(len(grid))[:BUDGET]
    hit = np.flatnonzero(order == best)
    return int(hit[0]) + 1 if len(hit) else BUDGET + 1


def test_survey_finds_the_optimum_of_a_2d_objective_faster_than_random() -> None:
    rng = np.random.default_rng(2024)
    peaks = [np.array([70.0, -60.0]), np.array([-85.0, 40.0]), np.array([10.0, 95.0])]
    grid = SurveyPolicy(SurveyPolicyConfig(subscan_fov_A=FOV_A, overlap=0.0), area_center_A=(0.0, 0.0),
                        area_half_width_A=HALF_A, beam_current_pA=20.0).grid_A
    bo = [steps_to_optimum_bo(p, seed=i) for i, p in enumerate(peaks)]
    rand = [steps_to_optimum_random(p, grid, rng) for p in peaks]
    assert len(grid) == 100
    assert all(s <= BUDGET for s in bo), f"BO steps to the optimum {bo} (budget {BUDGET})"
    assert np.mean(bo) < np.mean(rand), f"BO {bo} vs random {rand}"
