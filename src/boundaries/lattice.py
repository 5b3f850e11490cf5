"""The boundary alphabet: lattice steps, motifs, 2-motifs, 3-motifs and their isometry classes.

A boundary is a path of unit steps on the square lattice of A-site columns. Steps are direction
indices ``0 E (+x), 1 N (+y), 2 W (-x), 3 S (-y)``; the turn between two steps is
``(s[i+1] - s[i]) % 4``: 0 straight, 1 left, 3 right, 2 a reversal (never allowed).

- A *motif* is the local shape at one vertex of the path: two consecutive steps. It is a
  *corner* (the path turns; 8 of them) or a *straight* (4 of them): 12 motifs.
- A *2-motif* is two consecutive (overlapping) motifs: three steps. Three straight steps in a
  row are not a boundary motif, so there are 4*3*3 - 4 = **32** 2-motifs.
- A *3-motif* is two consecutive 2-motifs: four steps whose two 2-motifs are both valid:
  4*3*3*3 - 12 - 12 + 4 = **88** permitted 3-motifs.

The isometries of the square lattice (the dihedral group D4, 8 elements: rotations by 90° and
reflections) act freely on 2-motifs and 3-motifs, so the 32 2-motifs fall into 4 orbits of 8
and the 88 3-motifs into **11 classes** of 8. The orbits, by their two turns:

=====  ===============  =====================================  ==========
orbit  turns            shape                                   paper
=====  ===============  =====================================  ==========
X      left, right      zig-zag (a staircase step)              x (8)
Y1     straight, turn   a straight run ending in a corner       y (8 of 16)
Y2     turn, straight   a corner followed by a straight run     y (8 of 16)
Z      left, left       a U-turn                                z (8)
=====  ===============  =====================================  ==========

and the 11 classes are the transitions ``X->{X, Y2, Z}``, ``Y1->{X, Y2, Z}``, ``Z->{X, Y2, Z}``
and ``Y2->Y1`` either as a *stair* (the path turns back to its earlier direction) or as a *U*
(it turns on, reversing its earlier direction). The published model's parameters
``a, b, c, d, f, g, k`` set their probabilities (:mod:`stemagent.boundaries.chain`).

Everything here is pure index bookkeeping with small tables built once at import.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np

from stemagent.errors import InputError

DIRECTIONS = "ENWS"
STEP_VECTORS = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.int64)  # (4, 2) lattice units
ORBITS = ("X", "Y1", "Y2", "Z")
CLASS_NAMES = (
    "X->X", "X->Y2", "X->Z",
    "Y1->X", "Y1->Y2", "Y1->Z",
    "Y2->Y1:stair", "Y2->Y1:U",
    "Z->X", "Z->Y2", "Z->Z",
)
UNKNOWN_STEP = -1


def turn(s0: int, s1: int) -> int:
    """Turn from step ``s0`` to ``s1``: 0 straight, 1 left, 3 right, 2 reversal."""
    return (s1 - s0) % 4


def valid_word(word: tuple[int, ...]) -> bool:
    """True when a step word has no reversal and no three equal steps in a row."""
    for i in range(len(word) - 1):
        if turn(word[i], word[i + 1]) == 2:
            return False
    for i in range(len(word) - 2):
        if word[i] == word[i + 1] == word[i + 2]:
            return False
    return True


def orbit_of_word(word: tuple[int, int, int]) -> str:
    """Orbit (``X``, ``Y1``, ``Y2``, ``Z``) of a valid 2-motif (three steps)."""
    t1, t2 = turn(word[0], word[1]), turn(word[1], word[2])
    if t1 == 0:
        return "Y1"
    if t2 == 0:
        return "Y2"
    return "X" if t1 != t2 else "Z"


def _build_states() -> tuple[tuple[int, int, int], ...]:
    words: list[tuple[int, int, int]] = [(a, b, c) for a, b, c in itertools.product(range(4), repeat=3) if valid_word((a, b, c))]
    # order: orbit X, Y1, Y2, Z (the paper's [x]*8 + [y]*16 + [z]*8), then by the word itself
    return tuple(sorted(words, key=lambda w: (ORBITS.index(orbit_of_word(w)), w)))


STATES: tuple[tuple[int, int, int], ...] = _build_states()
N_STATES = len(STATES)
STATE_INDEX: dict[tuple[int, int, int], int] = {w: i for i, w in enumerate(STATES)}
STATE_ORBIT = np.array([ORBITS.index(orbit_of_word(w)) for w in STATES], dtype=np.int64)  # (32,)


def class_of_word(word: tuple[int, int, int, int]) -> int:
    """Isometry class (index into :data:`CLASS_NAMES`) of a permitted 3-motif (four steps)."""
    src = orbit_of_word(word[:3])
    dst = orbit_of_word(word[1:])
    if src == "Y2":
        # Y2 = (u, v, v): the next step either returns to u (a stair) or is -u (a U)
        return CLASS_NAMES.index("Y2->Y1:stair" if word[3] == word[0] else "Y2->Y1:U")
    return CLASS_NAMES.index(f"{src}->{dst}")


def _build_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``successor`` (32, 4): next state when the next step is ``s`` (-1 if not permitted);
    ``cls`` (32, 4): class of that transition (-1); ``word4`` list of the 88 permitted words."""
    successor = np.full((N_STATES, 4), -1, dtype=np.int64)
    cls = np.full((N_STATES, 4), -1, dtype=np.int64)
    for i, w in enumerate(STATES):
        for s in range(4):
            word = w + (s,)
            if valid_word(word):
                successor[i, s] = STATE_INDEX[word[1:]]
                cls[i, s] = class_of_word(word)
    return successor, cls, np.argwhere(successor >= 0)


SUCCESSOR, TRANSITION_CLASS, _PERMITTED_PAIRS = _build_tables()
N_PERMITTED = int(np.sum(SUCCESSOR >= 0))  # 88
PERMITTED = np.zeros((N_STATES, N_STATES), dtype=bool)  # (32, 32) permitted 3-motifs as state pairs
PERMITTED[_PERMITTED_PAIRS[:, 0], SUCCESSOR[_PERMITTED_PAIRS[:, 0], _PERMITTED_PAIRS[:, 1]]] = True
CLASS_OF_PAIR = np.full((N_STATES, N_STATES), -1, dtype=np.int64)  # (32, 32) class of each permitted pair
CLASS_OF_PAIR[_PERMITTED_PAIRS[:, 0], SUCCESSOR[_PERMITTED_PAIRS[:, 0], _PERMITTED_PAIRS[:, 1]]] = TRANSITION_CLASS[
    _PERMITTED_PAIRS[:, 0], _PERMITTED_PAIRS[:, 1]
]


# --- isometries ------------------------------------------------------------------------------

def isometry(step: np.ndarray | int, rotation: int, mirror: bool) -> np.ndarray:
    """Apply a D4 element to step indices: reflect ``y -> -y`` if ``mirror``, then rotate by
    ``rotation`` quarter turns counter-clockwise."""
    s = np.asarray(step, dtype=np.int64)
    return ((-s if mirror else s) + rotation) % 4


D4 = tuple((r, m) for m in (False, True) for r in range(4))


@lru_cache(maxsize=16)
def canonical_table(length: int) -> np.ndarray:
    """``(4**length,)`` code of the canonical (smallest) D4 image of every step word of that length.

    A word ``w`` is coded as ``sum(w[i] * 4**(length-1-i))``. Words with a reversal are coded
    like any other (callers filter them)."""
    if not 1 <= length <= 10:
        raise InputError("length", length, "must be 1..10 steps for a canonical table")
    words = np.array(list(itertools.product(range(4), repeat=length)), dtype=np.int64)  # (4**L, L)
    weights = 4 ** np.arange(length - 1, -1, -1)
    best = np.full(len(words), np.iinfo(np.int64).max)
    for r, m in D4:
        best = np.minimum(best, isometry(words, r, m) @ weights)
    return best


def word_code(word: np.ndarray) -> np.ndarray:
    """Codes ``(...)`` of step words ``(..., L)`` (base-4 digits, first step most significant)."""
    w = np.asarray(word, dtype=np.int64)
    weights = 4 ** np.arange(w.shape[-1] - 1, -1, -1)
    return w @ weights


def decode_word(code: int, length: int) -> tuple[int, ...]:
    out = []
    for _ in range(length):
        out.append(code % 4)
        code //= 4
    return tuple(reversed(out))


def word_name(word: tuple[int, ...] | np.ndarray) -> str:
    """Letters of a step word, e.g. ``"ENEN"``."""
    return "".join(DIRECTIONS[int(s)] for s in word)


def parse_word(text: str) -> tuple[int, ...]:
    """Inverse of :func:`word_name`; raises :class:`InputError` on a letter that is not E, N, W or S."""
    out = []
    for i, ch in enumerate(text.strip().upper()):
        if ch not in DIRECTIONS:
            raise InputError(f"word[{i}]", ch, "steps are written E, N, W or S")
        out.append(DIRECTIONS.index(ch))
    return tuple(out)


def motif_name(s0: int, s1: int) -> str:
    """Name of the motif at a vertex: ``corner-EN`` or ``straight-E``."""
    if s0 == s1:
        return f"straight-{DIRECTIONS[s0]}"
    return f"corner-{DIRECTIONS[s0]}{DIRECTIONS[s1]}"


def states_of_steps(steps: np.ndarray) -> np.ndarray:
    """2-motif state index of every window of three steps, ``(L-2,)``; -1 where the window is
    not a valid 2-motif (a reversal, three straight steps, or an unknown step)."""
    s = np.asarray(steps, dtype=np.int64).reshape(-1)
    if len(s) < 3:
        return np.zeros(0, dtype=np.int64)
    ok = (s >= 0) & (s < 4)
    code = np.where(ok, s, 0)
    c = code[:-2] * 16 + code[1:-1] * 4 + code[2:]
    valid = ok[:-2] & ok[1:-1] & ok[2:]
    lut = np.full(64, -1, dtype=np.int64)
    for i, w in enumerate(STATES):
        lut[w[0] * 16 + w[1] * 4 + w[2]] = i
    return np.where(valid, lut[c], -1)


def path_vertices(steps: np.ndarray, start: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Lattice vertices ``(L+1, 2)`` visited by a step sequence from ``start``."""
    s = np.asarray(steps, dtype=np.int64).reshape(-1)
    out = np.zeros((len(s) + 1, 2), dtype=np.int64)
    out[0] = start
    if len(s):
        out[1:] = np.asarray(start) + np.cumsum(STEP_VECTORS[s], axis=0)
    return out
