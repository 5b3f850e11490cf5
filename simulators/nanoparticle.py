"""A gold nanoparticle seen down [001]: a specimen unlike the atom finder's training set.

fcc Au projected along [001] puts atomic columns on a square grid of ``a / 2`` (2.04 Å), one
atom every ``a`` along each column; a spherical particle of radius ``R`` holds
``2 sqrt(R^2 - r^2) / a`` atoms in the column at distance ``r`` from its centre, so the column
intensities grow from the rim inward by tens. Used to test that the segmenter says when a frame
is out of its depth (issue 12); not part of the twin's specimen catalogue.
"""

from __future__ import annotations

import math

import numpy as np

from stemagent.simulators.specimen import Specimen

AU_LATTICE_A = 4.078
AU_Z = 79


def gold_nanoparticle(
    radius_A: float = 12.0,
    center_A: tuple[float, float] = (0.0, 0.0),
    size_A: tuple[float, float] = (40.0, 40.0),
    u_rms_A: float = 0.08,
) -> Specimen:
    """Columns of a spherical fcc Au particle of ``radius_A`` at ``center_A``, [001] down the beam."""
    step = AU_LATTICE_A / 2.0
    n = int(math.ceil(radius_A / step))
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="xy")
    xy = np.stack([i.ravel(), j.ravel()], axis=1) * step
    r = np.hypot(xy[:, 0], xy[:, 1])
    keep = r < radius_A
    xy, r = xy[keep], r[keep]
    length = 2.0 * np.sqrt(radius_A**2 - r**2)
    counts = np.maximum(1, np.round(length / AU_LATTICE_A)).astype(np.int64)
    sites = xy + np.asarray(center_A)[None, :]
    site_of = np.repeat(np.arange(len(sites)), counts)
    z = np.concatenate([np.arange(c) * AU_LATTICE_A for c in counts])
    pos = np.column_stack([sites[site_of], z])
    w, h = size_A
    return Specimen(
        kind="nanoparticle",
        positions_A=pos,
        numbers=np.full(len(pos), AU_Z, dtype=np.int64),
        present=np.ones(len(pos), dtype=bool),
        site_of_atom=site_of,
        sites_A=sites,
        site_role=np.zeros(len(sites), dtype=np.int64),
        u_rms_A=np.full(len(pos), u_rms_A),
        class_names=("Au",),
        host_number=np.full(len(sites), AU_Z, dtype=np.int64),
        host_count=counts,
        extent_A=(center_A[0] - w / 2, center_A[0] + w / 2, center_A[1] - h / 2, center_A[1] + h / 2),
    )
