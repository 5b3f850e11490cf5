"""Gated, lattice-aware assignment of detections to predicted atom positions."""

from __future__ import annotations

import numpy as np

from stemagent.drift.synthetic import hexagonal_lattice_A
from stemagent.drift.tracking import match, nearest_neighbour_spacing_A

SITES = hexagonal_lattice_A(30.0, spacing_A=1.42)


def _pairs(m) -> dict[int, int]:
    return dict(zip(m.pred.tolist(), m.det.tolist()))


def test_drift_match_recovers_every_atom_under_a_common_shift_and_noise() -> None:
    rng = np.random.default_rng(0)
    order = rng.permutation(len(SITES))
    detected = SITES[order] + np.array([0.45, -0.3]) + rng.normal(0, 0.03, (len(SITES), 2))
    m = match(SITES, detected)
    assert abs(m.spacing_A - 1.42) < 0.05
    np.testing.assert_allclose(m.shift_A, [0.45, -0.3], atol=0.02)
    assert len(m.pred) == len(SITES)
    assert np.all(order[m.det] == m.pred)  # detection j is site order[j]


def test_drift_match_survives_missing_atoms_vacancy_and_a_hop_without_false_matches() -> None:
    rng = np.random.default_rng(1)
    present = rng.random(len(SITES)) >= 0.3  # 30 % of the atoms not detected
    vacancy = int(np.argmin(np.linalg.norm(SITES - [2.0, 2.0], axis=1)))
    present[vacancy] = False  # a new vacancy
    # a hop: the atom nearest (-5, 0) moves to a neighbouring empty site 1.42 Å away
    hopper = int(np.argmin(np.linalg.norm(SITES - [-5.0, 0.0], axis=1)))
    present[hopper] = True
    d = np.linalg.norm(SITES - SITES[hopper], axis=1)
    target = int(np.flatnonzero((d > 1.3) & (d < 1.5))[0])
    present[target] = False
    ids = np.flatnonzero(present)
    detected = SITES[ids] + rng.normal(0, 0.03, (len(ids), 2))
    detected[ids == hopper] = SITES[target] + rng.normal(0, 0.03, 2)
    tracked = np.ones(len(SITES), dtype=bool)
    tracked[target] = False  # the hop's destination was an empty site: nothing tracked there
    m = match(SITES[tracked], detected, spacing_A=1.42)
    tracked_ids = np.flatnonzero(tracked)
    m.pred = tracked_ids[m.pred]
    pairs = _pairs(m)
    assert vacancy not in pairs
    assert hopper not in pairs  # its old place is empty: no detection within the gate
    hop_det = int(np.flatnonzero(ids == hopper)[0])
    assert hop_det not in m.det  # the hop's destination is a new atom, not a displacement
    stayed = [i for i in ids if i != hopper]
    assert len(m.pred) == len(stayed)
    assert all(ids[pairs[p]] == p for p in m.pred)  # every match is the right atom


def test_drift_match_resolves_a_doubled_detection_by_assignment() -> None:
    sites = SITES[:40]
    detected = np.concatenate([sites, sites[:1] + [0.2, 0.0]])  # a spurious second peak near atom 0
    m = match(sites, detected, spacing_A=1.42)
    pairs = _pairs(m)
    assert pairs[0] == 0 and len(m.pred) == 40 and 40 not in m.det


def test_drift_match_on_empty_or_degenerate_input_returns_no_matches() -> None:
    assert len(match(np.zeros((0, 2)), SITES).pred) == 0
    assert len(match(SITES, np.zeros((0, 2))).pred) == 0
    assert len(match(SITES, SITES[:1]).pred) == 0  # one detection: no spacing to gate with
    assert np.isnan(nearest_neighbour_spacing_A(SITES[:1]))
