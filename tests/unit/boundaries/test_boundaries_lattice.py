"""The boundary alphabet: the published counts (32 2-motifs, 88 3-motifs, 11 classes) and the isometries."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stemagent.boundaries.lattice import (
    CLASS_NAMES,
    CLASS_OF_PAIR,
    D4,
    N_PERMITTED,
    N_STATES,
    PERMITTED,
    STATE_INDEX,
    STATE_ORBIT,
    STATES,
    canonical_table,
    isometry,
    parse_word,
    path_vertices,
    states_of_steps,
    valid_word,
    word_code,
    word_name,
)
from stemagent.errors import InputError


def test_counts_match_the_published_model() -> None:
    assert N_STATES == 32
    assert N_PERMITTED == 88 == int(PERMITTED.sum())
    assert len(CLASS_NAMES) == 11
    assert np.bincount(CLASS_OF_PAIR[PERMITTED]).tolist() == [8] * 11
    assert np.bincount(STATE_ORBIT).tolist() == [8, 8, 8, 8]  # x (8), y (16 = Y1 + Y2), z (8)


def test_every_class_is_one_free_orbit_of_the_isometries() -> None:
    words = [w for w in itertools.product(range(4), repeat=4) if valid_word(w)]
    assert len(words) == 88
    for w in words:
        images = {tuple(isometry(np.array(w), r, m).tolist()) for r, m in D4}
        assert len(images) == 8  # free action: no isometry fixes a 3-motif
        cls = {int(CLASS_OF_PAIR[STATE_INDEX[im[:3]], STATE_INDEX[im[1:]]]) for im in images}
        assert len(cls) == 1  # a class is closed under the isometries


def test_rows_of_orbits_have_the_published_successors() -> None:
    for i, _w in enumerate(STATES):
        succ_classes = sorted(CLASS_NAMES[c] for c in CLASS_OF_PAIR[i][PERMITTED[i]])
        orbit = ("X", "Y1", "Y2", "Z")[STATE_ORBIT[i]]
        assert all(name.startswith(orbit + "->") for name in succ_classes)
        assert len(succ_classes) == (2 if orbit == "Y2" else 3)


def test_states_of_steps_marks_invalid_windows() -> None:
    steps = np.array(parse_word("ENEEENW"))  # EEE is three straight steps, NW... fine
    st = states_of_steps(steps)
    assert st.tolist()[0] == STATE_INDEX[(0, 1, 0)]
    assert st[2] == -1  # E E E
    assert states_of_steps(np.array([0, 2, 0])).tolist() == [-1]  # a reversal
    assert states_of_steps(np.array([0, -1, 1])).tolist() == [-1]  # an unread step


def test_canonical_table_is_invariant_under_isometries() -> None:
    table = canonical_table(5)
    rng = np.random.default_rng(0)
    words = rng.integers(0, 4, size=(50, 5))
    for w in words:
        codes = {int(table[word_code(isometry(w, r, m))]) for r, m in D4}
        assert len(codes) == 1
    with pytest.raises(InputError, match="length"):
        canonical_table(11)


def test_words_and_paths() -> None:
    assert word_name(parse_word("ensw")) == "ENSW"
    with pytest.raises(InputError, match=r"word\[1\]"):
        parse_word("EX")
    assert path_vertices(np.array(parse_word("ENWS"))).tolist() == [[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]
