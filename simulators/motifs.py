"""Per-site *motif* ground truth: what local structure each lattice site sits in.

A motif is a site's own content together with its first neighbour shell, named the way a
microscopist would: a graphene C with three C neighbours is ``host``, a Si is ``dopant``, a C
bonded to a Si is ``dopant-adjacent``, a C beside an empty site is ``vacancy-adjacent``, an empty
site is ``vacancy``, and a site that has lost neighbours to the specimen's border is ``edge``.
TMDs name their two host sublattices (``metal``, ``chalcogen``); a substituted chalcogen column is
``dopant`` and a column with atoms missing is ``vacancy``. The ferroelectric film names the A, O
and B columns, the B columns by polarisation variant (``B+y``, ``B-y``, ...), and the B columns
inside a domain wall (``|p| < wall_threshold`` in units of the domain displacement) ``domain-wall``.

:func:`site_motifs` computes the labels of every site from the specimen's current occupancy;
:func:`frame_motifs` gives them for the visible sites of a rendered frame (aligned with
``FrameTruth.positions_A``). Nothing here changes how a specimen is built or imaged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from stemagent.simulators.specimens import GRAPHENE_A, TMD_LATTICE_A, Specimen

GRAPHENE_MOTIFS = ("host", "dopant", "vacancy", "dopant-adjacent", "vacancy-adjacent", "edge")
TMD_MOTIFS = ("metal", "chalcogen", "dopant", "vacancy", "dopant-adjacent", "vacancy-adjacent", "edge")


def _neighbours(sites: np.ndarray, bond_A: float) -> list[np.ndarray]:
    tree = cKDTree(sites)
    pairs = tree.query_ball_point(sites, r=1.2 * bond_A)
    return [np.asarray([j for j in p if j != i], dtype=np.int64) for i, p in enumerate(pairs)]


def _edge_sites(neigh: list[np.ndarray], full: int) -> np.ndarray:
    return np.asarray([len(n) < full for n in neigh], dtype=bool)


def site_motifs(specimen: Specimen, wall_threshold: float = 0.5) -> tuple[np.ndarray, tuple[str, ...]]:
    """Motif label ``(M,)`` of every site of ``specimen`` and the names the labels index."""
    kind = specimen.kind
    count, foreign = specimen.site_occupancy()
    empty = count == 0
    if kind == "graphene":
        bond = GRAPHENE_A / np.sqrt(3.0)
        neigh = _neighbours(specimen.sites_A, bond)
        dopant = foreign > 0
        labels = np.zeros(specimen.n_sites, dtype=np.int64)
        for i, nb in enumerate(neigh):
            if empty[i]:
                labels[i] = 2
            elif dopant[i]:
                labels[i] = 1
            elif len(nb) < 3:
                labels[i] = 5
            elif np.any(empty[nb]):
                labels[i] = 4
            elif np.any(dopant[nb]):
                labels[i] = 3
        return labels, GRAPHENE_MOTIFS
    if kind in TMD_LATTICE_A:
        bond = TMD_LATTICE_A[kind] / np.sqrt(3.0)
        neigh = _neighbours(specimen.sites_A, bond)
        chal = specimen.site_role == 1
        vac = chal & (count < specimen.host_count)
        sub = chal & (foreign > 0) & ~vac
        labels = np.where(chal, 1, 0).astype(np.int64)
        for i, nb in enumerate(neigh):
            if vac[i]:
                labels[i] = 3
            elif sub[i]:
                labels[i] = 2
            elif len(nb) < 3:
                labels[i] = 6
            elif not chal[i] and np.any(vac[nb]):
                labels[i] = 5
            elif not chal[i] and np.any(sub[nb]):
                labels[i] = 4
        return labels, TMD_MOTIFS
    if kind == "film":
        return _film_motifs(specimen, wall_threshold)
    # other specimens: the site class is the motif
    return specimen.site_labels(), tuple(specimen.class_names)


def _film_motifs(specimen: Specimen, wall_threshold: float) -> tuple[np.ndarray, tuple[str, ...]]:
    ex = specimen.extras
    variants = [(float(v[0]), float(v[1])) for v in ex.get("variant_vectors", ((0.0, 1.0), (0.0, -1.0)))]
    names = ["A", "O"] + [f"B{_variant_name(v)}" for v in variants] + ["domain-wall"]
    role = specimen.site_role
    labels = np.where(role == 0, 0, 1).astype(np.int64)
    b = role == 1
    variant = np.asarray(ex["variant"], dtype=np.int64)
    labels[b] = 2 + variant[b]
    strength = np.asarray(ex.get("polarization_strength", np.abs(ex["polarization"])))
    labels[b & (strength < wall_threshold)] = len(names) - 1
    return labels, tuple(names)


def _variant_name(v: tuple[float, float]) -> str:
    parts = []
    for axis, c in zip("xy", v):
        if abs(c) > 1e-9:
            parts.append(("+" if c > 0 else "-") + axis)
    return "".join(parts) or "0"


def frame_motifs(specimen: Specimen, truth: Any, wall_threshold: float = 0.5) -> tuple[np.ndarray, tuple[str, ...]]:
    """Motif labels ``(K,)`` of the visible sites of a rendered frame (``truth`` a ``FrameTruth``
    of ``specimen``, aligned with ``truth.positions_A``) and their names."""
    labels, names = site_motifs(specimen, wall_threshold)
    return labels[np.asarray(truth.site_index)], names
