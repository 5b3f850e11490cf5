"""The encoding stage: ``(Frame, Atoms) -> per-atom features, motif labels and symmetry scores``.

Pure and synchronous (the agent runs it in an executor); what it keeps between frames is the
motif tracker (library of motifs, pool of recent atoms, classifier), the patch radius fixed by
the first frame and the motif-cell lattice. Steps:

1. Zernike features of every atom whose patch lies inside the frame
   (:class:`~stemagent.encoding.features.ZernikeEncoder`).
2. Motif ids (:class:`~stemagent.encoding.tracker.MotifTracker`): the pool of recent atoms is
   clustered (:func:`~stemagent.encoding.clustering.cluster_features`, no number of classes
   given) and the clusters mapped to stable library ids
   (:class:`~stemagent.encoding.library.MotifLibrary`), every ``recluster_every`` frames; in
   between, and with ``recluster_every=0`` always, atoms are classified against the known motifs
   and the pool is reclustered only when atoms appear that no motif explains.
3. Motif-cells (:func:`~stemagent.encoding.hierarchy.motif_cells`): the cell of every atom, and
   which atoms sit in rare cells (candidate defects).

Output of :meth:`EncodingStage.process` (numpy arrays, ``N`` atoms in the order of ``atoms``):

- ``zernike_magnitude`` ``(N, K)``: ``|a_nm|`` (``m >= 0``) divided by the frame's median ``|a_00|``;
- ``zernike_moment`` ``(N, K)`` complex: the moments in the sample frame;
- ``zernike_n``, ``zernike_m`` ``(K,)``: the orders of the columns;
- ``symmetry`` ``(N, F)``: n-fold symmetry scores for ``symmetry_folds`` ``(F,)`` = 2, 3, 4, 6;
- ``encoded`` ``(N,)`` bool: features computed (patch inside the frame);
- ``motif`` ``(N,)`` int: library motif id, -1 where not encoded;
- ``motif_cell`` ``(N,)`` int: the atom's motif-cell in this frame (-1: none);
- ``rare_cell`` ``(N,)`` bool: the atom sits in a rare motif-cell.

Unencoded atoms carry NaN features. :attr:`EncodingStage.last_report` holds what is not per atom:
the motif-cell tree, the motifs founded this frame, whether the pool was reclustered, how many
atoms no motif explained, the library size and the timings.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from stemagent.encoding.features import ZernikeEncoder
from stemagent.encoding.hierarchy import motif_cells
from stemagent.encoding.library import MotifLibrary
from stemagent.encoding.tracker import MotifTracker
from stemagent.encoding.patches import check_image
from stemagent.errors import InputError, StemAgentError
from stemagent.types import Atoms, Frame


class EncodingConfig(BaseModel):
    """Settings of the encoding stage (lengths in Å, sizes in pixels)."""

    model_config = ConfigDict(extra="forbid")

    n_max: int = Field(10, ge=1, le=20, description="highest Zernike radial order")
    radius_factor: float = Field(1.3, gt=0.3, le=4.0, description="patch disk radius / nearest-neighbour distance")
    radius_A: float | None = Field(None, gt=0, description="fixed disk radius; None: from the first frame's atoms")
    max_radius_px: float = Field(20.0, ge=4.0, le=64.0, description="larger disks bin the frame first")
    subpixel_steps: int = Field(8, ge=2, le=32, description="patch centres quantised to 1/steps px (even)")
    correction: Literal["none", "gram"] = Field("none", description="moments: projections, or Gram-corrected least squares")
    clustering: Literal["robust", "layout", "gmm"] = Field("robust", description="see stemagent.encoding.clustering")
    components: int = Field(4, ge=1, le=64, description="principal components of the features that are clustered")
    outlier_alpha: float = Field(0.01, gt=0, lt=0.5, description="robust: chi-square tail beyond which an atom is not host")
    mode_fraction: float = Field(0.1, gt=0, lt=1, description="robust: smallest host mode, as a share of the atoms")
    n_neighbors: int = Field(10, ge=2, le=100)
    layout_iterations: int = Field(100, ge=10, le=2000)
    min_cluster_size: int = Field(3, ge=2, description="smallest motif cluster (robust, layout)")
    max_components: int = Field(10, ge=1, le=50, description="largest mixture tried (gmm)")
    novelty_sigmas: float = Field(6.0, gt=0, description="a cluster is a new motif when its mean differs from the nearest by more than this over sqrt(atoms) ...")
    novelty_min_effect: float = Field(1.0, gt=0, description="... and by more than this many noise widths of one atom, in some feature")
    library_memory: int = Field(5000, ge=10)
    pool_size: int = Field(4000, ge=10, description="recent atoms clustered together (several frames)")
    recluster_every: int = Field(1, ge=0, description="recluster the pool every n frames (0: only when atoms no motif explains appear)")
    novelty_alpha: float = Field(1e-4, gt=0, lt=0.5, description="classifier: chi-square tail beyond which an atom is unexplained")
    min_atoms: int = Field(8, ge=3, description="frames with fewer encoded atoms get no motifs")
    hierarchy: bool = True
    rare_fraction: float = Field(0.05, gt=0, lt=1)
    seed: int = 0
    device: str | None = Field(None, description="torch device; None: CUDA when present")


class EncodingStage:
    """See the module docstring. ``process`` is the entry point."""

    name = "encoding"

    def __init__(self, config: EncodingConfig | None = None) -> None:
        self.config = config or EncodingConfig()
        if self.config.subpixel_steps % 2:
            raise InputError("subpixel_steps", self.config.subpixel_steps, "must be even")
        c = self.config
        self.encoder = ZernikeEncoder(c.n_max, c.radius_factor, c.max_radius_px, c.subpixel_steps, c.correction, c.device)
        self.radius_A: float | None = c.radius_A
        self._lattice_A: np.ndarray | None = None
        self._nn_A: float | None = None
        self.tracker = self._new_tracker()
        self.last_report: dict[str, Any] = {}

    def _new_tracker(self) -> MotifTracker:
        c = self.config
        all_options: dict[str, dict[str, Any]] = {
            "robust": {"alpha": c.outlier_alpha, "mode_fraction": c.mode_fraction, "min_cluster_size": c.min_cluster_size},
            "layout": {"n_neighbors": c.n_neighbors, "iterations": c.layout_iterations, "min_cluster_size": c.min_cluster_size},
            "gmm": {"max_components": c.max_components},
        }
        options = all_options[c.clustering]
        library = MotifLibrary(c.novelty_sigmas, c.novelty_min_effect, c.library_memory)
        return MotifTracker(c.clustering, c.components, options, library, c.pool_size, c.recluster_every, c.novelty_alpha, c.seed)

    @property
    def library(self) -> MotifLibrary:
        return self.tracker.library

    def reset(self) -> None:
        """Forget the motifs and the patch radius (a new specimen)."""
        self.radius_A = self.config.radius_A
        self._lattice_A = None
        self._nn_A = None
        self.tracker = self._new_tracker()

    def process(self, frame: Frame, atoms: Atoms) -> dict[str, np.ndarray]:
        c = self.config
        t0 = time.perf_counter()
        check_image(frame.image)
        n = len(atoms)
        if n == 0:
            raise InputError("atoms", 0, "no atoms to encode")
        pos = atoms.positions_A
        if not np.all(np.isfinite(pos)):
            bad = int(np.flatnonzero(~np.all(np.isfinite(pos), axis=1))[0])
            raise InputError(f"atoms.positions_A[{bad}]", pos[bad].tolist(), "must be finite")
        geo = frame.geometry
        if self.radius_A is None:
            self.radius_A = self.encoder.radius_for(pos)
            self._nn_A = self.radius_A / c.radius_factor
        rc = geo.sample_to_pixel(pos)
        feats = self.encoder.encode(frame.image, rc, geo.pixel_size_A[0], self.radius_A, geo.rotation_rad)
        t1 = time.perf_counter()
        motif = np.full(n, -1, dtype=np.int64)
        inside = feats.inside
        report: dict[str, Any] = {"frame_index": frame.index, "encoded": int(inside.sum()), "radius_A": self.radius_A,
                                  "binning": feats.binning, "new_motifs": [], "clusters": 0}
        if inside.sum() >= c.min_atoms:
            res = self.tracker.process(feats.magnitudes[inside], frame.index)
            motif[inside] = res.ids
            report.update(new_motifs=res.new, clusters=res.clusters, reclustered=res.reclustered, unexplained=int(res.novel.sum()))
        t2 = time.perf_counter()
        cell = np.full(n, -1, dtype=np.int64)
        rare = np.zeros(n, dtype=bool)
        if c.hierarchy and inside.sum() >= c.min_atoms:
            try:
                cells = motif_cells(pos[inside], motif[inside], rare_fraction=c.rare_fraction, seed=c.seed, lattice_A=self._lattice_A,
                                    nn_A=self._nn_A)
            except StemAgentError as err:  # no repeating pattern in this frame: no cells, not a failure
                report["hierarchy_error"] = str(err)
            else:
                self._lattice_A = cells.lattice_A
                idx = np.flatnonzero(inside)
                cell[idx] = cells.cell_of_atom
                rare[idx] = cells.rare_atom
                report["motif_cells"] = cells.tree
        t3 = time.perf_counter()
        report.update(library_size=len(self.library), timings_s={"features": t1 - t0, "motifs": t2 - t1, "cells": t3 - t2})
        self.last_report = report
        return {
            "zernike_magnitude": feats.magnitudes,
            "zernike_moment": feats.moments,
            "zernike_n": feats.n,
            "zernike_m": feats.m,
            "symmetry": feats.symmetry,
            "symmetry_folds": np.asarray(feats.folds, dtype=np.int64),
            "encoded": inside,
            "motif": motif,
            "motif_cell": cell,
            "rare_cell": rare,
        }
