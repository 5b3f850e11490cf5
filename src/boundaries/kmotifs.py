"""Significant tileable long k-motifs: which long motifs occur more often than the chain predicts.

A *k-motif* is ``k`` consecutive motifs, i.e. a word of ``k + 1`` steps; occurrences are
counted over every window of every boundary and pooled over the 8 lattice isometries (a class
is named by its smallest image, e.g. ``ENENE``). A k-motif is *tileable* when copies of it can
be chained into an infinite periodic boundary: its last step equals its first (consecutive
copies share that step), the junction is a permitted 2-motif, the period's translation is not
zero, and three periods in a row do not touch themselves (a boundary never crosses itself).

**Test.** For every tileable class seen at least ``min_count`` times, the null hypothesis is
that its count comes from the fitted 2-motif chain. The null distribution is made by a
parametric bootstrap: ``n_boot`` replicate data sets of boundaries with the observed lengths,
each started from the steady state and run with the fitted chain, counted the same way
(this keeps overlapping and clumped occurrences honest). The one-sided p-value of
over-representation is ``(1 + #{replicates >= observed}) / (1 + n_boot)``. Multiple testing:
Benjamini-Hochberg over every tested class of every ``k`` at false-discovery rate ``alpha``.
The p-values can be no smaller than ``1 / (1 + n_boot)``, so ``n_boot`` must exceed about
``n_tested / alpha`` for any discovery to be possible; the function raises the bootstrap size
to that if asked for less. The chain is usually fitted to the same boundaries, which makes the
test conservative (a motif the model already explains is never significant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from stemagent.boundaries.chain import BoundaryChain
from stemagent.boundaries.lattice import STEP_VECTORS, canonical_table, decode_word, path_vertices, valid_word, word_code, word_name
from stemagent.errors import InputError


@dataclass(frozen=True)
class KMotif:
    k: int
    word: str  # canonical representative, k + 1 steps
    tileable: bool
    translation: tuple[int, int]  # lattice translation of one period (tileable only)
    observed: int
    expected: float  # bootstrap mean under the chain
    p_value: float
    q_value: float
    significant: bool

    def to_dict(self) -> dict:
        return {"k": self.k, "word": self.word, "tileable": self.tileable, "translation": list(self.translation),
                "observed": self.observed, "expected": self.expected, "p_value": self.p_value, "q_value": self.q_value,
                "significant": self.significant}


def tile_translation(word: Sequence[int]) -> tuple[int, int] | None:
    """Lattice translation of one period if the k-motif ``word`` (k + 1 steps) is tileable, else None."""
    w = [int(s) for s in word]
    k = len(w) - 1
    if k < 2 or w[k] != w[0] or not valid_word(tuple(w)):
        return None
    period = w[:k]
    if not valid_word(tuple(period * 3 + period[:1])):
        return None
    verts = path_vertices(np.array(period * 3))
    t = tuple(int(x) for x in STEP_VECTORS[period].sum(axis=0))
    if t == (0, 0) or len({tuple(v) for v in verts.tolist()}) != len(verts):
        return None
    return t  # type: ignore[return-value]


def split_known(sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Fragments of the sequences between unread steps (``-1``)."""
    out = []
    for s in sequences:
        s = np.asarray(s, dtype=np.int64).reshape(-1)
        cuts = np.flatnonzero(s < 0)
        for part in np.split(s, cuts):
            part = part[part >= 0]
            if len(part):
                out.append(part)
    return out


def _window_codes(steps: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Canonical codes of every window of ``width`` steps inside each row's length; ``(R, L-width+1)``
    with -1 where the window runs past the row's length or is not a valid word."""
    r, n = steps.shape
    if n < width:
        return np.full((r, 0), -1, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(steps, width, axis=1)  # (R, n-width+1, width)
    codes = canonical_table(width)[word_code(np.clip(windows, 0, 3))]
    inside = (np.arange(n - width + 1)[None, :] + width) <= lengths[:, None]
    return np.where(inside, codes, -1)


def _bh(p: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg: ``(q_values, rejected)``."""
    m = len(p)
    if m == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    order = np.argsort(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    return q, q <= alpha


def significant_kmotifs(
    sequences: Sequence[np.ndarray],
    chain: BoundaryChain,
    ks: Sequence[int] = (4, 5, 6, 7, 8),
    n_boot: int = 2000,
    alpha: float = 0.05,
    min_count: int = 3,
    rng: np.random.Generator | None = None,
    only_tileable: bool = True,
    chunk: int = 250,
) -> list[KMotif]:
    """Test the tileable k-motif classes of ``sequences`` against ``chain`` (see the module doc).

    Returns every tested class, significant ones first (by q-value), then by observed count."""
    rng = rng if rng is not None else np.random.default_rng(0)
    if any(not 2 <= k <= 9 for k in ks):
        raise InputError("ks", list(ks), "k-motifs of 2..9 motifs (3..10 steps) are supported")
    frags = [f for f in split_known(sequences) if len(f) >= 3]
    if not frags:
        return []
    lengths = np.array([len(f) for f in frags])
    obs_steps = np.zeros((len(frags), lengths.max()), dtype=np.int64)
    for i, f in enumerate(frags):
        obs_steps[i, : len(f)] = f
    # the classes to test, per k
    tested: list[tuple[int, int, tuple[int, int] | None, int]] = []  # (k, canonical code, translation, observed)
    for k in ks:
        codes = _window_codes(obs_steps, lengths, k + 1)
        codes = codes[codes >= 0]
        uniq, cnt = np.unique(codes, return_counts=True)
        for code, c in zip(uniq.tolist(), cnt.tolist()):
            word = decode_word(code, k + 1)
            if not valid_word(word) or c < min_count:
                continue
            t = tile_translation(word)
            if only_tileable and t is None:
                continue
            tested.append((k, code, t, c))
    if not tested:
        return []
    n_boot = max(int(n_boot), int(np.ceil(len(tested) / alpha)) + 1)
    index = {(k, code): i for i, (k, code, _, _) in enumerate(tested)}
    boot = np.zeros((n_boot, len(tested)), dtype=np.int64)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        sim = chain.sample_many(b * len(frags), int(lengths.max()), rng).reshape(b, len(frags), -1)
        for k in ks:
            lut_keys = [(code, i) for (kk, code), i in index.items() if kk == k]
            if not lut_keys:
                continue
            codes = _window_codes(sim.reshape(b * len(frags), -1), np.tile(lengths, b), k + 1).reshape(b, -1)
            lut = np.full(4 ** (k + 1), -1, dtype=np.int64)
            for code, i in lut_keys:
                lut[code] = i
            cls = np.where(codes >= 0, lut[np.clip(codes, 0, None)], -1)
            rows = np.repeat(np.arange(b), cls.shape[1]).reshape(b, -1)
            keep = cls >= 0
            np.add.at(boot, (done + rows[keep], cls[keep]), 1)
        done += b
    observed = np.array([c for *_, c in tested])
    p = (1.0 + np.sum(boot >= observed[None, :], axis=0)) / (1.0 + n_boot)
    q, rejected = _bh(p, alpha)
    out = [
        KMotif(k=k, word=word_name(decode_word(code, k + 1)), tileable=t is not None, translation=t or (0, 0), observed=int(c),
               expected=float(boot[:, i].mean()), p_value=float(p[i]), q_value=float(q[i]), significant=bool(rejected[i]))
        for i, (k, code, t, c) in enumerate(tested)
    ]
    return sorted(out, key=lambda m: (not m.significant, m.q_value, -m.observed))
