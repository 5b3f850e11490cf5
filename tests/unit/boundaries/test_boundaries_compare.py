"""Model comparison by held-out likelihood."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.boundaries.chain import BoundaryChain, ReducedParams
from stemagent.boundaries.compare import StepMarkovModel, cross_validate
from stemagent.errors import InputError


def test_the_generating_reduced_model_wins_and_memoryless_steps_lose() -> None:
    chain = BoundaryChain.from_params(ReducedParams(a=0.7, b=0.1, c=0.6, d=0.85, f=0.9, g=0.05, k=0.1))
    seqs = list(chain.sample_many(120, 30, np.random.default_rng(0)))
    scores = cross_validate(seqs, n_folds=4)
    by = {s.name: s for s in scores}
    assert scores[0].name in ("reduced (7 params)", "full 2-motif")
    assert by["reduced (7 params)"].heldout_ll_per_step > by["order-1 steps"].heldout_ll_per_step + 0.05
    # the held-out log-likelihood of the true model approaches minus its entropy rate
    assert by["reduced (7 params)"].heldout_ll_per_step == pytest.approx(-chain.entropy_rate(), abs=0.06)
    assert by["reduced (7 params)"].n_params == 7 and by["full 2-motif"].n_params == 56
    assert by["order-2 steps"].n_params == 20  # first order on the 12 motifs


def test_step_model_counts_and_errors() -> None:
    m = StepMarkovModel(2).fit([np.array([0, 1, 0, 1, 0, 1])])
    assert m.log_prob(np.array([0, 1]), 0) > m.log_prob(np.array([0, 1]), 1)
    assert m.log_prob(np.array([0, 1]), 3) == -np.inf  # a reversal has no support
    with pytest.raises(InputError, match="order"):
        StepMarkovModel(0)
    with pytest.raises(InputError, match="n_folds"):
        cross_validate([np.array([0, 1, 0, 1, 0, 1])], n_folds=5)
