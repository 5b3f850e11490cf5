"""Estimation: counting (forbidden 3-motifs reported), the full Dirichlet fit and the reduced MLE."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.boundaries.chain import BoundaryChain, ReducedParams
from stemagent.boundaries.estimate import count_transitions, fit_full, fit_reduced, reduced_log_likelihood
from stemagent.boundaries.lattice import PERMITTED, parse_word
from stemagent.errors import InputError

TRUE = ReducedParams(a=0.45, b=0.35, c=0.3, d=0.65, f=0.7, g=0.2, k=0.15)


def _sample(n_seq: int, length: int, seed: int) -> list[np.ndarray]:
    return list(BoundaryChain.from_params(TRUE).sample_many(n_seq, length, np.random.default_rng(seed)))


def test_estimators_recover_a_known_matrix_from_sampled_sequences() -> None:
    chain = BoundaryChain.from_params(TRUE)
    counts = count_transitions(_sample(400, 100, 0))  # ~39,000 transitions
    assert counts.n_transitions == 400 * 97 and not counts.forbidden
    full = fit_full(counts)
    assert np.max(np.abs(full.mean - chain.matrix)[PERMITTED]) < 0.05
    covered = ((full.lower <= chain.matrix) & (chain.matrix <= full.upper))[PERMITTED]
    assert covered.mean() > 0.85  # 95% credible intervals (per entry)
    red = fit_reduced(counts)
    assert np.max(np.abs(red.params.vector() - TRUE.vector())) < 0.02
    assert np.max(np.abs(red.matrix - chain.matrix)) < 0.02
    for name, (lo, hi) in red.intervals.items():
        assert lo < hi and hi - lo < 0.06, name


def test_reduced_mle_from_the_optimiser_equals_the_class_count_ratios_and_intervals_shrink() -> None:
    small = fit_reduced(count_transitions(_sample(20, 50, 1)))
    n = small.class_counts
    assert small.params.a == pytest.approx(n[0] / n[:3].sum(), abs=1e-5)
    assert small.params.k == pytest.approx(n[5] / n[3:6].sum(), abs=1e-5)
    assert small.params.d == pytest.approx(n[6] / n[6:8].sum(), abs=1e-5)
    # the interval's ends lie where the profile log-likelihood drops by chi2(0.95)/2
    lo, hi = small.intervals["d"]
    for v in (lo, hi):
        ll = reduced_log_likelihood(small.params.replace(d=v), n)
        assert small.log_likelihood - ll == pytest.approx(3.8415 / 2, abs=1e-3)
    big = fit_reduced(count_transitions(_sample(320, 50, 2)))
    ratio = (small.intervals["d"][1] - small.intervals["d"][0]) / (big.intervals["d"][1] - big.intervals["d"][0])
    assert ratio == pytest.approx(4.0, rel=0.25)  # 16x the data: 4x narrower


def test_a_forbidden_3_motif_is_reported_not_counted() -> None:
    ok = np.array(parse_word("ENENNWNNE"))
    reversal = np.array(parse_word("ENENWENNE"))  # W then E
    straight = np.array(parse_word("ENEEENWN"))  # E E E
    counts = count_transitions([ok, reversal, straight])
    assert counts.n_sequences == 3
    reasons = {(f.sequence, f.reason) for f in counts.forbidden}
    assert any(s == 1 and r.startswith("reversal") for s, r in reasons)
    assert any(s == 2 and r == "three straight steps" for s, r in reasons)
    assert all(f.sequence in (1, 2) for f in counts.forbidden)
    clean = count_transitions([ok])
    assert counts.n_transitions < clean.n_transitions + len(reversal) + len(straight) - 6
    # windows that do not touch the bad step are still counted
    assert counts.n_transitions > clean.n_transitions
    # a 3-motif outside a sparse model's support is reported too
    chain = BoundaryChain.from_params(ReducedParams(f=1.0, g=0.0))
    z_then_z = np.array(parse_word("ENWSE"))  # two U-turns in a row: Z -> Z has probability 0
    sparse = count_transitions([z_then_z], support=chain.matrix > 0)
    assert sparse.forbidden and "Z->Z" in sparse.forbidden[0].reason and sparse.n_transitions < 2


def test_unread_steps_split_windows_and_bad_steps_name_the_field() -> None:
    s = np.array(parse_word("ENENENEN"))
    s[4] = -1
    counts = count_transitions([s])
    assert counts.n_unread == 4 and not counts.forbidden
    with pytest.raises(InputError, match=r"sequences\[0\]\[1\]"):
        count_transitions([np.array([0, 7, 0])])


def test_fixed_parameters_and_their_errors() -> None:
    counts = count_transitions(_sample(40, 50, 3))
    fixed = fit_reduced(counts, fixed={"d": 0.5})
    assert fixed.params.d == 0.5 and fixed.intervals["d"] == (0.5, 0.5)
    assert fixed.params.a == pytest.approx(fit_reduced(counts).params.a, abs=1e-6)  # d's row only
    with pytest.raises(InputError, match="fixed.q"):
        fit_reduced(counts, fixed={"q": 0.1})
    with pytest.raises(InputError, match="Y1->Z"):
        fit_reduced(counts, fixed={"k": 0.0})  # Y1 -> Z was observed
    with pytest.raises(InputError, match="prior"):
        fit_full(counts, prior=0.0)
