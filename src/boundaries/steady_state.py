"""Steady state of the reduced chain in closed form, and its check against the eigenvector.

By symmetry every 2-motif of an orbit has the same steady-state probability: ``x`` for the 8 X
states, ``y`` for the 16 Y1 and Y2 states, ``z`` for the 8 Z states. Each X state is entered
from exactly one X state (probability ``a``), one Y1 state (``c``) and one Z state (``f``), and
likewise for Y2 and Z; each Y1 state is entered from two Y2 states, one by a stair (``d``) and
one by a U (``1 - d``). Balance per state gives::

    a x + c y + f z = x
    b x + (1 - c - k) y + g z = y
    (1 - a - b) x + k y + (1 - f - g) z = z
    d y + (1 - d) y = y           (so the steady state does not depend on d)
    8 x + 16 y + 8 z = 1

whose solution (derived with sympy in ``tests/unit/boundaries/test_boundaries_steady_state.py``)
is the published general form, with ``D = 8 (-ac - 2ag - ak - bc + 2bf + cf + cg + c + fk + 2g + k)``::

    x = (cf + cg + fk) / D,   y = (-ag + bf + g) / D,   z = (-ac - ak - bc + c + k) / D.

With ``k = 0, g = 0, f = 1`` and ``D' = 16b + 16c - 8ac - 8bc`` it reduces to::

    x = c / D',   y = b / D',   z = c (1 - a - b) / D'.

The paper prints ``y = c (1 - a - b) / D'`` and ``z = c / D'``; those do not satisfy
``8x + 16y + 8z = 1`` (nor the balance equations) unless ``a + b = 0``. The derivation, and the
eigenvector, give the forms above (see docs/boundaries.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stemagent.boundaries.chain import ReducedParams, stationary_distribution, transition_matrix
from stemagent.boundaries.lattice import STATE_ORBIT
from stemagent.errors import InputError


@dataclass(frozen=True)
class OrbitSteadyState:
    """Steady-state probability of *one* 2-motif of each orbit: ``x`` (X), ``y`` (Y1 and Y2), ``z`` (Z)."""

    x: float
    y: float
    z: float

    def vector(self) -> np.ndarray:
        """The ``(32,)`` steady state in the state order of :mod:`stemagent.boundaries.lattice`."""
        per_orbit = np.array([self.x, self.y, self.y, self.z])
        return per_orbit[STATE_ORBIT]


def closed_form_general(p: ReducedParams) -> OrbitSteadyState:
    """The general closed form (valid whenever ``D != 0``, i.e. the chain has one steady state)."""
    a, b, c, f, g, k = p.a, p.b, p.c, p.f, p.g, p.k
    denom = 8.0 * (-a * c - 2 * a * g - a * k - b * c + 2 * b * f + c * f + c * g + c + f * k + 2 * g + k)
    if abs(denom) < 1e-12:
        raise InputError("params", p.as_dict(), "make the steady state non-unique (D = 0)")
    return OrbitSteadyState(
        x=(c * f + c * g + f * k) / denom,
        y=(-a * g + b * f + g) / denom,
        z=(-a * c - a * k - b * c + c + k) / denom,
    )


def closed_form_simplified(a: float, b: float, c: float) -> OrbitSteadyState:
    """The closed form for ``k = 0, g = 0, f = 1`` (derived; differs from the printed y and z)."""
    denom = 16 * b + 16 * c - 8 * a * c - 8 * b * c
    if abs(denom) < 1e-12:
        raise InputError("a,b,c", (a, b, c), "make the steady state non-unique (D' = 0)")
    return OrbitSteadyState(x=c / denom, y=b / denom, z=c * (1 - a - b) / denom)


def closed_form_as_printed(a: float, b: float, c: float) -> OrbitSteadyState:
    """The simplified forms exactly as the paper prints them (kept to document the disagreement)."""
    denom = 16 * b + 16 * c - 8 * a * c - 8 * b * c
    return OrbitSteadyState(x=c / denom, y=c * (1 - a - b) / denom, z=c / denom)


def numerical(p: ReducedParams) -> np.ndarray:
    """``(32,)`` steady state of the reduced chain's transition matrix (linear solve)."""
    return stationary_distribution(transition_matrix(p))


def check(p: ReducedParams, atol: float = 1e-10) -> float:
    """Largest absolute difference between the closed form and the numerical steady state;
    raises AssertionError when it exceeds ``atol``."""
    diff = float(np.max(np.abs(closed_form_general(p).vector() - numerical(p))))
    if diff > atol:
        raise AssertionError(f"closed-form steady state differs from the eigenvector by {diff:.3g} for {p.as_dict()}")
    return diff
