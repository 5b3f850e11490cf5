"""What a park did: read off a confirmation frame and the park signal's steps.

The confirmation frame's atoms are matched to the lattice graph (which follows drift by the
same match). The outcome of the park that moved the dopant from node ``s`` (intending ``j``):

- ``intended``: the dopant sits on ``j``;
- ``other_site``: it sits on another site (a wrong-direction hop, or two hops);
- ``none``: it is still on ``s`` (a hop and a hop back count as none, with their steps);
- ``damage``: a lattice site (three bonds in the survey) within ``local_radius_A`` of ``s`` lost
  its atom, or no dopant is left there.

:func:`trajectory` turns an outcome and the park's steps into the moves the dopant made and
when (``(node, t_start, t_end, next node or None)`` segments), which is what the hop model learns from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stemagent.policies.manipulation.changepoint import Step
from stemagent.policies.manipulation.lattice import DOPANT, EMPTY, LatticeGraph
from stemagent.types import Atoms, ScanGeometry

OUTCOME_KINDS = ("intended", "other_site", "none", "damage")


@dataclass(frozen=True)
class Outcome:
    kind: str
    from_node: int
    intended_node: int
    dopant_node: int | None
    steps: tuple[Step, ...] = ()
    new_vacancies: tuple[int, ...] = ()
    detail: str = ""
    changed: dict[int, tuple[int, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "from_node": self.from_node,
            "intended_node": self.intended_node,
            "dopant_node": -1 if self.dopant_node is None else self.dopant_node,
            "steps": [s.to_dict() for s in self.steps],
            "new_vacancies": list(self.new_vacancies),
            "detail": self.detail,
        }


def classify_outcome(
    graph: LatticeGraph,
    from_node: int,
    intended_node: int,
    atoms: Atoms,
    geometry: ScanGeometry,
    steps: tuple[Step, ...] = (),
    *,
    dopant_class: str = "Si",
    vacancy_class: str = "vacancy",
    match_A: float = 0.5,
    local_radius_A: float = 3.0,
) -> Outcome:
    """Match ``atoms`` (the confirmation frame's, sample frame) to ``graph`` (updated in place) and classify."""
    others = set(graph.dopants().tolist()) - {from_node}
    centre = graph.positions_A[from_node].copy()
    changed = graph.refresh(atoms, geometry, dopant_class=dopant_class, vacancy_class=vacancy_class, match_A=match_A)
    near = np.flatnonzero(np.linalg.norm(graph.positions_A - graph.positions_A[from_node], axis=1) <= local_radius_A)
    # only proper lattice sites (three bonds in the survey) can lose an atom: a stray detection cannot;
    # a site seen empty here is suspect (the policy looks again before it believes it)
    was_empty = {n for n, (old, _new) in changed.items() if old == EMPTY}
    vac = tuple(int(n) for n in near if n in set(graph.last_missing) and len(graph.neighbours[n]) == 3
                and (graph.occupant[n] != EMPTY or n in changed) and n not in was_empty)
    dop = [int(n) for n in near if graph.occupant[n] == DOPANT and n not in others]
    if vac:
        return Outcome("damage", from_node, intended_node, dop[0] if dop else None, tuple(steps), vac,
                       f"site(s) {list(vac)} near the dopant lost their atom", changed)
    if not dop:
        return Outcome("damage", from_node, intended_node, None, tuple(steps), (),
                       f"no dopant within {local_radius_A} Å of {tuple(np.round(centre, 2))} Å", changed)
    if from_node in dop:
        where = from_node
    elif intended_node in dop:
        where = intended_node
    else:
        where = min(dop, key=lambda n: float(np.linalg.norm(graph.positions_A[n] - graph.positions_A[from_node])))
    for n in dop:  # a second "dopant" here is a misclassified carbon: keep the graph's map clean
        if n != where:
            graph.occupant[n] = 0
    kind = "none" if where == from_node else "intended" if where == intended_node else "other_site"
    return Outcome(kind, from_node, intended_node, where, tuple(steps), (), f"dopant on site {where}", changed)


def _path_between(graph: LatticeGraph, a: int, b: int) -> list[int]:
    """Nodes of the shortest bond path from ``a`` to ``b`` ignoring occupants (at most 3 hops), else ``[a, b]``."""
    if b in graph.neighbours[a]:
        return [a, b]
    for m in graph.neighbours[a]:
        if b in graph.neighbours[m]:
            return [a, int(m), b]
    for m in graph.neighbours[a]:
        for m2 in graph.neighbours[m]:
            if b in graph.neighbours[m2]:
                return [a, int(m), int(m2), b]
    return [a, b]


def trajectory(graph: LatticeGraph, outcome: Outcome | None, from_node: int, intended_node: int, dwell_s: float,
               steps: tuple[Step, ...]) -> list[tuple[int, float, float, int | None]]:
    """Segments ``(node, t_start_s, t_end_s, moved_to)`` of the dopant during one park.

    Step times are used when their number matches the moves; otherwise moves are spread evenly
    over the dwell (their times unknown). ``outcome`` None: nothing observed, no move assumed."""
    times = [min(max(s.time_s, 0.0), dwell_s) for s in steps]
    if outcome is None or outcome.kind == "damage" or outcome.dopant_node is None:
        return [(from_node, 0.0, dwell_s, None)]
    end = outcome.dopant_node
    if end == from_node:
        if len(times) >= 2 and len(times) % 2 == 0:
            nodes = [from_node, intended_node] * (len(times) // 2) + [from_node]
        else:
            return [(from_node, 0.0, dwell_s, None)]
    else:
        nodes = _path_between(graph, from_node, end)
        if end == intended_node and len(times) > 1 and len(times) % 2 == 1:
            nodes = [from_node, intended_node] * (len(times) // 2) + [from_node, intended_node]
    moves = len(nodes) - 1
    if len(times) != moves:
        times = [dwell_s * (k + 1) / (moves + 1) for k in range(moves)]
    segs: list[tuple[int, float, float, int | None]] = []
    t0 = 0.0
    for k in range(moves):
        segs.append((nodes[k], t0, times[k], nodes[k + 1]))
        t0 = times[k]
    segs.append((nodes[-1], t0, dwell_s, None))
    return segs
