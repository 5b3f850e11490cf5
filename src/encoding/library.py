"""A motif library: stable motif ids across frames, grown when something new appears.

Each frame is clustered on its own (cluster ids mean nothing from one frame to the next). The
library keeps one prototype per motif: the mean feature vector of the atoms it has seen, and a
pooled per-feature noise scale (the within-cluster spread, averaged over clusters and frames).
A frame's cluster is compared with the nearest prototype (standardised Euclidean distance) by
its largest per-feature effect

    E = max over features of |mean of the cluster - prototype| / scale

(in noise widths of one atom). It founds a new motif when ``E`` exceeds both ``min_effect`` and
``sigmas / sqrt(n)``, ``n`` the smaller of the cluster's and the prototype's atom counts: a
difference that ``n`` atoms' noise could not make, and not a drift between frames. Motifs that
differ in a few features only (a chalcogen column with one atom missing) are not averaged away
by the many features in which they agree. Several clusters may map to one
motif (a frame over-split), never one cluster to several. Prototypes follow their members with
a running mean whose memory is capped at ``memory`` atoms, so slow drifts (dose, focus) are
followed and a new frame can never be outvoted forever.

A motif founded by fewer than ``min_members`` atoms is *provisional* until some update gives it
that many. When a pool recluster (``replace=True``) finds no atom of a provisional motif, the
motif is *retired*: its id is never reused or matched again and it no longer counts towards
``max_motifs``. A lone dopant in the first frame founds a provisional motif that becomes
permanent as more dopants enter the pool; an odd detection (a U-Net duplicate, a detection on an
empty site) founds one that is retired once it leaves the pool, instead of filling the library.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stemagent.errors import InputError


@dataclass
class Motif:
    """One library entry: ``centroid`` ``(d,)``, atoms seen, the frame that founded it."""

    id: int
    centroid: np.ndarray
    count: int
    first_frame: int
    last_frame: int
    peak: int = 0  # most atoms one update gave it
    active: bool = True  # False: retired (see the module docstring)


@dataclass
class LibraryUpdate:
    """What one frame did to the library: ``ids`` ``(N,)`` motif id per atom; ``cluster_to_motif``;
    ``new`` ids founded by this frame; ``distances`` cluster -> largest per-feature effect against
    the prototype chosen (``inf`` for a new motif)."""

    ids: np.ndarray
    cluster_to_motif: dict[int, int]
    new: list[int]
    distances: dict[int, float] = field(default_factory=dict)


class MotifLibrary:
    """Stable motif ids over a sequence of frames (see the module docstring)."""

    def __init__(self, sigmas: float = 6.0, min_effect: float = 1.0, memory: int = 5000, max_motifs: int = 64,
                 min_members: int = 3) -> None:
        if not (np.isfinite(sigmas) and sigmas > 0):
            raise InputError("sigmas", sigmas, "must be positive")
        if not (np.isfinite(min_effect) and min_effect > 0):
            raise InputError("min_effect", min_effect, "must be positive")
        self.sigmas = float(sigmas)
        self.min_effect = float(min_effect)
        self.memory = int(memory)
        self.max_motifs = int(max_motifs)
        if min_members < 1:
            raise InputError("min_members", min_members, "must be >= 1 atom")
        self.min_members = int(min_members)
        self.motifs: list[Motif] = []
        self.scale: np.ndarray | None = None
        self._scale_weight = 0.0

    def __len__(self) -> int:
        """Motifs in use (retired ones not counted)."""
        return len(self.active())

    def active(self) -> list[Motif]:
        return [m for m in self.motifs if m.active]

    def centroids(self) -> np.ndarray:
        """Prototypes ``(motifs in use, d)``, in the order of :meth:`active`."""
        act = self.active()
        return np.stack([m.centroid for m in act]) if act else np.zeros((0, 0))

    def _update_scale(self, x: np.ndarray, labels: np.ndarray) -> None:
        resid = np.zeros_like(x)
        for c in np.unique(labels):
            sel = labels == c
            resid[sel] = x[sel] - x[sel].mean(axis=0)
        dof = max(1, len(x) - len(np.unique(labels)))
        var = (resid**2).sum(axis=0) / dof
        floor = 1e-6 * max(1.0, float(np.abs(x).max()))
        s = np.sqrt(np.maximum(var, floor**2))
        if self.scale is None:
            self.scale, self._scale_weight = s, float(len(x))
        else:
            w = min(float(len(x)), self.memory) / (self._scale_weight + len(x))
            self.scale = np.sqrt((1 - w) * self.scale**2 + w * s**2)
            self._scale_weight = min(self._scale_weight + len(x), float(self.memory))

    def update(self, features: np.ndarray, cluster_labels: np.ndarray, frame_index: int = 0, replace: bool = False) -> LibraryUpdate:
        """Map this frame's clusters to motif ids, add new motifs, refresh the prototypes.

        ``features`` ``(N, d)`` (finite), ``cluster_labels`` ``(N,)`` non-negative cluster ids.
        ``replace``: the features are a pool that already holds the atoms seen before (see
        :class:`MotifTracker`): prototypes become the pool's means instead of running means."""
        x = np.asarray(features, dtype=np.float64)
        lab = np.asarray(cluster_labels, dtype=np.int64)
        if x.ndim != 2 or lab.shape != (len(x),):
            raise InputError("features.shape", (x.shape, lab.shape), "must be (N, d) features and (N,) labels")
        if len(x) == 0:
            return LibraryUpdate(np.zeros(0, dtype=np.int64), {}, [])
        if not np.all(np.isfinite(x)):
            raise InputError("features", "non-finite", "feature vectors must be finite")
        if self.motifs and self.motifs[0].centroid.shape != (x.shape[1],):
            raise InputError("features.shape", x.shape, f"must have {self.motifs[0].centroid.shape[0]} columns like the library")
        self._update_scale(x, lab)
        assert self.scale is not None
        clusters, counts = np.unique(lab, return_counts=True)
        order = clusters[np.argsort(-counts, kind="stable")]
        mapping: dict[int, int] = {}
        dists: dict[int, float] = {}
        new: list[int] = []
        active = self.active()
        protos = self.centroids()
        founded: dict[int, int] = {}  # atoms of the motifs founded by this update (their count is set after the loop)
        for c in order:
            sel = lab == c
            mu = x[sel].mean(axis=0)
            best, best_d, novel = -1, np.inf, True
            if active:
                diff = np.abs(protos - mu) / self.scale
                best = int(np.argmin(np.linalg.norm(diff, axis=1)))
                best_d = float(diff[best].max())
                n = min(int(sel.sum()), active[best].count + founded.get(active[best].id, 0))
                novel = best_d > max(self.min_effect, self.sigmas / np.sqrt(max(n, 1)))
            if best >= 0 and (not novel or len(active) >= self.max_motifs):
                motif = active[best]
            else:
                motif = Motif(id=len(self.motifs), centroid=mu.copy(), count=0, first_frame=frame_index, last_frame=frame_index)
                self.motifs.append(motif)
                new.append(motif.id)
                founded[motif.id] = int(sel.sum())
                best_d = np.inf
                active, protos = self.active(), self.centroids()
            mapping[int(c)] = motif.id
            dists[int(c)] = best_d
        pooled: dict[int, tuple[np.ndarray, int]] = {}
        for c, mid in mapping.items():
            sel = lab == c
            total, count = pooled.get(mid, (np.zeros(x.shape[1]), 0))
            pooled[mid] = (total + x[sel].sum(axis=0), count + int(sel.sum()))
        for mid, (total, n_new) in pooled.items():
            motif = self.motifs[mid]
            if replace:
                motif.centroid, motif.count = total / n_new, n_new
            else:
                w_old = min(motif.count, self.memory)
                motif.centroid = (motif.centroid * w_old + total) / (w_old + n_new)
                motif.count += n_new
            motif.last_frame = frame_index
            motif.peak = max(motif.peak, n_new)
        if replace:
            for motif in self.motifs:
                if motif.active and motif.id not in pooled and motif.peak < self.min_members:
                    motif.active = False
        ids = np.asarray([mapping[int(c)] for c in lab], dtype=np.int64)
        return LibraryUpdate(ids, mapping, new, dists)
