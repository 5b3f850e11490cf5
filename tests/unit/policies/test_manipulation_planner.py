"""The lattice graph and the planner: paths avoid dopants, vacancies and edges; bad targets are refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.errors import InputError
from stemagent.policies.manipulation.lattice import CARBON, DOPANT, EMPTY, GRAPHENE_BOND_A, LatticeGraph, PlanRefused
from stemagent.policies.manipulation.synthetic import graphene_sites
from stemagent.types import Atoms, ScanGeometry

FIELD = ScanGeometry(center_A=(0.0, 0.0), fov_A=(20.0, 20.0), shape_px=(100, 100), dwell_s=1e-6)
NAMES = ("C", "Si", "vacancy")


def _site(sites: np.ndarray, xy: tuple[float, float]) -> int:
    return int(np.argmin(np.linalg.norm(sites - np.asarray(xy), axis=1)))


def _graph(dopants: list[int], vacancies: list[int], sites: np.ndarray, missing: list[int] = ()) -> LatticeGraph:
    classes = np.zeros(len(sites), dtype=np.int64)
    classes[dopants] = 1
    classes[vacancies] = 2
    keep = np.setdiff1d(np.arange(len(sites)), np.asarray(missing, dtype=np.int64))
    atoms = Atoms(sites[keep], classes[keep], np.ones(len(keep)), 0, class_names=NAMES)
    return LatticeGraph.from_atoms(atoms, FIELD)


@pytest.fixture()
def sites() -> np.ndarray:
    s = graphene_sites(26.0)
    return s[FIELD.contains(s)]


def test_bonds_join_nearest_neighbours_only(sites: np.ndarray) -> None:
    g = _graph([_site(sites, (0, 0))], [], sites)
    inner = np.flatnonzero(g.inside_field(g.positions_A, margin_A=2.0))
    assert all(len(g.neighbours[i]) == 3 for i in inner)
    d = [np.linalg.norm(g.positions_A[i] - g.positions_A[j]) for i in inner for j in g.neighbours[i]]
    assert np.allclose(d, GRAPHENE_BOND_A, atol=1e-6)


def test_path_is_the_shortest_chain_of_bonds_and_avoids_defects(sites: np.ndarray) -> None:
    si = _site(sites, (0, 0))
    target = _site(sites, (6.0, 0.0))
    g = _graph([si], [], sites)
    free = g.plan(si, target)
    assert free[0] == si and free[-1] == target
    assert all(b in g.neighbours[a] for a, b in zip(free, free[1:]))
    n_free = len(free)
    # block the middle of that path with a vacancy and put another dopant on the next best route
    vac = free[len(free) // 2]
    g2 = _graph([si], [vac], sites)
    path = g2.plan(si, target)
    assert vac not in path and all(g2.occupant[n] == CARBON for n in path[1:])
    assert not set(path[1:]) & set(g2.neighbours[vac].tolist())  # never next to the hole
    assert len(path) >= n_free


def test_other_dopants_and_their_neighbours_are_avoided(sites: np.ndarray) -> None:
    si, other = _site(sites, (0, 0)), _site(sites, (3.7, 0.0))
    g = _graph([si, other], [], sites)
    path = g.plan(si, _site(sites, (7.4, 0.0)))
    assert other not in path
    assert not set(path) & set(g.neighbours[other].tolist())


@pytest.mark.parametrize(
    "target, why",
    [
        ((14.0, 0.0), "out-of-field"),
        ((0.71, 0.0), "off-lattice"),  # half a bond from a site
    ],
)
def test_targets_outside_the_field_or_off_the_lattice_are_refused(sites: np.ndarray, target: tuple[float, float], why: str) -> None:
    si = _site(sites, (0, 0))
    g = _graph([si], [], sites)
    with pytest.raises(PlanRefused, match=why) as err:
        g.locate_target(target, si)
    assert isinstance(err.value, InputError) and err.value.field == "target_A"


def test_occupied_targets_are_refused_with_what_occupies_them(sites: np.ndarray) -> None:
    si, other, hole = _site(sites, (0, 0)), _site(sites, (4.9, 2.8)), _site(sites, (-4.9, 2.8))
    g = _graph([si, other], [hole], sites)
    with pytest.raises(PlanRefused, match="another dopant"):
        g.locate_target(tuple(g.positions_A[other]), si)
    with pytest.raises(PlanRefused, match="vacancy"):
        g.locate_target(tuple(g.positions_A[hole]), si)
    next_to_hole = int(g.neighbours[hole][0])
    with pytest.raises(PlanRefused, match="next to"):
        g.locate_target(tuple(g.positions_A[next_to_hole]), si)
    edge = _site(sites, (9.5, 0.0))
    with pytest.raises(PlanRefused, match="field edge"):
        g.locate_target(tuple(g.positions_A[edge]), si)


def test_an_enclosed_target_is_refused_as_unreachable(sites: np.ndarray) -> None:
    si = _site(sites, (0, 0))
    target = _site(sites, (6.15, 1.42))
    ring = [int(n) for n in range(len(sites)) if 2.3 < np.linalg.norm(sites[n] - sites[target]) < 2.6]
    g2 = _graph([si], ring, sites)  # second neighbours of the target emptied: no way in
    node = g2.locate_target(tuple(g2.positions_A[target]), si)  # the target itself is fine
    with pytest.raises(PlanRefused, match="cannot be reached"):
        g2.plan(si, node)


def test_missing_detections_make_edges_and_a_segmenter_without_classes_is_refused(sites: np.ndarray) -> None:
    si, gone = _site(sites, (0, 0)), _site(sites, (3.7, 2.1))
    g = _graph([si], [], sites, missing=[gone])
    for n in np.flatnonzero(np.linalg.norm(g.positions_A - sites[gone], axis=1) < 1.6):
        assert len(g.neighbours[n]) == 2 and not g.passable(si)[n]
    plain = Atoms(sites, np.zeros(len(sites), dtype=np.int64), np.ones(len(sites)), 0)
    with pytest.raises(InputError, match="dopant class 'Si'"):
        LatticeGraph.from_atoms(plain, FIELD)


def test_refresh_follows_a_drift_and_sees_the_dopant_move(sites: np.ndarray) -> None:
    si = _site(sites, (0, 0))
    g = _graph([si], [], sites)
    j = int(g.neighbours[si][0])
    shift = np.array([0.25, -0.15])
    classes = np.zeros(len(sites), dtype=np.int64)
    classes[j] = 1
    conf = ScanGeometry(center_A=(0.0, 0.0), fov_A=(9.0, 9.0), shape_px=(48, 48), dwell_s=2e-6)
    inside = conf.contains(sites + shift)
    atoms = Atoms((sites + shift)[inside], classes[inside], np.ones(int(inside.sum())), 1, class_names=NAMES)
    changed = g.refresh(atoms, conf)
    assert changed == {si: (DOPANT, CARBON), j: (CARBON, DOPANT)}
    assert np.allclose(g.shift_A, shift, atol=0.02)
    assert np.allclose(g.positions_A[si], sites[si] + shift, atol=0.02)
    assert EMPTY not in g.occupant[inside]


def test_closer_neighbours_are_the_ones_a_bond_nearer_the_target(sites: np.ndarray) -> None:
    si = _site(sites, (0, 0))
    g = _graph([si], [], sites)
    target = _site(sites, (4.3, 2.5))  # off the bond directions: more than one first step is shortest
    d = g.hops_to(target, si)
    closer = g.closer_neighbours(si, target)
    assert closer and all(d[k] == d[si] - 1 for k in closer)
    assert set(closer) | {int(k) for k in g.neighbours[si] if d[k] == d[si] + 1} == {int(k) for k in g.neighbours[si]}
    assert g.plan(si, target)[1] in closer
