"""Significant tileable long k-motifs: the stated test finds a planted motif and nothing in chain data."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.boundaries.chain import BoundaryChain, ReducedParams
from stemagent.boundaries.estimate import count_transitions, fit_reduced
from stemagent.boundaries.kmotifs import significant_kmotifs, split_known, tile_translation
from stemagent.boundaries.lattice import parse_word, word_name
from stemagent.errors import InputError


def test_tileability() -> None:
    assert tile_translation(parse_word("ENENE")) == (2, 2)  # a staircase
    assert tile_translation(parse_word("ENWNE")) == (0, 2)  # a meander
    assert tile_translation(parse_word("ENWSE")) is None  # closes a square: zero translation
    assert tile_translation(parse_word("ENENN")) is None  # last step differs from the first
    assert tile_translation(parse_word("EENEE")) is None  # the junction makes three straight steps


def test_split_known() -> None:
    parts = split_known([np.array([0, 1, -1, 0, 1, 0]), np.array([-1, -1])])
    assert [p.tolist() for p in parts] == [[0, 1], [0, 1, 0]]


def test_chain_data_has_no_discoveries_and_a_planted_motif_is_found() -> None:
    chain = BoundaryChain.from_params(ReducedParams())
    rng = np.random.default_rng(5)
    seqs = list(chain.sample_many(60, 30, rng))
    null = significant_kmotifs(seqs, chain, ks=(4, 5, 6), n_boot=300, rng=np.random.default_rng(1))
    assert null and sum(m.significant for m in null) <= 1  # FDR 5%
    assert all(m.tileable for m in null)
    # plant a tileable 6-motif (period ENNESE..) twice in a third of the boundaries
    tile = list(parse_word("ENNESE"))
    assert tile_translation(tile + tile[:1]) is not None
    planted = []
    for i, s in enumerate(seqs):
        if i % 3 == 0:
            s = np.concatenate([s[:10], tile * 2, [tile[0]], s[10:]])
            if len(count_transitions([s]).forbidden):
                continue
        planted.append(s)
    fitted = BoundaryChain.from_params(fit_reduced(count_transitions(planted)).params)
    found = significant_kmotifs(planted, fitted, ks=(4, 5, 6), n_boot=300, rng=np.random.default_rng(2))
    hits = [m for m in found if m.significant and m.k == 6]
    canon = {m.word for m in found if m.k == 6 and m.observed >= 10}
    assert hits, [m for m in found[:5]]
    assert any(w in canon for w in (m.word for m in hits))
    assert hits[0].observed > 3 * hits[0].expected and hits[0].q_value <= 0.05
    assert word_name(parse_word(hits[0].word)) == hits[0].word


def test_bad_k() -> None:
    with pytest.raises(InputError, match="ks"):
        significant_kmotifs([np.array([0, 1, 0, 1])], BoundaryChain.from_params(ReducedParams()), ks=(12,))
