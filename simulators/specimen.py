"""The :class:`Specimen` data model: atoms (identity, species, position) and the lattice sites they occupy.

Atoms are never created or deleted: a sputtered atom keeps its row with ``present = False``; a
Si-C swap exchanges the two atoms' positions and sites. Positions are ``(x, y, z)`` in Å in the
sample frame; ``z`` is along the beam (used by multislice only). The specimens themselves are
built in :mod:`stemagent.simulators.specimens` (and the modules it names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: in-plane lattice constants of the TMD specimens, Å
TMD_LATTICE_A = {"mos2": 3.16, "ws2": 3.18, "mose2": 3.29}


@dataclass
class Specimen:
    """Atoms and sites of one specimen (arrays are mutated in place by beam-induced events).

    ``positions_A`` ``(N, 3)``; ``numbers`` ``(N,)`` Z; ``present`` ``(N,)`` bool;
    ``site_of_atom`` ``(N,)`` index into ``sites_A`` ``(M, 2)``; ``site_role`` ``(M,)`` int
    (meaning depends on ``kind``); ``u_rms_A`` ``(N,)`` thermal rms displacement per direction;
    ``class_names``: labels :meth:`site_labels` indexes into.
    """

    kind: str
    positions_A: np.ndarray
    numbers: np.ndarray
    present: np.ndarray
    site_of_atom: np.ndarray
    sites_A: np.ndarray
    site_role: np.ndarray
    u_rms_A: np.ndarray
    class_names: tuple[str, ...]
    host_number: np.ndarray  # (M,) Z of the species that nominally occupies each site
    host_count: np.ndarray  # (M,) number of atoms nominally in each site's column
    extent_A: tuple[float, float, float, float]  # xmin, xmax, ymin, ymax
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.numbers)

    @property
    def n_sites(self) -> int:
        return len(self.sites_A)

    def copy(self) -> "Specimen":
        return Specimen(
            kind=self.kind,
            positions_A=self.positions_A.copy(),
            numbers=self.numbers.copy(),
            present=self.present.copy(),
            site_of_atom=self.site_of_atom.copy(),
            sites_A=self.sites_A.copy(),
            site_role=self.site_role.copy(),
            u_rms_A=self.u_rms_A.copy(),
            class_names=self.class_names,
            host_number=self.host_number.copy(),
            host_count=self.host_count.copy(),
            extent_A=self.extent_A,
            extras=dict(self.extras),
        )

    # --- ground truth labels ---------------------------------------------------------
    def site_occupancy(self, atoms: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per site: number of present atoms and number of present atoms that are not the host
        species. ``atoms``: restrict the count to these atom indices (sites outside get zeros)."""
        m = self.n_sites
        idx = np.flatnonzero(self.present) if atoms is None else atoms[self.present[atoms]]
        site = self.site_of_atom[idx]
        count = np.bincount(site, minlength=m)
        foreign = np.bincount(site, weights=(self.numbers[idx] != self.host_number[site]), minlength=m).astype(np.int64)
        return count, foreign

    def site_labels(self, atoms: np.ndarray | None = None) -> np.ndarray:
        """Class index (into ``class_names``) of every site, from its current occupancy
        (counting only ``atoms`` when given: then only the sites those atoms cover are valid)."""
        count, foreign = self.site_occupancy(atoms)
        labels = np.zeros(self.n_sites, dtype=np.int64)
        if self.kind == "graphene":
            labels[foreign > 0] = 1
            labels[count == 0] = 2
        elif self.kind in TMD_LATTICE_A:
            chal = self.site_role == 1
            labels[~chal] = 0
            labels[chal] = 1
            labels[chal & (foreign > 0)] = 2
            labels[chal & (count < self.host_count)] = 3
            labels[~chal & (count == 0)] = 3
        else:  # perovskites and isolated atoms: label is the site role; empty columns are 'vacancy'
            labels[:] = self.site_role
            if "vacancy" in self.class_names:
                labels[count == 0] = self.class_names.index("vacancy")
        return labels

    def site_numbers(self, atoms: np.ndarray | None = None) -> np.ndarray:
        """Summed Z of the atoms present in each site's column, ``(M,)`` (over ``atoms`` if given)."""
        idx = np.flatnonzero(self.present) if atoms is None else atoms[self.present[atoms]]
        return np.bincount(self.site_of_atom[idx], weights=self.numbers[idx], minlength=self.n_sites)

    def in_box(self, xy_min: tuple[float, float], xy_max: tuple[float, float], margin_A: float = 0.0) -> np.ndarray:
        """Indices of present atoms whose (x, y) lies in the box grown by ``margin_A``."""
        x, y = self.positions_A[:, 0], self.positions_A[:, 1]
        keep = (
            self.present
            & (x >= xy_min[0] - margin_A)
            & (x <= xy_max[0] + margin_A)
            & (y >= xy_min[1] - margin_A)
            & (y <= xy_max[1] + margin_A)
        )
        return np.flatnonzero(keep)
