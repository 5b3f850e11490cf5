"""Model comparison by held-out likelihood: reduced vs full 2-motif chain vs k-th order chains.

Every model predicts the next step of a boundary from the steps before it:

- ``order-m``: a Markov chain of order ``m`` on steps (history of ``m`` steps), each history's
  next-step distribution free over the continuations the lattice allows (no reversal, no
  three straight steps), Dirichlet(``prior``) smoothed. ``order-2`` is first order on motifs,
  ``order-3`` is the full 2-motif chain (56 free parameters), ``order-4`` conditions on the
  last 3-motif.
- ``reduced``: the 2-motif chain with the seven isometry-reduced parameters, its class
  probabilities smoothed the same way.

:func:`cross_validate` splits the boundaries into folds, fits each model on the others and
scores the held-out steps at positions ``>= max order`` (the same steps for every model), as
mean log-likelihood per step (nats) with its standard error over folds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from stemagent.boundaries.chain import matrix_from_class_probabilities
from stemagent.boundaries.estimate import count_transitions
from stemagent.boundaries.lattice import CLASS_NAMES, N_STATES, PERMITTED, SUCCESSOR, states_of_steps, valid_word
from stemagent.errors import InputError


def _allowed_next(history: tuple[int, ...]) -> np.ndarray:
    """``(4,)`` bool: steps that may follow ``history`` (its last two steps decide)."""
    return np.array([valid_word(history[-2:] + (s,)) for s in range(4)])


class StepMarkovModel:
    """Order-``m`` Markov chain on steps with Dirichlet(``prior``) smoothing."""

    def __init__(self, order: int, prior: float = 0.5) -> None:
        if not 1 <= order <= 6:
            raise InputError("order", order, "must be 1..6 steps of history")
        self.order = order
        self.prior = prior
        self.counts = np.zeros((4**order, 4))
        weights = 4 ** np.arange(order - 1, -1, -1)
        hist = np.array(np.unravel_index(np.arange(4**order), (4,) * order)).T  # (4**m, m)
        self._weights = weights
        self._support = np.array([_allowed_next(tuple(h)) for h in hist.tolist()])  # (4**m, 4)

    @property
    def n_params(self) -> int:
        valid_hist = [i for i in range(4**self.order) if valid_word(tuple(int(v) for v in np.unravel_index(i, (4,) * self.order)))]
        return int(sum(self._support[i].sum() - 1 for i in valid_hist))

    def fit(self, sequences: Sequence[np.ndarray]) -> "StepMarkovModel":
        self.counts[:] = 0
        for s in sequences:
            s = np.asarray(s, dtype=np.int64)
            for t in range(self.order, len(s)):
                h = s[t - self.order : t]
                if np.any(h < 0) or s[t] < 0:
                    continue
                self.counts[int(h @ self._weights), s[t]] += 1
        return self

    def log_prob(self, history: np.ndarray, step: int) -> float:
        h = int(np.asarray(history[-self.order :]) @ self._weights)
        alpha = np.where(self._support[h], self.counts[h] + self.prior, 0.0)
        p = alpha[step] / alpha.sum()
        return float(np.log(p)) if p > 0 else -np.inf


class MatrixModel:
    """A 2-motif chain as a predictor of the next step (history of three steps)."""

    order = 3

    def __init__(self, matrix: np.ndarray, n_params: int) -> None:
        self.matrix = np.asarray(matrix)
        self.n_params = n_params

    def log_prob(self, history: np.ndarray, step: int) -> float:
        st = states_of_steps(np.asarray(history[-3:]))
        if len(st) == 0 or st[0] < 0:
            return -np.inf
        j = SUCCESSOR[st[0], step]
        if j < 0:
            return -np.inf
        p = self.matrix[st[0], j]
        return float(np.log(p)) if p > 0 else -np.inf


def fit_reduced_smoothed(sequences: Sequence[np.ndarray], prior: float = 0.5) -> MatrixModel:
    """Reduced model with Dirichlet(``prior``)-smoothed class probabilities (posterior mean per row)."""
    n = count_transitions(sequences).class_counts().astype(np.float64)
    rows = ((0, 1, 2), (3, 4, 5), (6, 7), (8, 9, 10))
    p = np.zeros(len(CLASS_NAMES))
    for row in rows:
        alpha = n[list(row)] + prior
        p[list(row)] = alpha / alpha.sum()
    return MatrixModel(matrix_from_class_probabilities(p), n_params=7)


def fit_full_smoothed(sequences: Sequence[np.ndarray], prior: float = 0.5) -> MatrixModel:
    c = count_transitions(sequences).counts.astype(np.float64)
    alpha = np.where(PERMITTED, c + prior, 0.0)
    return MatrixModel(alpha / alpha.sum(axis=1, keepdims=True), n_params=int(PERMITTED.sum() - N_STATES))


@dataclass
class ModelScore:
    name: str
    n_params: int
    heldout_ll_per_step: float  # mean over folds, nats
    stderr: float
    n_steps: int

    def to_dict(self) -> dict:
        return {"model": self.name, "n_params": self.n_params, "heldout_ll_per_step": self.heldout_ll_per_step,
                "stderr": self.stderr, "n_steps": self.n_steps}


def _score(model: object, sequences: Sequence[np.ndarray], start: int) -> tuple[float, int]:
    total, n = 0.0, 0
    for s in sequences:
        s = np.asarray(s, dtype=np.int64)
        for t in range(start, len(s)):
            h = s[t - start : t]
            if np.any(h < 0) or s[t] < 0 or not valid_word(tuple(s[t - 3 : t + 1].tolist())):
                continue
            total += model.log_prob(h, int(s[t]))  # type: ignore[attr-defined]
            n += 1
    return total, n


def cross_validate(sequences: Sequence[np.ndarray], n_folds: int = 5, orders: Sequence[int] = (1, 2, 3, 4), prior: float = 0.5,
                   seed: int = 0) -> list[ModelScore]:
    """Held-out log-likelihood per step of ``reduced``, ``full`` and ``order-m`` models, best first."""
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences if len(s) > max(max(orders), 3)]
    if len(seqs) < n_folds:
        raise InputError("sequences", len(seqs), f"need at least n_folds={n_folds} boundaries longer than the highest order")
    start = max(max(orders), 3)
    folds = np.array_split(np.random.default_rng(seed).permutation(len(seqs)), n_folds)
    builders: dict[str, Any] = {"reduced (7 params)": lambda tr: fit_reduced_smoothed(tr, prior),
                                "full 2-motif": lambda tr: fit_full_smoothed(tr, prior)}
    for m in orders:
        if m != 3:
            builders[f"order-{m} steps"] = lambda tr, m=m: StepMarkovModel(m, prior).fit(tr)
    per_fold: dict[str, list[float]] = {k: [] for k in builders}
    n_params: dict[str, int] = {}
    n_steps = 0
    for f in folds:
        test = [seqs[i] for i in f]
        train = [seqs[i] for i in np.setdiff1d(np.arange(len(seqs)), f)]
        for name, build in builders.items():
            model = build(train)
            ll, n = _score(model, test, start)
            per_fold[name].append(ll / max(n, 1))
            n_params[name] = int(model.n_params)
        n_steps += n
    out = [ModelScore(k, n_params[k], float(np.mean(v)), float(np.std(v, ddof=1) / np.sqrt(len(v))), n_steps) for k, v in per_fold.items()]
    return sorted(out, key=lambda s: -s.heldout_ll_per_step)


__all__ = ["MatrixModel", "ModelScore", "StepMarkovModel", "cross_validate", "fit_full_smoothed", "fit_reduced_smoothed"]
