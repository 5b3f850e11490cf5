"""Detection and localisation scores of a segmenter against ground truth.

Matching is one-to-one (Hungarian assignment on distance) within ``radius_A``, done
class-agnostically first; a matched pair counts for class ``k`` only when both sides are ``k``.
Per class ``k``: ``TP_k`` = matched pairs with truth and prediction of class ``k``;
``FP_k`` = predictions of class ``k`` not in such a pair; ``FN_k`` = truths of class ``k`` not
in such a pair. So a misclassified atom costs a false negative of its true class and a false
positive of the predicted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree


@dataclass
class MatchResult:
    """Pairs ``(pred_index, true_index)`` within the radius, and per-class counts."""

    pred_idx: np.ndarray
    true_idx: np.ndarray
    tp: dict[int, int] = field(default_factory=dict)
    fp: dict[int, int] = field(default_factory=dict)
    fn: dict[int, int] = field(default_factory=dict)

    def f1(self, k: int) -> float:
        tp, fp, fn = self.tp.get(k, 0), self.fp.get(k, 0), self.fn.get(k, 0)
        denom = 2 * tp + fp + fn
        return float(2 * tp / denom) if denom else float("nan")

    def add(self, other: "MatchResult") -> "MatchResult":
        keys = set(self.tp) | set(other.tp) | set(self.fp) | set(other.fp) | set(self.fn) | set(other.fn)
        return MatchResult(
            np.concatenate([self.pred_idx, other.pred_idx]),
            np.concatenate([self.true_idx, other.true_idx]),
            {k: self.tp.get(k, 0) + other.tp.get(k, 0) for k in keys},
            {k: self.fp.get(k, 0) + other.fp.get(k, 0) for k in keys},
            {k: self.fn.get(k, 0) + other.fn.get(k, 0) for k in keys},
        )


def match(
    pred_xy: np.ndarray,
    pred_cls: np.ndarray,
    true_xy: np.ndarray,
    true_cls: np.ndarray,
    radius_A: float = 0.5,
    count_pred: np.ndarray | None = None,
    count_true: np.ndarray | None = None,
) -> MatchResult:
    """One-to-one matching of predictions to truths within ``radius_A`` (see module docstring).

    ``count_pred`` / ``count_true`` (boolean masks, default all): everything takes part in the
    matching, but only these are counted. Used to exclude a border without creating spurious
    errors from an atom just inside and its detection just outside (or the reverse): a pair
    counts as a true positive when its truth is counted; an unmatched prediction is a false
    positive only when it is counted.
    """
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    true_xy = np.asarray(true_xy, dtype=np.float64).reshape(-1, 2)
    pred_cls = np.asarray(pred_cls, dtype=np.int64).reshape(-1)
    true_cls = np.asarray(true_cls, dtype=np.int64).reshape(-1)
    pi = np.zeros(0, dtype=np.int64)
    ti = np.zeros(0, dtype=np.int64)
    if len(pred_xy) and len(true_xy):
        tree = cKDTree(true_xy)
        pairs = tree.query_ball_point(pred_xy, r=radius_A)
        rows, cols = [], []
        for i, js in enumerate(pairs):
            for j in js:
                rows.append(i)
                cols.append(j)
        if rows:
            r = np.asarray(rows)
            c = np.asarray(cols)
            # assignment on the candidate sub-problem (sparse: costs outside the radius are huge)
            ur, rinv = np.unique(r, return_inverse=True)
            uc, cinv = np.unique(c, return_inverse=True)
            cost = np.full((len(ur), len(uc)), 1e6)
            cost[rinv, cinv] = np.linalg.norm(pred_xy[r] - true_xy[c], axis=1)
            a, b = linear_sum_assignment(cost)
            keep = cost[a, b] <= radius_A
            pi, ti = ur[a[keep]], uc[b[keep]]
    cp = np.ones(len(pred_xy), bool) if count_pred is None else np.asarray(count_pred, bool).reshape(-1)
    ct = np.ones(len(true_xy), bool) if count_true is None else np.asarray(count_true, bool).reshape(-1)
    res = MatchResult(pi, ti)
    same = pred_cls[pi] == true_cls[ti]
    for k in np.union1d(np.unique(pred_cls), np.unique(true_cls)):
        k = int(k)
        pair_k = same & (true_cls[ti] == k)
        res.tp[k] = int(np.sum(pair_k & ct[ti]))
        # predictions of class k that are not the prediction of a class-k pair
        in_pair = np.zeros(len(pred_xy), bool)
        in_pair[pi[pair_k]] = True
        res.fp[k] = int(np.sum((pred_cls == k) & cp & ~in_pair))
        truth_in_pair = np.zeros(len(true_xy), bool)
        truth_in_pair[ti[pair_k]] = True
        res.fn[k] = int(np.sum((true_cls == k) & ct & ~truth_in_pair))
    return res
