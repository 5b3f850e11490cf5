"""Steady state: the closed form (derived here with sympy) equals the eigenvector; the printed
simplified y and z of the paper do not."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stemagent.boundaries import steady_state
from stemagent.boundaries.chain import ReducedParams, stationary_distribution, transition_matrix
from stemagent.boundaries.lattice import STATE_ORBIT


def test_sympy_derivation_gives_the_general_and_the_simplified_forms() -> None:
    sp = pytest.importorskip("sympy")
    a, b, c, f, g, k, x, y, z = sp.symbols("a b c f g k x y z")
    sol = sp.solve([a * x + c * y + f * z - x, b * x + (1 - c - k) * y + g * z - y, 8 * x + 16 * y + 8 * z - 1], [x, y, z], dict=True)[0]
    D = 8 * (-a * c - 2 * a * g - a * k - b * c + 2 * b * f + c * f + c * g + c + f * k + 2 * g + k)
    assert sp.simplify(sol[x] - (c * f + c * g + f * k) / D) == 0
    assert sp.simplify(sol[y] - (-a * g + b * f + g) / D) == 0
    assert sp.simplify(sol[z] - (-a * c - a * k - b * c + c + k) / D) == 0
    # the third balance equation follows from the others (columns of the orbit matrix sum to 1)
    assert sp.simplify(((1 - a - b) * x + k * y + (1 - f - g) * z - z).subs(sol)) == 0
    simple = {v: sp.simplify(e.subs({k: 0, g: 0, f: 1})) for v, e in sol.items()}
    Dp = 16 * b + 16 * c - 8 * a * c - 8 * b * c
    assert sp.simplify(simple[x] - c / Dp) == 0
    assert sp.simplify(simple[y] - b / Dp) == 0  # printed: c (1 - a - b) / D'
    assert sp.simplify(simple[z] - c * (1 - a - b) / Dp) == 0  # printed: c / D'
    assert sp.simplify(simple[y] - c * (1 - a - b) / Dp) != 0


probability = st.floats(0.02, 0.98)


@settings(max_examples=60, deadline=None)
@given(probability, probability, probability, probability, probability, probability, probability)
def test_closed_form_equals_the_eigenvector_for_random_valid_parameters(a, b, c, d, f, g, k) -> None:
    a, b = a * (1 - 0.5 * b), b * 0.5  # keep every row's third class positive
    c, k = c * (1 - 0.5 * k), k * 0.5
    f, g = f * (1 - 0.5 * g), g * 0.5
    p = ReducedParams(a=a, b=b, c=c, d=d, f=f, g=g, k=k)
    pi = stationary_distribution(transition_matrix(p))
    closed = steady_state.closed_form_general(p)
    assert np.allclose(closed.vector(), pi, atol=1e-10)
    assert np.allclose(pi @ transition_matrix(p), pi, atol=1e-12)
    assert 8 * closed.x + 16 * closed.y + 8 * closed.z == pytest.approx(1.0)
    # by symmetry every state of an orbit has the same probability, whatever d is
    for o in range(4):
        assert np.ptp(pi[STATE_ORBIT == o]) < 1e-10
    assert steady_state.check(p.replace(d=0.5 * d)) < 1e-10


def test_simplified_form_is_the_general_one_at_k0_g0_f1_and_the_printed_one_is_not() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.uniform(0.05, 0.45, size=2)
        c = rng.uniform(0.05, 0.95)
        p = ReducedParams(a=a, b=b, c=c, d=0.6, f=1.0, g=0.0, k=0.0)
        numeric = steady_state.numerical(p)
        derived = steady_state.closed_form_simplified(a, b, c)
        printed = steady_state.closed_form_as_printed(a, b, c)
        assert np.allclose(derived.vector(), numeric, atol=1e-10)
        assert np.allclose(derived.vector(), steady_state.closed_form_general(p).vector(), atol=1e-12)
        assert abs(8 * printed.x + 16 * printed.y + 8 * printed.z - 1.0) > 1e-3  # not even normalised
        assert np.max(np.abs(printed.vector() - numeric)) > 1e-3
