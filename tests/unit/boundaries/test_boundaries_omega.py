"""Omega(N, R): the transfer matrix equals brute-force enumeration; sampling agrees; growth fits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stemagent.boundaries.chain import BoundaryChain, ReducedParams
from stemagent.boundaries.lattice import PERMITTED
from stemagent.boundaries.omega import alpha_of_d, brute_force, exact_table, fit_growth, sampled_entropy
from stemagent.errors import InputError


@pytest.mark.parametrize("symmetric", [True, False])
def test_transfer_matrix_equals_brute_force_count_and_entropy(symmetric: bool) -> None:
    if symmetric:
        chain = BoundaryChain.from_params(ReducedParams(a=0.3, b=0.4, c=0.5, d=0.3, f=0.6, g=0.3, k=0.2))
    else:  # a full (not isometry-reduced) chain: every start is computed
        m = np.where(PERMITTED, np.random.default_rng(1).uniform(0.1, 1.0, PERMITTED.shape), 0.0)
        chain = BoundaryChain(m / m.sum(axis=1, keepdims=True))
    n = 6
    brute = brute_force(chain, n)
    table = exact_table(chain, n, ends=list(brute))
    assert len(brute) > 5
    for e, end in enumerate(table.ends):
        count, ent = brute[end]
        assert table.count_at[n, e] == pytest.approx(count, abs=1e-12), end
        if math.isnan(ent):
            assert math.isnan(table.entropy_at[n, e])
        else:
            assert table.entropy_at[n, e] == pytest.approx(ent, abs=1e-10), end
    assert np.isfinite(table.entropy_avg[n]) and table.entropy_avg[n] >= 0


def test_sampling_agrees_with_the_transfer_matrix() -> None:
    chain = BoundaryChain.from_params(ReducedParams())
    table = exact_table(chain, 24)
    mean, se = sampled_entropy(chain, 24, 6000, np.random.default_rng(0))
    assert se < 0.05
    assert mean == pytest.approx(table.entropy_avg[24], abs=max(4 * se, 0.05))


def test_growth_fit_recovers_known_exponents() -> None:
    n = np.arange(8, 65)
    noise = np.random.default_rng(0).normal(0, 0.01, len(n))
    fit = fit_growth(n, 2.5 * np.log(n) + 1.0 + noise)
    assert fit.alpha == pytest.approx(2.5, abs=0.02) and fit.alpha_stderr < 0.01 and fit.power_law_preferred
    fit = fit_growth(n, 0.8 * n - 1.0 * np.log(n) + 2.0 + noise)
    assert fit.lam == pytest.approx(0.8, abs=0.01) and not fit.power_law_preferred
    with pytest.raises(InputError, match="4 finite points"):
        fit_growth(np.arange(1, 4), np.ones(3))


def test_alpha_of_d_has_one_maximum() -> None:
    curve = alpha_of_d(ReducedParams(), np.linspace(0.1, 0.9, 5), n_min=8, n_max=20)
    assert curve.n_maxima == 1
    assert 0.1 < curve.peak_d < 0.9
    assert curve.alpha[int(np.argmax(curve.alpha))] > max(curve.alpha[0], curve.alpha[-1])


def test_bad_sizes() -> None:
    chain = BoundaryChain.from_params(ReducedParams())
    with pytest.raises(InputError, match="n_max"):
        exact_table(chain, 2)
    with pytest.raises(InputError, match="keep n <= 10"):
        brute_force(chain, 11)
