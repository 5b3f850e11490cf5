"""The reduced chain: parameters, the 32x32 matrix, sampling and likelihood."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.boundaries.chain import BoundaryChain, ReducedParams, entropy_rate, stationary_distribution, transition_matrix
from stemagent.boundaries.lattice import CLASS_NAMES, CLASS_OF_PAIR, PERMITTED, states_of_steps, valid_word
from stemagent.errors import InputError


def test_matrix_is_row_stochastic_on_the_permitted_3_motifs_and_tied_by_class() -> None:
    p = ReducedParams(a=0.3, b=0.5, c=0.2, d=0.7, f=0.6, g=0.1, k=0.25)
    m = transition_matrix(p)
    assert np.allclose(m.sum(axis=1), 1.0)
    assert np.all(m[~PERMITTED] == 0)
    probs = p.class_probabilities()
    for c, name in enumerate(CLASS_NAMES):
        assert np.allclose(m[CLASS_OF_PAIR == c], probs[c]), name
    assert np.allclose(BoundaryChain(m).class_probabilities(), probs)


@pytest.mark.parametrize(("field", "kwargs"), [("a", {"a": 1.2}), ("a+b", {"a": 0.7, "b": 0.5}), ("c+k", {"c": 0.9, "k": 0.2}),
                                              ("f+g", {"f": 0.9, "g": 0.2}), ("d", {"d": float("nan")})])
def test_invalid_parameters_name_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(InputError) as err:
        ReducedParams(**kwargs)
    assert err.value.field == field


def test_chain_rejects_matrices_outside_the_model() -> None:
    m = transition_matrix(ReducedParams())
    bad = m.copy()
    i = 0
    j = int(np.flatnonzero(~PERMITTED[i])[0])
    bad[i, j] = 0.1
    bad[i] /= bad[i].sum()
    with pytest.raises(InputError, match="not a permitted 3-motif"):
        BoundaryChain(bad)
    with pytest.raises(InputError, match="rows must sum to 1"):
        BoundaryChain(m * 0.9)
    with pytest.raises(InputError, match="shape"):
        BoundaryChain(np.eye(3))


def test_samples_are_valid_boundaries_with_the_chain_statistics() -> None:
    p = ReducedParams()
    chain = BoundaryChain.from_params(p)
    seqs = chain.sample_many(400, 60, np.random.default_rng(1))
    assert all(valid_word(tuple(s.tolist())) for s in seqs[:50])
    st = np.concatenate([states_of_steps(s) for s in seqs])
    assert np.all(st >= 0)
    # empirical 2-motif frequencies approach the steady state
    freq = np.bincount(st, minlength=32) / len(st)
    assert np.max(np.abs(freq - chain.stationary())) < 0.01
    # the mean log-likelihood per transition approaches minus the entropy rate
    ll = np.mean([chain.log_likelihood(s) / (len(s) - 3) for s in seqs])
    assert ll == pytest.approx(-chain.entropy_rate(), abs=0.03)


def test_likelihood_is_minus_infinity_for_a_zero_probability_transition() -> None:
    chain = BoundaryChain.from_params(ReducedParams(f=1.0, g=0.0))  # Z -> Z and Z -> Y2 impossible
    z_to_z = np.array([0, 1, 2, 3])  # E N W S: a U-turn followed by another left turn
    assert chain.log_likelihood(z_to_z) == -np.inf
    with pytest.raises(InputError, match="not a 2-motif"):
        chain.log_likelihood(np.array([0, 0, 0, 1]))


def test_stationary_and_entropy_rate_of_a_uniform_chain() -> None:
    m = np.where(PERMITTED, 1.0, 0.0)
    m /= m.sum(axis=1, keepdims=True)
    pi = stationary_distribution(m)
    assert np.allclose(pi @ m, pi)
    rows = PERMITTED.sum(axis=1)
    assert entropy_rate(m) == pytest.approx(float(pi @ np.log(rows)))
