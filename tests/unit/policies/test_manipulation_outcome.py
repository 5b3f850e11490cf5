"""What a park did, read off a confirmation frame and the park signal's steps."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.policies.manipulation.changepoint import Step
from stemagent.policies.manipulation.lattice import DOPANT, LatticeGraph
from stemagent.policies.manipulation.outcome import classify_outcome, trajectory
from stemagent.policies.manipulation.synthetic import graphene_sites
from stemagent.types import Atoms, ScanGeometry

NAMES = ("C", "Si", "vacancy")
SURVEY = ScanGeometry(center_A=(0.0, 0.0), fov_A=(20.0, 20.0), shape_px=(100, 100), dwell_s=1e-6)
CONFIRM = ScanGeometry(center_A=(0.0, 0.0), fov_A=(9.0, 9.0), shape_px=(48, 48), dwell_s=2e-6)


@pytest.fixture()
def world() -> tuple[np.ndarray, LatticeGraph, int]:
    sites = graphene_sites(26.0)
    sites = sites[SURVEY.contains(sites)]
    si = int(np.argmin(np.linalg.norm(sites, axis=1)))
    classes = np.zeros(len(sites), dtype=np.int64)
    classes[si] = 1
    g = LatticeGraph.from_atoms(Atoms(sites, classes, np.ones(len(sites)), 0, class_names=NAMES), SURVEY)
    return sites, g, si


def _frame(sites: np.ndarray, dopant: int, missing: tuple[int, ...] = (), rng_seed: int = 0) -> Atoms:
    inside = np.flatnonzero(CONFIRM.contains(sites))
    inside = np.setdiff1d(inside, np.asarray(missing, dtype=np.int64))
    pos = sites[inside] + np.random.default_rng(rng_seed).normal(0, 0.04, (len(inside), 2))
    return Atoms(pos, (inside == dopant).astype(np.int64), np.ones(len(inside)), 1, class_names=NAMES)


def test_intended_other_and_none(world) -> None:  # type: ignore[no-untyped-def]
    sites, g, si = world
    j, k = int(g.neighbours[si][0]), int(g.neighbours[si][1])
    step = (Step(400, 0.4, 900.0, 40.0),)
    o = classify_outcome(g, si, j, _frame(sites, j), CONFIRM, step)
    assert (o.kind, o.dopant_node) == ("intended", j) and g.occupant[j] == DOPANT and g.occupant[si] != DOPANT
    o = classify_outcome(g, j, si, _frame(sites, k), CONFIRM, step)  # from j, meant to go back, went on to k (via si)
    assert (o.kind, o.dopant_node) == ("other_site", k)
    o = classify_outcome(g, k, si, _frame(sites, k), CONFIRM, ())
    assert (o.kind, o.dopant_node) == ("none", k)


def test_a_lost_atom_or_a_lost_dopant_is_damage(world) -> None:  # type: ignore[no-untyped-def]
    sites, g, si = world
    j = int(g.neighbours[si][0])
    nn2 = int(g.neighbours[j][0] if g.neighbours[j][0] != si else g.neighbours[j][1])
    o = classify_outcome(g, si, j, _frame(sites, si, missing=(nn2,)), CONFIRM)
    assert o.kind == "damage" and o.new_vacancies == (nn2,)
    sites2, g2, si2 = world[0], LatticeGraph.from_atoms(Atoms(sites, (np.arange(len(sites)) == si).astype(int),
                                                               np.ones(len(sites)), 0, class_names=NAMES), SURVEY), si
    o = classify_outcome(g2, si2, j, _frame(sites2, -1), CONFIRM)  # no dopant anywhere near
    assert o.kind == "damage" and o.dopant_node is None and "no dopant" in o.detail


def test_trajectory_uses_step_times_when_they_fit_the_moves(world) -> None:  # type: ignore[no-untyped-def]
    sites, g, si = world
    j = int(g.neighbours[si][0])
    one = (Step(300, 0.3, 900.0, 30.0),)
    o = classify_outcome(g, si, j, _frame(sites, j), CONFIRM, one)
    assert trajectory(g, o, si, j, 1.0, one) == [(si, 0.0, 0.3, j), (j, 0.3, 1.0, None)]
    # a hop and a hop back: the dopant ends where it started, two moves at the two step times
    two = (Step(200, 0.2, 900.0, 30.0), Step(700, 0.7, -900.0, 30.0))
    g.occupant[:] = 0
    g.occupant[si] = DOPANT
    o = classify_outcome(g, si, j, _frame(sites, si), CONFIRM, two)
    assert o.kind == "none"
    assert trajectory(g, o, si, j, 1.0, two) == [(si, 0.0, 0.2, j), (j, 0.2, 0.7, si), (si, 0.7, 1.0, None)]
    # a move the signal missed: its time is unknown, spread over the dwell
    g.occupant[:] = 0
    g.occupant[si] = DOPANT
    o = classify_outcome(g, si, j, _frame(sites, j), CONFIRM, ())
    assert trajectory(g, o, si, j, 2.0, ()) == [(si, 0.0, 1.0, j), (j, 1.0, 2.0, None)]
    assert trajectory(g, None, si, j, 2.0, ()) == [(si, 0.0, 2.0, None)]
