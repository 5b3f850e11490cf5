"""The boundary motif chain: the 2-motif transition matrix, its reduced parameters, sampling.

The next motif depends on the last two, so the chain is first order on the 32 2-motifs (three
steps each, :mod:`stemagent.boundaries.lattice`). A transition appends one step; only the 88
permitted 3-motifs have non-zero probability. Isometry reduction ties the 8 members of each of
the 11 classes to one probability, set by seven parameters (each row of orbits sums to one):

=======  =====================  ========================  ==================
from     to X                   to Y2                     to Z
=======  =====================  ========================  ==================
X        ``a``                  ``b``                     ``1 - a - b``
Y1       ``c``                  ``1 - c - k``             ``k``
Z        ``f``                  ``g``                     ``1 - f - g``
Y2       to Y1 as a stair: ``d``; as a U: ``1 - d``
=======  =====================  ========================  ==================

Matrices are row-stochastic: ``P[i, j]`` is the probability of 2-motif ``j`` after ``i`` and the
steady state is the row vector with ``pi P = pi`` (the paper writes ``P pi = pi`` with the
transpose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from stemagent.boundaries.lattice import (
    CLASS_NAMES,
    CLASS_OF_PAIR,
    N_STATES,
    PERMITTED,
    STATES,
    SUCCESSOR,
    TRANSITION_CLASS,
    states_of_steps,
)
from stemagent.errors import InputError

PARAM_NAMES = ("a", "b", "c", "d", "f", "g", "k")
# class probability = CLASS_CONST + CLASS_COEF @ theta, theta = (a, b, c, d, f, g, k)
CLASS_CONST = np.array([0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1], dtype=np.float64)
CLASS_COEF = np.array(
    [
        # a   b   c   d   f   g   k
        [1, 0, 0, 0, 0, 0, 0],  # X->X
        [0, 1, 0, 0, 0, 0, 0],  # X->Y2
        [-1, -1, 0, 0, 0, 0, 0],  # X->Z
        [0, 0, 1, 0, 0, 0, 0],  # Y1->X
        [0, 0, -1, 0, 0, 0, -1],  # Y1->Y2
        [0, 0, 0, 0, 0, 0, 1],  # Y1->Z
        [0, 0, 0, 1, 0, 0, 0],  # Y2->Y1:stair
        [0, 0, 0, -1, 0, 0, 0],  # Y2->Y1:U
        [0, 0, 0, 0, 1, 0, 0],  # Z->X
        [0, 0, 0, 0, 0, 1, 0],  # Z->Y2
        [0, 0, 0, 0, -1, -1, 0],  # Z->Z
    ],
    dtype=np.float64,
)
_TOL = 1e-9


@dataclass(frozen=True)
class ReducedParams:
    """The seven parameters of the isometry-reduced chain (probabilities, see the module table)."""

    a: float = 0.5
    b: float = 0.3
    c: float = 0.4
    d: float = 0.6
    f: float = 0.8
    g: float = 0.2
    k: float = 0.1

    def __post_init__(self) -> None:
        for name in PARAM_NAMES:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and -_TOL <= v <= 1 + _TOL):
                raise InputError(name, v, "must be a probability in [0, 1]")
        for pair, total in ((("a", "b"), self.a + self.b), (("c", "k"), self.c + self.k), (("f", "g"), self.f + self.g)):
            if total > 1 + 1e-9:
                raise InputError(f"{pair[0]}+{pair[1]}", total, "must not exceed 1 (the row's third class would be negative)")

    def vector(self) -> np.ndarray:
        """``(7,)`` in the order :data:`PARAM_NAMES`."""
        return np.array([getattr(self, n) for n in PARAM_NAMES], dtype=np.float64)

    @classmethod
    def from_vector(cls, v: np.ndarray) -> "ReducedParams":
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        if v.shape != (7,):
            raise InputError("params.shape", v.shape, "must be (7,) in the order a, b, c, d, f, g, k")
        v = np.clip(v, 0.0, 1.0)
        for i, j in ((0, 1), (2, 6), (4, 5)):  # (a, b), (c, k), (f, g): project onto sum <= 1
            total = v[i] + v[j]
            if total > 1.0:
                v[i], v[j] = v[i] / total, v[j] / total
        return cls(**{n: float(x) for n, x in zip(PARAM_NAMES, v)})

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}

    def class_probabilities(self) -> np.ndarray:
        """``(11,)`` probability of each isometry class (order :data:`CLASS_NAMES`)."""
        return np.clip(CLASS_CONST + CLASS_COEF @ self.vector(), 0.0, 1.0)

    def replace(self, **changes: float) -> "ReducedParams":
        return ReducedParams(**{**self.as_dict(), **changes})


def matrix_from_class_probabilities(p_class: np.ndarray) -> np.ndarray:
    """The ``(32, 32)`` transition matrix whose permitted entries take their class's probability."""
    p = np.asarray(p_class, dtype=np.float64).reshape(-1)
    if p.shape != (len(CLASS_NAMES),):
        raise InputError("class_probabilities.shape", p.shape, f"must be ({len(CLASS_NAMES)},)")
    m = np.where(PERMITTED, p[np.clip(CLASS_OF_PAIR, 0, None)], 0.0)
    return m / m.sum(axis=1, keepdims=True)


def transition_matrix(params: ReducedParams) -> np.ndarray:
    """The ``(32, 32)`` row-stochastic 2-motif transition matrix of the reduced model."""
    return matrix_from_class_probabilities(params.class_probabilities())


def stationary_distribution(matrix: np.ndarray) -> np.ndarray:
    """``(32,)`` steady state ``pi`` with ``pi P = pi``, ``sum(pi) = 1`` (least squares on the
    stacked system; unique for an irreducible chain)."""
    p = np.asarray(matrix, dtype=np.float64)
    n = p.shape[0]
    a = np.vstack([p.T - np.eye(n), np.ones((1, n))])
    rhs = np.zeros(n + 1)
    rhs[-1] = 1.0
    pi, *_ = np.linalg.lstsq(a, rhs, rcond=None)
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def entropy_rate(matrix: np.ndarray, pi: np.ndarray | None = None) -> float:
    """Entropy rate ``-sum_i pi_i sum_j P_ij log P_ij`` in nats per step."""
    p = np.asarray(matrix, dtype=np.float64)
    pi = stationary_distribution(p) if pi is None else pi
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    return float(-(pi @ plogp.sum(axis=1)))


@dataclass
class BoundaryChain:
    """A 2-motif chain: ``matrix`` ``(32, 32)`` row-stochastic with support inside the permitted
    3-motifs. Sampling produces *step* sequences (direction indices); a sequence of ``n`` steps
    has ``n - 2`` 2-motifs and ``n - 3`` transitions."""

    matrix: np.ndarray

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix, dtype=np.float64)
        if m.shape != (N_STATES, N_STATES):
            raise InputError("matrix.shape", m.shape, f"must be ({N_STATES}, {N_STATES})")
        if np.any(~np.isfinite(m)) or np.any(m < -_TOL):
            raise InputError("matrix", m.min(), "must hold finite non-negative probabilities")
        bad = np.flatnonzero(np.abs(m.sum(axis=1) - 1.0) > 1e-6)
        if len(bad):
            raise InputError(f"matrix[{bad[0]}].sum()", float(m[bad[0]].sum()), "rows must sum to 1")
        off = np.argwhere((m > _TOL) & ~PERMITTED)
        if len(off):
            i, j = off[0]
            raise InputError(f"matrix[{i},{j}]", float(m[i, j]), "is not a permitted 3-motif (must be 0)")
        m = np.clip(m, 0.0, None)
        self.matrix = m / m.sum(axis=1, keepdims=True)
        # next-step probabilities per state: (32, 4), zero where not permitted
        self._step_p = np.where(SUCCESSOR >= 0, self.matrix[np.arange(N_STATES)[:, None], np.clip(SUCCESSOR, 0, None)], 0.0)

    @classmethod
    def from_params(cls, params: ReducedParams) -> "BoundaryChain":
        return cls(transition_matrix(params))

    @property
    def step_probabilities(self) -> np.ndarray:
        """``(32, 4)`` probability of each next step direction from each 2-motif."""
        return self._step_p

    def stationary(self) -> np.ndarray:
        return stationary_distribution(self.matrix)

    def entropy_rate(self) -> float:
        return entropy_rate(self.matrix)

    def first_state(self, rng: np.random.Generator, size: int | None = None) -> np.ndarray:
        """2-motif(s) drawn from the steady state."""
        return rng.choice(N_STATES, size=size, p=self.stationary())

    def sample_steps(self, n_steps: int, rng: np.random.Generator, first: int | None = None) -> np.ndarray:
        """One boundary of ``n_steps >= 3`` steps, ``(n_steps,)``; first 2-motif from the steady
        state unless ``first`` is given."""
        return self.sample_many(1, n_steps, rng, first=None if first is None else np.array([first]))[0]

    def sample_many(self, n_sequences: int, n_steps: int, rng: np.random.Generator, first: np.ndarray | None = None) -> np.ndarray:
        """``(n_sequences, n_steps)`` independent boundaries, vectorised over sequences."""
        if n_steps < 3:
            raise InputError("n_steps", n_steps, "must be at least 3 (one 2-motif)")
        state = self.first_state(rng, size=n_sequences) if first is None else np.asarray(first, dtype=np.int64)
        out = np.empty((n_sequences, n_steps), dtype=np.int64)
        out[:, :3] = np.asarray(STATES, dtype=np.int64)[state]
        cum = np.cumsum(self._step_p, axis=1)
        for t in range(3, n_steps):
            u = rng.random(n_sequences)[:, None]
            step = np.minimum(np.sum(u > cum[state], axis=1), 3)
            out[:, t] = step
            state = SUCCESSOR[state, step]
        return out

    def log_likelihood(self, steps: np.ndarray) -> float:
        """Log-probability of the transitions of one step sequence given its first 2-motif
        (``-inf`` if any transition has probability 0 under this chain)."""
        st = states_of_steps(steps)
        if np.any(st < 0):
            raise InputError("steps", np.asarray(steps)[:12].tolist(), "hold a window that is not a 2-motif (reversal or three straight steps)")
        if len(st) < 2:
            return 0.0
        p = self.matrix[st[:-1], st[1:]]
        with np.errstate(divide="ignore"):
            return float(np.sum(np.log(p)))

    def class_probabilities(self) -> np.ndarray | None:
        """``(11,)`` class probabilities if the matrix is isometry-reduced (all members of each
        class equal), else None."""
        out = np.zeros(len(CLASS_NAMES))
        for c in range(len(CLASS_NAMES)):
            vals = self.matrix[CLASS_OF_PAIR == c]
            if np.ptp(vals) > 1e-9:
                return None
            out[c] = vals[0]
        return out


__all__ = [
    "BoundaryChain",
    "CLASS_COEF",
    "CLASS_CONST",
    "PARAM_NAMES",
    "ReducedParams",
    "TRANSITION_CLASS",
    "entropy_rate",
    "matrix_from_class_probabilities",
    "stationary_distribution",
    "transition_matrix",
]
