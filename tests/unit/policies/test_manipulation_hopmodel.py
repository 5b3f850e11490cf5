"""The hop-rate model: EP on a GPyTorch GP with a Poisson-process likelihood, pooled by offset and site."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stemagent.policies.manipulation.config import HopModelConfig
from stemagent.policies.manipulation.hopmodel import HopModel, tilted_moments


def test_tilted_moments_match_brute_force_integration() -> None:
    grid = np.linspace(-15, 5, 20001)
    for m, v, k, e in ((-2.3, 0.8, 0, 5.0), (-2.3, 0.8, 1, 0.4), (-1.0, 2.0, 3, 12.0), (0.0, 0.3, 0, 0.01)):
        logp = -((grid - m) ** 2) / (2 * v) + k * grid - e * np.exp(grid)
        w = np.exp(logp - logp.max())
        w /= w.sum()
        mean = (w * grid).sum()
        var = (w * (grid - mean) ** 2).sum()
        tm, tv = tilted_moments(np.array([m]), np.array([v]), np.array([k]), np.array([e]))
        assert tm[0] == pytest.approx(mean, abs=2e-3)
        assert tv[0] == pytest.approx(var, rel=2e-2)


def test_one_cell_posterior_is_the_exact_one_and_no_hop_in_a_long_park_lowers_the_rate() -> None:
    cfg = HopModelConfig()
    hm = HopModel(cfg)
    x = np.array([[0.0, 0.0, 1.0, 2.0]])
    prior_mean, prior_sd = hm.predict(x)
    hm.add(0, (1.0, 2.0), 0.0, 0.0, exposure_s=30.0, hops=0)
    hm.fit(10)
    mean, sd = hm.predict(x)
    grid = np.linspace(-15, 5, 20001)
    logp = -((grid - prior_mean[0]) ** 2) / (2 * prior_sd[0] ** 2) - 30.0 * np.exp(grid)
    w = np.exp(logp - logp.max())
    w /= w.sum()
    exact = (w * grid).sum()
    assert mean[0] == pytest.approx(exact, abs=0.02)
    assert mean[0] < prior_mean[0] - 0.5 and sd[0] < prior_sd[0]


def test_pooled_parks_recover_the_rate_where_the_beam_sat() -> None:
    rng = np.random.default_rng(0)
    true_rate = 0.3
    hm = HopModel()
    for _ in range(200):
        t = rng.exponential(1.0 / true_rate)
        hm.add(3, (0.0, 0.0), 0.6, 0.4, min(t, 2.0), int(t < 2.0))
    hm.fit(10)
    mean, sd = hm.predict(np.array([[0.6, 0.4, 0.0, 0.0], [-0.6, -0.9, 0.0, 0.0]]))
    s = hm.summary()
    mle = s["hops"] / s["exposure_s"]  # censored exponential: hops over total exposure
    assert math.exp(mean[0]) == pytest.approx(mle, rel=0.05)  # the data overrule the prior
    assert mle == pytest.approx(true_rate, rel=0.3)
    assert sd[0] < 0.15 < sd[1]  # learned where it parked, still uncertain far away
    assert hm.n_cells == 1 and hm.n_hops > 30  # exposures pool exactly in one cell


def test_sites_differ_but_share_the_offset_dependence() -> None:
    rng = np.random.default_rng(1)
    hm = HopModel(HopModelConfig(site_sd=0.7))
    for site, xy, rate in ((0, (0.0, 0.0), 0.4), (1, (5.0, 0.0), 0.08)):
        for _ in range(80):
            t = rng.exponential(1.0 / rate)
            hm.add(site, xy, 0.0, 0.0, min(t, 3.0), int(t < 3.0))
    hm.fit(10)
    mean, _ = hm.predict(np.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 20.0, 0.0]]))
    assert mean[0] > mean[1] + 1.0  # the two sites are told apart
    assert mean[1] < mean[2] < mean[0]  # a new site sits between them (pooled level)


def test_damage_rate_is_a_gamma_poisson_posterior() -> None:
    cfg = HopModelConfig(prior_damage_rate_per_s=1e-3, damage_prior_shape=1.0)
    hm = HopModel(cfg)
    assert hm.damage_rate_per_s() == pytest.approx(1e-3)
    hm.add_damage_exposure(1000.0, 0)
    assert hm.damage_rate_per_s() == pytest.approx(1.0 / 2000.0)
    hm.add_damage_exposure(0.0, 3)
    assert hm.damage_rate_per_s() == pytest.approx(4.0 / 2000.0)


def test_a_model_under_another_prior_keeps_the_data_and_frees_the_carbon() -> None:
    cfg = HopModelConfig()
    hm = HopModel(cfg)
    hm.add(0, (1.0, 2.0), 0.0, 0.0, exposure_s=60.0, hops=0)  # a long wait on the carbon, no hop
    hm.add(0, (1.0, 2.0), 0.1, 0.1, exposure_s=20.0, hops=1)
    hm.add(0, (1.0, 2.0), 0.0, 0.9, exposure_s=2.0, hops=1)  # a hop well off the carbon
    hm.add_damage_exposure(82.0, 0)
    assert hm.near_carbon_counts(0.25) == (1.0, 80.0)
    free = hm.with_config(cfg.model_copy(update={"near_sd_fraction": 1.0}))
    assert free.n_cells == hm.n_cells and free.n_hops == hm.n_hops and free.near_carbon_counts(0.25) == (1.0, 80.0)
    assert free.damage_exposure_s == hm.damage_exposure_s
    hm.fit(6)
    free.fit(6)
    x = np.array([[0.0, 0.0, 1.0, 2.0]])
    # the same data pull the carbon's rate further from the physics prior when the prior is looser there
    assert free.predict(x)[0][0] < hm.predict(x)[0][0]
