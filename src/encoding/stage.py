"""The encoding stage: ``(Frame, Atoms) -> per-atom features, motif labels and symmetry scores``.

Pure and synchronous (the agent runs it in an executor); what it keeps between frames is the
motif tracker (library of motifs, pool of recent atoms, classifier), the patch radius fixed by
the first frame and the motif-cell lattice. Steps:

1. Zernike features of every atom whose patch lies inside the frame
   (:class:`~stemagent.encoding.features.ZernikeEncoder`), and the per-site blocks of
   ``site_features`` (:mod:`~stemagent.encoding.site_features`: coordination from the atom list,
   the site's own intensity and its neighbours'), weighted and appended to the magnitudes.
2. Motif ids (:class:`~stemagent.encoding.tracker.MotifTracker`): the pool of recent atoms is
   clustered (:func:`~stemagent.encoding.clustering.cluster_features`, no number of classes
   given) and the clusters mapped to stable library ids
   (:class:`~stemagent.encoding.library.MotifLibrary`), every ``recluster_every`` frames; in
   between, and with ``recluster_every=0`` always, atoms are classified against the known motifs
   and the pool is reclustered only when atoms appear that no motif explains (enough of them, and
   not within ``min_frames_between`` frames of the last recluster: see the tracker). With
   ``recluster_adopt_after_frames`` = ``k`` > 0 a recluster runs in the tracker's worker thread
   and its motifs are adopted ``k`` frames after the frame it fell due on (frames, not time).
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
- ``rare_cell`` ``(N,)`` bool: the atom sits in a rare motif-cell;
- with ``site_features`` set (whichever blocks): ``coordination`` ``(N,)`` soft neighbour count,
  ``site_intensity`` ``(N,)`` (units of the frame's mean site intensity, NaN outside the frame),
  ``neighbour_intensity`` ``(N, 3)`` min / mean / max of the neighbours'.

Unencoded atoms carry NaN features. :attr:`EncodingStage.last_report` holds what is not per atom:
the motif-cell tree, the motifs founded this frame, whether the pool was reclustered, how many
atoms no motif explained, the library size and the timings.

With ``num_threads`` set, ``process`` runs torch and the BLAS/OpenMP pools of numpy, scipy and
scikit-learn on that many threads (restored afterwards): on a busy 2-core CPU two threads made
the Zernike features and the recluster 3-30x slower in bursts (``BENCHMARKS.md``, the loop).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from stemagent.encoding.config import EncodingConfig
from stemagent.encoding.features import ZernikeEncoder
from stemagent.encoding.hierarchy import motif_cells
from stemagent.encoding.library import MotifLibrary
from stemagent.encoding.site_features import site_features
from stemagent.encoding.tracker import MotifTracker
from stemagent.encoding.patches import check_image
from stemagent.errors import InputError, StemAgentError
from stemagent.types import Atoms, Frame


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
        self._threadpools: ThreadpoolController | None = None

    def _new_tracker(self) -> MotifTracker:
        c = self.config
        all_options: dict[str, dict[str, Any]] = {
            "robust": {"alpha": c.outlier_alpha, "mode_fraction": c.mode_fraction, "min_cluster_size": c.min_cluster_size},
            "layout": {"n_neighbors": c.n_neighbors, "iterations": c.layout_iterations, "min_cluster_size": c.min_cluster_size},
            "gmm": {"max_components": c.max_components},
        }
        options = all_options[c.clustering]
        library = MotifLibrary(c.novelty_sigmas, c.novelty_min_effect, c.library_memory)
        return MotifTracker(c.clustering, c.components, options, library, c.pool_size, c.recluster_every, c.novelty_alpha, c.seed,
                            min_unexplained=c.min_unexplained, min_unexplained_fraction=c.min_unexplained_fraction,
                            min_frames_between=c.min_frames_between, relabel=c.relabel,
                            refine_iterations=c.refine_iterations, adopt_after_frames=c.recluster_adopt_after_frames)

    @property
    def library(self) -> MotifLibrary:
        return self.tracker.library

    def reset(self) -> None:
        """Forget the motifs and the patch radius (a new specimen)."""
        self.radius_A = self.config.radius_A
        self._lattice_A = None
        self._nn_A = None
        self.tracker.close()
        self.tracker = self._new_tracker()

    def close(self) -> None:
        """Stop the tracker's recluster thread (a recluster in flight is dropped)."""
        self.tracker.close()

    def process(self, frame: Frame, atoms: Atoms) -> dict[str, np.ndarray]:
        n = self.config.num_threads
        if n is None:
            return self._process(frame, atoms)
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            if self._threadpools is None:  # finding the pools takes ~5 ms: once per stage
                self._threadpools = ThreadpoolController()
            with self._threadpools.limit(limits=n):  # BLAS/OpenMP of numpy, scipy and scikit-learn (the clustering)
                return self._process(frame, atoms)
        finally:
            torch.set_num_threads(before)

    def _process(self, frame: Frame, atoms: Atoms) -> dict[str, np.ndarray]:
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
        x = feats.magnitudes
        site = None
        t_site = time.perf_counter()
        if c.site_features:
            site = site_features(frame.image, pos, rc, self.radius_A / c.radius_factor, geo.pixel_size_A[0],
                                 *c.coordination_shell, sigma_factor=c.site_sigma_factor,
                                 transform=c.intensity_transform)
            weights = {"coordination": c.coordination_weight, "intensity": c.intensity_weight,
                       "neighbour_intensity": c.intensity_weight}
            x = np.concatenate([x, site.matrix(c.site_features, weights)], axis=1)
        t1 = time.perf_counter()
        motif = np.full(n, -1, dtype=np.int64)
        inside = feats.inside
        report: dict[str, Any] = {"frame_index": frame.index, "encoded": int(inside.sum()), "radius_A": self.radius_A,
                                  "binning": feats.binning, "new_motifs": [], "clusters": 0}
        if inside.sum() >= c.min_atoms:
            res = self.tracker.process(x[inside], frame.index)
            motif[inside] = res.ids
            report.update(new_motifs=res.new, clusters=res.clusters, reclustered=res.reclustered, unexplained=int(res.novel.sum()),
                          recluster_started=res.recluster_started)
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
        report.update(library_size=len(self.library), timings_s={"features": t1 - t0, "site_features": t1 - t_site, "motifs": t2 - t1,
                                                                     "cells": t3 - t2})
        self.last_report = report
        out = {
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
        if site is not None:
            out.update(coordination=site.coordination, site_intensity=site.intensity,
                       neighbour_intensity=site.neighbour_intensity)
        return out
