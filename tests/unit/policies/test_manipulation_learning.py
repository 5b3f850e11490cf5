"""The policy learns where to put the beam: on a synthetic hop-rate function whose best offset is away
from the carbon (so the physics prior is wrong), it finds it faster than random offsets, both measured here."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.policies.manipulation import ManipulationConfig, ManipulationPolicy
from stemagent.policies.manipulation.config import AcquisitionConfig, StopConfig
from stemagent.policies.manipulation.synthetic import SyntheticHopEnv, bump_rate
from stemagent.types import Park, ScanRegion

BEST_A = np.array([0.6, 0.6])  # bond-frame offset of the best beam position (along, across)
RATE = bump_rate(1.0, BEST_A[0], BEST_A[1], 0.35, 0.003)  # 1 hop/s there, 0.08/s with the beam on the carbon
BUDGET_S = 45.0


def _run(strategy: str, seed: int) -> tuple[SyntheticHopEnv, ManipulationPolicy, np.ndarray]:
    env = SyntheticHopEnv(RATE, seed=seed, size_A=90.0)
    far = env.sites_A[np.argmin(np.linalg.norm(env.sites_A - np.array([-38.0, 0.0]), axis=1))]  # 27 hops: not reached
    pol = ManipulationPolicy(ManipulationConfig(strategy=strategy, target_A=tuple(far), acquisition=AcquisitionConfig(n_dwells=8),
                                                stop=StopConfig(dose_budget_e_per_A2=BUDGET_S * env.dose_per_s)), seed=seed)
    d = pol.decide(env.survey(84.0))
    offsets = []
    while not isinstance(d.command, type(None)):
        if isinstance(d.command, Park):
            offsets.append((d.scores["offset_along_A"], d.scores["offset_across_A"], d.command.dwell_s))
            d = pol.observe_park(env.park(d.command.position_A, d.command.dwell_s))
        elif isinstance(d.command, ScanRegion):
            d = pol.decide(env.observe(d.command.geometry))
        else:
            break
    return env, pol, np.asarray(offsets)


@pytest.mark.slow  # about 150 decisions of the BO policy: some 20 s on two free cores
def test_the_policy_learns_the_best_offset_faster_than_random_offsets() -> None:
    results = {}
    for strategy in ("bo", "random"):
        hops, beam_s, late_near = 0, 0.0, []
        for seed in (11, 13):
            env, pol, parks = _run(strategy, seed)
            assert pol.done and "dose budget" in pol.stop_reason
            hops += len(env.hops)
            beam_s += float(parks[:, 2].sum())
            last = parks[len(parks) // 2:]  # where the beam sat in the second half of the budget
            dist = np.hypot(last[:, 0] - BEST_A[0], last[:, 1] - BEST_A[1])
            late_near.append(float(np.sum(last[:, 2] * (dist < 0.35)) / np.sum(last[:, 2])))
        results[strategy] = (hops / beam_s, float(np.mean(late_near)))
    bo_rate, bo_near = results["bo"]
    random_rate, random_near = results["random"]
    assert bo_rate > 1.5 * random_rate  # hops per second of beam: learning pays within 45 s of beam
    assert bo_near > random_near + 0.25  # in the second half the beam sits at the best offset far more often
