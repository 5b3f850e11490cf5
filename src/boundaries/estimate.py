"""Estimating the 2-motif chain from observed boundaries.

- :func:`count_transitions`: 3-motif counts from step sequences. A window of four known steps
  that is not a permitted 3-motif (a reversal, three straight steps, or outside a given sparse
  model's support) is *reported* in :attr:`TransitionCounts.forbidden` and not counted; windows
  with an unread step are skipped and counted in ``n_unread``.
- :func:`fit_full`: every row of the ``(32, 32)`` matrix free over its permitted successors, with
  a symmetric Dirichlet prior (smoothing), posterior mean and equal-tailed credible intervals.
- :func:`fit_reduced`: the seven isometry-reduced parameters by maximum likelihood
  (``scipy.optimize.minimize``, SLSQP) under the permitted-3-motif constraint (every class
  probability in [0, 1], rows summing to one), optional parameters held fixed (e.g. the
  published sparse model ``k = g = 0, f = 1``), with profile-likelihood 95% intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import optimize, stats

from stemagent.boundaries.chain import CLASS_COEF, CLASS_CONST, PARAM_NAMES, ReducedParams, transition_matrix
from stemagent.boundaries.lattice import CLASS_NAMES, CLASS_OF_PAIR, N_STATES, PERMITTED, states_of_steps, turn, word_name
from stemagent.errors import InputError

CHI2_95 = float(stats.chi2.ppf(0.95, 1))  # 3.841: profile-likelihood threshold for one parameter
# parameters that share a row of orbits: the likelihood factorises over these groups
PARAM_GROUPS = (("a", "b"), ("c", "k"), ("d",), ("f", "g"))


@dataclass(frozen=True)
class ForbiddenMotif:
    """A window of four steps that the analysis refused to count, and why."""

    sequence: int
    position: int  # index of the window's first step
    word: str
    reason: str


@dataclass
class TransitionCounts:
    """``counts`` ``(32, 32)`` observed transitions between 2-motifs (only permitted entries);
    ``first`` ``(32,)`` first 2-motif of each sequence; ``forbidden``: reported windows."""

    counts: np.ndarray
    first: np.ndarray
    n_sequences: int
    forbidden: list[ForbiddenMotif] = field(default_factory=list)
    n_unread: int = 0

    @property
    def n_transitions(self) -> int:
        return int(self.counts.sum())

    def class_counts(self) -> np.ndarray:
        """``(11,)`` counts pooled over each isometry class."""
        return np.bincount(CLASS_OF_PAIR[PERMITTED], weights=self.counts[PERMITTED], minlength=len(CLASS_NAMES)).astype(np.int64)

    def __add__(self, other: "TransitionCounts") -> "TransitionCounts":
        shifted = [ForbiddenMotif(f.sequence + self.n_sequences, f.position, f.word, f.reason) for f in other.forbidden]
        return TransitionCounts(self.counts + other.counts, self.first + other.first, self.n_sequences + other.n_sequences,
                                self.forbidden + shifted, self.n_unread + other.n_unread)


def _reason(word: np.ndarray) -> str:
    for i in range(3):
        if turn(int(word[i]), int(word[i + 1])) == 2:
            return f"reversal at step {i + 1}"
    return "three straight steps"


def count_transitions(sequences: Sequence[np.ndarray], support: np.ndarray | None = None) -> TransitionCounts:
    """Count the 3-motifs of step sequences (``-1`` marks an unread step).

    ``support``: optional ``(32, 32)`` bool, the transitions a (sparse) model allows; permitted
    windows outside it are reported as forbidden too."""
    allowed = PERMITTED if support is None else (PERMITTED & np.asarray(support, dtype=bool))
    counts = np.zeros((N_STATES, N_STATES), dtype=np.int64)
    first = np.zeros(N_STATES, dtype=np.int64)
    forbidden: list[ForbiddenMotif] = []
    unread = 0
    for n, seq in enumerate(sequences):
        s = np.asarray(seq, dtype=np.int64).reshape(-1)
        if np.any((s < -1) | (s > 3)):
            bad = int(np.flatnonzero((s < -1) | (s > 3))[0])
            raise InputError(f"sequences[{n}][{bad}]", int(s[bad]), "steps are 0..3 (E, N, W, S) or -1 (unread)")
        st = states_of_steps(s)
        if len(st) and st[0] >= 0:
            first[st[0]] += 1
        for t in range(len(st) - 1):
            window = s[t : t + 4]
            if np.any(window < 0):
                unread += 1
                continue
            i, j = st[t], st[t + 1]
            if i < 0 or j < 0:
                forbidden.append(ForbiddenMotif(n, t, word_name(window), _reason(window)))
            elif not allowed[i, j]:
                forbidden.append(ForbiddenMotif(n, t, word_name(window), f"class {CLASS_NAMES[CLASS_OF_PAIR[i, j]]} has probability 0 in the model"))
            else:
                counts[i, j] += 1
    return TransitionCounts(counts, first, len(sequences), forbidden, unread)


# --- the full (unreduced) matrix -------------------------------------------------------------

@dataclass
class FullFit:
    """Every row free: ``mean`` ``(32, 32)`` posterior mean, ``lower``/``upper`` equal-tailed
    credible bounds (``level``), ``mle`` (NaN rows where a 2-motif was never seen)."""

    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    mle: np.ndarray
    prior: float
    level: float


def fit_full(counts: TransitionCounts, prior: float = 0.5, level: float = 0.95) -> FullFit:
    """Dirichlet(``prior``) smoothing over each row's permitted successors (Jeffreys by default)."""
    if not prior > 0:
        raise InputError("prior", prior, "must be a positive Dirichlet concentration")
    if not 0 < level < 1:
        raise InputError("level", level, "must be in (0, 1)")
    n = counts.counts.astype(np.float64)
    alpha = np.where(PERMITTED, n + prior, 0.0)
    total = alpha.sum(axis=1, keepdims=True)
    mean = alpha / total
    rest = total - alpha
    q = (1 - level) / 2
    with np.errstate(invalid="ignore"):
        lower = np.where(PERMITTED, stats.beta.ppf(q, np.maximum(alpha, 1e-12), np.maximum(rest, 1e-12)), 0.0)
        upper = np.where(PERMITTED, stats.beta.ppf(1 - q, np.maximum(alpha, 1e-12), np.maximum(rest, 1e-12)), 0.0)
        rows = n.sum(axis=1, keepdims=True)
        mle = np.where(rows > 0, n / np.where(rows > 0, rows, 1.0), np.nan)
    return FullFit(mean=mean, lower=lower, upper=upper, mle=mle, prior=prior, level=level)


# --- the isometry-reduced model ------------------------------------------------------------

@dataclass
class ReducedFit:
    """Maximum-likelihood reduced parameters with profile-likelihood intervals (``level`` 0.95)."""

    params: ReducedParams
    intervals: dict[str, tuple[float, float]]
    log_likelihood: float
    class_counts: np.ndarray
    fixed: dict[str, float]
    n_transitions: int

    @property
    def matrix(self) -> np.ndarray:
        return transition_matrix(self.params)

    def to_dict(self) -> dict:
        return {
            "params": self.params.as_dict(),
            "intervals_95": {k: [float(v[0]), float(v[1])] for k, v in self.intervals.items()},
            "fixed": dict(self.fixed),
            "log_likelihood": self.log_likelihood,
            "n_transitions": self.n_transitions,
            "class_counts": {name: int(c) for name, c in zip(CLASS_NAMES, self.class_counts)},
        }


def _negloglik(theta: np.ndarray, n: np.ndarray) -> tuple[float, np.ndarray]:
    p = CLASS_CONST + CLASS_COEF @ theta
    used = n > 0
    pu = np.maximum(p[used], 1e-300)
    value = -float(np.sum(n[used] * np.log(pu)))
    grad = -(n[used] / pu) @ CLASS_COEF[used]
    return value, grad


def _maximise(n: np.ndarray, free: list[int], theta0: np.ndarray) -> tuple[np.ndarray, float]:
    """Maximise the likelihood over the ``free`` entries of ``theta`` (others held at ``theta0``)."""
    if not free:
        return theta0.copy(), -_negloglik(theta0, n)[0]
    free_idx = np.asarray(free)

    def full(z: np.ndarray) -> np.ndarray:
        th = theta0.copy()
        th[free_idx] = z
        return th

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        v, g = _negloglik(full(z), n)
        return v, g[free_idx]

    # every class probability stays in [0, 1]; a class that was observed stays above 0
    floor = np.where(n > 0, 1e-12, 0.0)
    cons = [
        {"type": "ineq", "fun": lambda z: CLASS_CONST + CLASS_COEF @ full(z) - floor, "jac": lambda z: CLASS_COEF[:, free_idx]},
    ]
    z0 = np.clip(theta0[free_idx], 0.02, 0.98)
    # a feasible start: shrink toward the centre of each row until every class is positive
    for _ in range(60):
        if np.all(CLASS_CONST + CLASS_COEF @ full(z0) > 1e-9):
            break
        z0 = 0.5 * z0 + 0.5 * 0.25
    res = optimize.minimize(fun, z0, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * len(free_idx), constraints=cons,
                            options={"maxiter": 500, "ftol": 1e-13})
    th = full(np.clip(res.x, 0.0, 1.0))
    return th, -_negloglik(th, n)[0]


def _closed_form_start(n: np.ndarray) -> np.ndarray:
    """Class-count ratios per row (the unconstrained MLE), used as the optimiser's start."""
    def r(num: int, *den: int) -> float:
        tot = sum(n[list(den)])
        return float(n[num] / tot) if tot > 0 else 1.0 / len(den)
    return np.array([r(0, 0, 1, 2), r(1, 0, 1, 2), r(3, 3, 4, 5), r(6, 6, 7), r(8, 8, 9, 10), r(9, 8, 9, 10), r(5, 3, 4, 5)])


def _partner_optimum(n: np.ndarray, j: int, q: int, v: float) -> float:
    """The other free parameter ``q`` of ``j``'s row that maximises the likelihood when ``j = v``:
    the row's classes are ``p_j = v``, ``p_q = w`` and ``1 - v - w``, so ``w = (1 - v) n_q / (n_q + n_rest)``."""
    cls_q = int(np.flatnonzero((CLASS_COEF[:, q] == 1) & (CLASS_COEF[:, j] == 0))[0])
    cls_rest = int(np.flatnonzero((CLASS_COEF[:, q] == -1) & (CLASS_COEF[:, j] == -1))[0])
    tot = n[cls_q] + n[cls_rest]
    return float((1.0 - v) * n[cls_q] / tot) if tot > 0 else 0.5 * (1.0 - v)


def fit_reduced(counts: TransitionCounts | np.ndarray, fixed: dict[str, float] | None = None, level: float = 0.95) -> ReducedFit:
    """Maximum-likelihood reduced parameters from transition counts (a :class:`TransitionCounts`
    or ``(11,)`` class counts). ``fixed``: parameters held at given values (they get a zero-width
    interval). Intervals: profile likelihood at ``level`` (chi-square, one degree of freedom)."""
    n = counts.class_counts() if isinstance(counts, TransitionCounts) else np.asarray(counts, dtype=np.int64).reshape(-1)
    if n.shape != (len(CLASS_NAMES),) or np.any(n < 0):
        raise InputError("class_counts", n.tolist(), f"must be {len(CLASS_NAMES)} non-negative counts")
    fixed = dict(fixed or {})
    for k_, v in fixed.items():
        if k_ not in PARAM_NAMES:
            raise InputError(f"fixed.{k_}", v, f"is not a parameter ({', '.join(PARAM_NAMES)})")
    threshold = float(stats.chi2.ppf(level, 1)) / 2.0
    theta0 = _closed_form_start(n)
    for k_, v in fixed.items():
        theta0[PARAM_NAMES.index(k_)] = float(v)
    free = [i for i, name in enumerate(PARAM_NAMES) if name not in fixed]
    theta, ll = _maximise(n, free, theta0)
    p_hat = CLASS_CONST + CLASS_COEF @ theta
    bad = np.flatnonzero((p_hat < -1e-6) | ((n > 0) & (p_hat <= 1e-9)))
    if len(bad):
        raise InputError("fixed", fixed, f"leave class {CLASS_NAMES[bad[0]]} (observed {int(n[bad[0]])} times) with probability {float(p_hat[bad[0]]):.3g}")
    intervals: dict[str, tuple[float, float]] = {}
    for j, name in enumerate(PARAM_NAMES):
        if name in fixed:
            intervals[name] = (float(fixed[name]), float(fixed[name]))
            continue
        group = next(g for g in PARAM_GROUPS if name in g)
        partner = [PARAM_NAMES.index(o) for o in group if o != name and o not in fixed]

        def deficit(v: float, j: int = j, partner: list[int] = partner) -> float:
            th = theta.copy()
            th[j] = v
            if partner:
                th[partner[0]] = _partner_optimum(n, j, partner[0], v)
            return float(min((ll + _negloglik(th, n)[0]) - threshold, 1e6))  # capped: brentq needs finite ends

        lo, hi = 0.0, 1.0
        if theta[j] > 0.0 and deficit(0.0) > 0:
            lo = optimize.brentq(deficit, 0.0, theta[j], xtol=1e-8)
        if theta[j] < 1.0 and deficit(1.0) > 0:
            hi = optimize.brentq(deficit, theta[j], 1.0, xtol=1e-8)
        intervals[name] = (float(lo), float(hi))
    return ReducedFit(ReducedParams.from_vector(theta), intervals, float(ll), n, fixed, int(n.sum()))


def reduced_log_likelihood(params: ReducedParams, counts: TransitionCounts | np.ndarray) -> float:
    """Log-likelihood of counts under given reduced parameters (``-inf`` if a seen class has p=0)."""
    n = counts.class_counts() if isinstance(counts, TransitionCounts) else np.asarray(counts)
    p = params.class_probabilities()
    with np.errstate(divide="ignore"):
        return float(np.sum(np.where(n > 0, n * np.log(p), 0.0)))
