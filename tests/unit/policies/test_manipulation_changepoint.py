"""The park-signal change-point test: a hop is a step with its time; noise and drift are not."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.errors import InputError
from stemagent.policies.manipulation.changepoint import detect_steps, noise_scale, scan_steps

DT = 1e-3


def _signal(levels: list[tuple[int, float]], rng: np.random.Generator) -> np.ndarray:
    """Poisson counts: ``levels`` is [(n_samples, mean), ...] in time order."""
    return np.concatenate([rng.poisson(mean, n) for n, mean in levels]).astype(np.float64)


def test_a_hop_is_found_as_one_step_at_its_time() -> None:
    rng = np.random.default_rng(1)
    x = _signal([(730, 400.0), (1270, 1650.0)], rng)  # the Si moves under the beam at 0.730 s
    steps = detect_steps(x, DT)
    assert len(steps) == 1
    assert steps[0].index == pytest.approx(730, abs=2)
    assert steps[0].time_s == pytest.approx(0.730, abs=0.002)
    assert steps[0].size == pytest.approx(1250.0, rel=0.05)


def test_a_small_step_from_a_hop_away_from_the_beam_is_still_found() -> None:
    rng = np.random.default_rng(2)
    x = _signal([(400, 400.0), (600, 424.0)], rng)  # +6 %: a wrong-direction hop next to the beam
    steps = detect_steps(x, DT)
    assert len(steps) == 1 and abs(steps[0].index - 400) < 40


def test_a_hop_and_a_hop_back_are_two_steps() -> None:
    rng = np.random.default_rng(3)
    x = _signal([(300, 400.0), (150, 1600.0), (550, 400.0)], rng)
    steps = detect_steps(x, DT)
    assert [s.index for s in steps] == pytest.approx([300, 450], abs=3)
    assert steps[0].size > 0 > steps[1].size


@pytest.mark.parametrize("seed", range(30))
def test_pure_shot_noise_has_no_step(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(100, 5000))
    assert detect_steps(_signal([(n, float(rng.uniform(50, 2000)))], rng), DT) == []


def test_a_drift_ramp_is_not_a_step_but_a_step_on_a_ramp_is() -> None:
    rng = np.random.default_rng(4)
    ramp = 400.0 * (1.0 + 0.15 * np.linspace(0.0, 1.0, 4000))  # the beam sliding down the probe's flank
    assert detect_steps(rng.poisson(ramp).astype(float), DT) == []
    stepped = ramp.copy()
    stepped[2500:] += 300.0
    steps = detect_steps(rng.poisson(stepped).astype(float), DT)
    assert len(steps) == 1 and abs(steps[0].index - 2500) <= 3


def test_noise_scale_is_robust_to_a_step() -> None:
    rng = np.random.default_rng(5)
    x = _signal([(1000, 400.0), (1000, 400.0)], rng)
    y = _signal([(1000, 400.0), (1000, 1600.0)], rng)
    assert noise_scale(x) == pytest.approx(20.0, rel=0.1)
    assert noise_scale(y) < 1.6 * noise_scale(x)  # pooled shot noise of both levels, not the step


def test_bad_signals_are_refused_with_the_field_named() -> None:
    with pytest.raises(InputError, match="signal"):
        detect_steps(np.array([1.0, np.nan, 2.0, 3.0, 4.0, 5.0, 6.0]), DT)
    with pytest.raises(InputError, match="sample_interval_s"):
        detect_steps(np.ones(100), 0.0)
    assert detect_steps(np.ones(4), DT) == []  # too short to hold a step


LONG = {"long_windows": (1024, 4096), "long_z_threshold": 8.0}


def test_a_step_below_the_short_windows_power_is_evidence_in_the_long_ones() -> None:
    """A hop with the beam far from both atoms in a 4-s park: +4 % of the level, a fifth of the per-sample noise."""
    rng = np.random.default_rng(8)
    x = _signal([(2100, 400.0), (1900, 416.0)], rng)
    assert detect_steps(x, DT) == []  # the short windows (up to 256 samples) cannot see it
    steps, evidence = scan_steps(x, DT, **LONG)
    assert steps == [] and evidence >= 1.0  # not a step (a long window alone could be curved drift): a case to confirm
    assert scan_steps(x, DT)[1] < 1.0


@pytest.mark.parametrize("seed", range(30))
def test_pure_shot_noise_and_drift_have_no_step_in_the_long_windows(seed: int) -> None:
    rng = np.random.default_rng(300 + seed)
    n = int(rng.integers(100, 8000))
    level = float(rng.uniform(50, 2000)) * (1.0 + float(rng.uniform(-0.1, 0.1)) * np.linspace(0.0, 1.0, n))
    steps, evidence = scan_steps(rng.poisson(level).astype(float), DT, **LONG)
    assert steps == [] and 0.0 <= evidence < 1.0


def test_the_evidence_is_the_largest_statistic_over_its_threshold() -> None:
    rng = np.random.default_rng(7)
    x = _signal([(1000, 400.0), (1000, 1600.0)], rng)
    steps, evidence = scan_steps(x, DT)
    assert len(steps) == 1 and evidence == pytest.approx(abs(steps[0].z) / 6.0)
    with pytest.raises(InputError, match="long_z_threshold"):
        scan_steps(x, DT, long_z_threshold=0.0)
