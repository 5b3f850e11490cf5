"""The lattice graph of a graphene field and the path of a Si dopant through it.

Nodes are the sites the segmenter found (atoms and vacancy detections) in the survey frame;
bonds join nodes one graphene bond length apart. Each node keeps its survey position
``site_A`` (its identity, used to pool the hop model by place) and a current position
``positions_A`` that follows drift whenever a confirmation frame is matched against the graph.
``occupant`` says what sits there now: carbon, a dopant, or nothing.

The planner moves the dopant along the shortest chain of bonds to the target, through sites that
are carbon, have three bonded neighbours (so not an edge of the field or a site next to a hole),
lie at least ``edge_margin_A`` inside the field, and do not touch another dopant or a vacancy.
A target it cannot use is refused with :class:`PlanRefused`, which names the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as dc_field

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import shortest_path
from scipy.spatial import cKDTree

from stemagent.errors import InputError
from stemagent.types import Atoms, ScanGeometry

CARBON, DOPANT, EMPTY = 0, 1, 2
OCCUPANT_NAMES = ("carbon", "dopant", "empty")
GRAPHENE_BOND_A = 2.46 / math.sqrt(3.0)


class PlanRefused(InputError):
    """A target (or the dopant to move) cannot be used; ``reason`` says why in words."""

    def __init__(self, field_name: str, value: object, reason: str) -> None:
        super().__init__(field_name, value, reason)
        self.reason = reason


@dataclass
class LatticeGraph:
    """Sites of one field, their bonds and occupants.

    ``site_A`` ``(n, 2)``: survey positions (identity); ``positions_A`` ``(n, 2)``: current
    positions (sample frame, Å); ``occupant`` ``(n,)``: CARBON, DOPANT or EMPTY;
    ``neighbours``: bonded node indices per node; ``field``: the survey geometry.
    """

    site_A: np.ndarray
    positions_A: np.ndarray
    occupant: np.ndarray
    neighbours: list[np.ndarray]
    field: ScanGeometry
    edge_margin_A: float = 1.5
    shift_A: np.ndarray = dc_field(default_factory=lambda: np.zeros(2))
    misses: np.ndarray = dc_field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # consecutive looks without an atom
    empty_after_misses: int = 2
    last_missing: tuple[int, ...] = ()  # covered by the last refresh but without an atom on them

    def __post_init__(self) -> None:
        if len(self.misses) != len(self.site_A):
            self.misses = np.zeros(len(self.site_A), dtype=np.int64)

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_atoms(
        cls,
        atoms: Atoms,
        geometry: ScanGeometry,
        *,
        dopant_class: str = "Si",
        vacancy_class: str = "vacancy",
        bond_A: float = GRAPHENE_BOND_A,
        bond_tolerance_A: float = 0.3,
        edge_margin_A: float = 1.5,
    ) -> "LatticeGraph":
        """Build the graph from a segmented survey frame. Classes other than the dopant and
        vacancy classes count as carbon; a segmenter without a ``dopant_class`` is refused."""
        if dopant_class not in atoms.class_names:
            raise InputError("atoms.class_names", atoms.class_names, f"must include the dopant class {dopant_class!r} (use a segmenter with classes)")
        if len(atoms) < 4:
            raise InputError("atoms", len(atoms), "too few atoms in the survey frame to build a lattice")
        pos = np.asarray(atoms.positions_A, dtype=np.float64)
        occ = np.full(len(pos), CARBON, dtype=np.int64)
        occ[atoms.classes == atoms.class_names.index(dopant_class)] = DOPANT
        if vacancy_class in atoms.class_names:
            occ[atoms.classes == atoms.class_names.index(vacancy_class)] = EMPTY
        tree = cKDTree(pos)
        pairs = tree.query_pairs(bond_A + bond_tolerance_A, output_type="ndarray")
        d = np.linalg.norm(pos[pairs[:, 0]] - pos[pairs[:, 1]], axis=1) if len(pairs) else np.zeros(0)
        pairs = pairs[d >= bond_A - bond_tolerance_A] if len(pairs) else pairs
        nbrs: list[list[int]] = [[] for _ in range(len(pos))]
        for i, j in pairs.tolist():
            nbrs[i].append(j)
            nbrs[j].append(i)
        return cls(
            site_A=pos.copy(),
            positions_A=pos.copy(),
            occupant=occ,
            neighbours=[np.asarray(sorted(n), dtype=np.int64) for n in nbrs],
            field=geometry,
            edge_margin_A=float(edge_margin_A),
        )

    def __len__(self) -> int:
        return len(self.site_A)

    # --- queries -------------------------------------------------------------------------------
    def nearest(self, xy_A: tuple[float, float] | np.ndarray) -> tuple[int, float]:
        """The node nearest ``xy_A`` (current positions) and its distance in Å."""
        d = np.linalg.norm(self.positions_A - np.asarray(xy_A, dtype=np.float64).reshape(1, 2), axis=1)
        k = int(np.argmin(d))
        return k, float(d[k])

    def inside_field(self, xy_A: np.ndarray, margin_A: float | None = None) -> np.ndarray:
        """``(n,)`` which positions lie inside the survey field by ``margin_A`` (default: the edge margin)."""
        m = self.edge_margin_A if margin_A is None else margin_A
        return self.field.contains(np.asarray(xy_A, dtype=np.float64).reshape(-1, 2), margin_A=m)

    def dopants(self) -> np.ndarray:
        return np.flatnonzero(self.occupant == DOPANT)

    def passable(self, moving: int) -> np.ndarray:
        """``(n,)`` which nodes the dopant at node ``moving`` may step onto (see the module docstring)."""
        n = len(self)
        ok = (self.occupant == CARBON) & self.inside_field(self.positions_A)
        ok &= np.array([len(nb) == 3 for nb in self.neighbours])
        for k in np.flatnonzero(self.occupant != CARBON):
            if k == moving:
                continue
            ok[self.neighbours[k]] = False  # next to another dopant or a hole
        ok[moving] = True
        return ok if n else np.zeros(0, dtype=bool)

    def why_not_passable(self, node: int, moving: int) -> str:
        if self.occupant[node] == DOPANT:
            return "is occupied by another dopant"
        if self.occupant[node] == EMPTY:
            return "is a vacancy"
        if not self.inside_field(self.positions_A[node : node + 1])[0]:
            return f"is within {self.edge_margin_A} Å of the field edge"
        if len(self.neighbours[node]) != 3:
            return f"has {len(self.neighbours[node])} bonded neighbours, not 3 (an edge or a hole next to it)"
        for k in self.neighbours[node]:
            if k != moving and self.occupant[k] != CARBON:
                return f"is next to a {OCCUPANT_NAMES[self.occupant[k]]} site"
        return "cannot be used"

    # --- targets and paths ---------------------------------------------------------------------
    def locate_target(self, target_A: tuple[float, float], moving: int, tolerance_A: float = 0.4) -> int:
        """The node at ``target_A``; :class:`PlanRefused` if it is outside the field, off the
        lattice, occupied or otherwise unusable for the dopant at node ``moving``."""
        t = np.asarray(target_A, dtype=np.float64).reshape(-1)
        if t.shape != (2,) or not np.all(np.isfinite(t)):
            raise PlanRefused("target_A", target_A, "must be two finite coordinates in Å")
        if not self.inside_field(t[None, :], margin_A=0.0)[0]:
            g = self.field
            raise PlanRefused("target_A", tuple(t), f"is outside the observed field (centre {g.center_A} Å, fov {g.fov_A} Å): out-of-field")
        node, d = self.nearest(t)
        if d > tolerance_A:
            raise PlanRefused("target_A", tuple(t), f"is {d:.2f} Å from the nearest lattice site (tolerance {tolerance_A} Å): off-lattice")
        if node == moving:
            return node
        if not self.passable(moving)[node]:
            raise PlanRefused("target_A", tuple(t), f"site {node} {self.why_not_passable(node, moving)}: occupied or unusable")
        return node

    def plan(self, start: int, goal: int) -> list[int]:
        """Shortest chain of bonds from ``start`` to ``goal`` through passable nodes, both ends
        included; :class:`PlanRefused` if there is none."""
        if start == goal:
            return [start]
        _, pred = shortest_path(self._adjacency(start), directed=False, unweighted=True, indices=start, return_predecessors=True)
        if pred[goal] < 0:
            raise PlanRefused("target_A", tuple(self.positions_A[goal]), "cannot be reached from the dopant through carbon sites away from defects and edges")
        path = [goal]
        while path[-1] != start:
            path.append(int(pred[path[-1]]))
        return path[::-1]

    def hops_to(self, goal: int, moving: int) -> np.ndarray:
        """``(n,)`` bonds from every node to ``goal`` through the nodes the dopant at ``moving`` may
        step onto (``inf`` where there is no way)."""
        return np.asarray(shortest_path(self._adjacency(moving), directed=False, unweighted=True, indices=goal))

    def closer_neighbours(self, node: int, goal: int) -> list[int]:
        """The neighbours of ``node`` one bond closer to ``goal`` (a hop to any of them is progress)."""
        d = self.hops_to(goal, node)
        return [int(k) for k in self.neighbours[node] if np.isfinite(d[k]) and d[k] == d[node] - 1]

    def _adjacency(self, moving: int) -> csr_matrix:
        ok = self.passable(moving)
        rows, cols = [], []
        for i in np.flatnonzero(ok):
            for j in self.neighbours[i]:
                if ok[j]:
                    rows.append(i)
                    cols.append(j)
        n = len(self)
        return csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))

    # --- keeping up with the specimen ---------------------------------------------------------
    def refresh(self, atoms: Atoms, geometry: ScanGeometry, *, dopant_class: str = "Si", vacancy_class: str = "vacancy",
                match_A: float = 0.5, margin_A: float = 1.2) -> dict[int, tuple[int, int]]:
        """Match a confirmation frame's atoms to the nodes inside it: first a common shift (drift)
        applied to every node, then each covered node's occupant from the atom on it. A node with
        no atom on it (or a vacancy detection) is in :attr:`last_missing`; it becomes EMPTY only
        after ``empty_after_misses`` such looks in a row (one missed detection is not a hole).
        Returns ``{node: (old occupant, new occupant)}`` for the nodes that changed."""
        pos = np.asarray(atoms.positions_A, dtype=np.float64).reshape(-1, 2)
        covered = np.flatnonzero(geometry.contains(self.positions_A, margin_A=margin_A))
        self.last_missing = ()
        if len(pos) == 0 or len(covered) == 0:
            return {}
        tree = cKDTree(pos)
        d, k = tree.query(self.positions_A[covered])
        close = d < 2 * match_A
        if close.sum() >= 3:
            shift = np.median(pos[k[close]] - self.positions_A[covered[close]], axis=0)
            self.positions_A += shift
            self.shift_A = self.shift_A + shift
            covered = np.flatnonzero(geometry.contains(self.positions_A, margin_A=margin_A))
            d, k = tree.query(self.positions_A[covered])
        names = atoms.class_names
        dop = names.index(dopant_class) if dopant_class in names else -1
        vac = names.index(vacancy_class) if vacancy_class in names else -1
        changed: dict[int, tuple[int, int]] = {}
        missing: list[int] = []
        for node, dist, idx in zip(covered.tolist(), d.tolist(), k.tolist()):
            old = int(self.occupant[node])
            c = int(atoms.classes[idx]) if dist <= match_A else vac
            if dist <= match_A:
                self.positions_A[node] = 0.5 * (self.positions_A[node] + pos[idx])  # follow small local motion
            if dist > match_A or c == vac:
                missing.append(node)
                self.misses[node] += 1
                new = EMPTY if (self.misses[node] >= self.empty_after_misses or old == EMPTY) else old
            else:
                self.misses[node] = 0
                new = DOPANT if c == dop else CARBON
            if new != old:
                changed[node] = (old, new)
                self.occupant[node] = new
        self.last_missing = tuple(missing)
        return changed
