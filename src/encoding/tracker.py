"""Motif ids for a stream of frames: pooled clustering, and a fast classifier in between.

One frame holds few atoms of a rare motif (three C atoms around one Si), often too few to form a
cluster against the photon noise. The tracker therefore clusters a *pool* of the most recent
atoms of several frames (``pool_size`` atoms), maps the pool's clusters to stable ids with the
:class:`~stemagent.encoding.library.MotifLibrary`, and fits a classifier to the result: the
motifs' means and their pooled within-motif covariance in the pool's first principal components
(linear discriminant analysis). Each frame is then classified in well under a millisecond. It
reclusters every ``recluster_every`` frames (0: never on a schedule) and whenever the classifier
meets atoms that no motif explains (squared Mahalanobis distance to the nearest motif beyond the
``1 - novelty_alpha`` chi-square quantile), which is how a new motif enters the library.

With ``refine_iterations`` > 0 the pool's clusters are refined before they reach the library:
the classifier (motif means, shared covariance) is fitted to them with each motif's share of the
pool as its prior, every pool atom is reassigned to its most probable motif, and this repeats.
The clustering draws hard host/defect boundaries at a chi-square quantile of the host alone; the
refinement moves them to where the two densities cross, which recovers the defect atoms that sit
just inside the host's tail (MoS2 S vacancies at 1e4 e/Å²: ``BENCHMARKS.md``).

A recluster costs the whole pool (about 0.1-1 s for 4000 atoms on a CPU), while classifying
costs under a millisecond, and a real stream meets a few unexplained atoms in most frames (noise
outliers, atoms at the frame's edge). So an unexplained atom does not recluster at once: the
atoms no motif explained since the last recluster are counted across frames, and the pool is
reclustered when that count reaches ``min_unexplained`` (or, in one frame, ``min_unexplained_fraction``
of its atoms) and at least ``min_frames_between`` frames have passed since the last recluster
(the frame budget of the per-frame path). Until then the unexplained atoms get the nearest
motif's id (``novel`` says which they were) and stay in the pool, so a rare motif that shows a
few atoms per frame still founds its motif a few frames later. The budget is counted in frames,
not seconds: the labels must not depend on the machine's speed, or a verified replay could not
reproduce them. With ``relabel=True`` a reclustered frame's atoms are labelled by the refitted
classifier, as every other frame is (not by the pool's raw clusters), so an atom's label does
not change with whether its frame happened to recluster.

**Reclusters off the frame path** (``adopt_after_frames`` = ``k`` > 0): a recluster that falls
due on frame ``n`` (other than the very first, which founds the classifier) is started there on a
snapshot of the pool (frame ``n``'s atoms included) and a copy of the library, in the tracker's
own worker thread; frame ``n`` and the ``k - 1`` frames after it are classified by the motifs
there were, their atoms join the pool, and at the start of the ``k``-th frame after ``n`` the new
library and classifier are adopted (waiting for them there if the recluster is not done) and
that frame is classified by them (``reclustered`` in its result; ``recluster_started`` in frame
``n``'s). At most one recluster is in flight; the frame budget counts from its start, the
unexplained atoms from its adoption. Frames,
not time, fix the schedule, so a replay of the run reproduces every label. ``k = 0``: the
recluster runs on the frame that fell due, as described above.
"""

from __future__ import annotations

import concurrent.futures
import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import chi2

from stemagent.encoding.clustering import cluster_features, fit_reduction
from stemagent.encoding.library import MotifLibrary
from stemagent.errors import InputError


@dataclass
class TrackResult:
    """``ids`` ``(N,)`` motif ids; ``novel`` ``(N,)`` atoms no motif explained; ``reclustered``;
    ``clusters`` found if reclustered; ``new`` motif ids founded by this frame."""

    ids: np.ndarray
    novel: np.ndarray
    reclustered: bool
    clusters: int = 0
    new: list[int] = field(default_factory=list)
    #: a recluster was started on this frame in the background (adopted ``adopt_after_frames`` later)
    recluster_started: bool = False


@dataclass
class _Reclustered:
    """What a recluster made, ready to adopt: the updated library, the classifier fitted to it,
    how many clusters the pool gave and the motifs it founded."""

    library: MotifLibrary
    classifier: MotifClassifier
    clusters: int
    new: list[int]


class MotifClassifier:
    """Linear discriminant on the pool's principal components (fitted by :meth:`fit`)."""

    def __init__(self, components: int) -> None:
        self.components = int(components)
        self.centre: np.ndarray | None = None
        self.proj: np.ndarray | None = None
        self.ids = np.zeros(0, dtype=np.int64)
        self.means = np.zeros((0, 0))
        self.whiten: np.ndarray | None = None

    def fit(self, x: np.ndarray, ids: np.ndarray) -> None:
        self.centre, self.proj = fit_reduction(x, self.components)
        z = (x - self.centre) @ self.proj
        self.ids = np.unique(ids)
        self.means = np.stack([z[ids == i].mean(axis=0) for i in self.ids])
        resid = z - self.means[np.searchsorted(self.ids, ids)]
        k = z.shape[1]
        cov = resid.T @ resid / max(1, len(z) - len(self.ids)) + 1e-9 * np.eye(k) * max(1.0, float(np.trace(resid.T @ resid)) / max(1, len(z)))
        self.whiten = np.linalg.inv(np.linalg.cholesky(cov))

    def distances2(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance ``(N, motifs)`` of each atom to each motif's mean."""
        assert self.centre is not None and self.proj is not None and self.whiten is not None
        z = (x - self.centre) @ self.proj
        w = z @ self.whiten.T
        m = self.means @ self.whiten.T
        return np.sum((w[:, None, :] - m[None, :, :]) ** 2, axis=2)


def refine_labels(x: np.ndarray, labels: np.ndarray, components: int, iterations: int) -> np.ndarray:
    """``labels`` ``(N,)`` of ``x`` ``(N, d)`` after ``iterations`` rounds of: fit a
    :class:`MotifClassifier`, reassign every point to the motif of highest posterior (squared
    Mahalanobis distance minus twice the log of the motif's share). Ids stay those of ``labels``
    (a motif that loses all its points disappears); stops early when nothing changes."""
    lab = np.asarray(labels, dtype=np.int64)
    for _ in range(iterations):
        if len(np.unique(lab)) < 2:
            break
        clf = MotifClassifier(components)
        clf.fit(x, lab)
        share = np.asarray([np.mean(lab == i) for i in clf.ids])
        new = clf.ids[np.argmin(clf.distances2(x) - 2.0 * np.log(share), axis=1)]
        if np.array_equal(new, lab):
            break
        lab = new
    return lab


class MotifTracker:
    """See the module docstring. ``options`` go to the clustering method."""

    def __init__(self, method: str = "robust", components: int = 4, options: dict[str, Any] | None = None,
                 library: MotifLibrary | None = None, pool_size: int = 4000, recluster_every: int = 1,
                 novelty_alpha: float = 1e-4, seed: int = 0, min_unexplained: int = 1,
                 min_unexplained_fraction: float = 0.0, min_frames_between: int = 0, relabel: bool = False,
                 refine_iterations: int = 0, adopt_after_frames: int = 0) -> None:
        if pool_size < 10:
            raise InputError("pool_size", pool_size, "must be at least 10 atoms")
        if recluster_every < 0:
            raise InputError("recluster_every", recluster_every, "must be >= 0 (0: only on novelty)")
        if min_unexplained < 1:
            raise InputError("min_unexplained", min_unexplained, "must be >= 1 atom")
        if not 0.0 <= min_unexplained_fraction <= 1.0:
            raise InputError("min_unexplained_fraction", min_unexplained_fraction, "must be in [0, 1]")
        if min_frames_between < 0:
            raise InputError("min_frames_between", min_frames_between, "must be >= 0 frames")
        if refine_iterations < 0:
            raise InputError("refine_iterations", refine_iterations, "must be >= 0")
        if adopt_after_frames < 0:
            raise InputError("recluster_adopt_after_frames", adopt_after_frames, "must be >= 0 frames (0: on the frame path)")
        self.method = method
        self.components = int(components)
        self.options = dict(options or {})
        self.library = library or MotifLibrary()
        self.pool_size = int(pool_size)
        self.recluster_every = int(recluster_every)
        self.novelty_alpha = float(novelty_alpha)
        self.seed = int(seed)
        self.min_unexplained = int(min_unexplained)
        self.min_unexplained_fraction = float(min_unexplained_fraction)
        self.min_frames_between = int(min_frames_between)
        self.relabel = bool(relabel)
        self.refine_iterations = int(refine_iterations)
        self.unexplained_since = 0  # atoms no motif explained since the last recluster
        self.pool = np.zeros((0, 0))
        self.classifier = MotifClassifier(components)
        self._frames_since = 0
        self._fitted = False
        self.adopt_after_frames = int(adopt_after_frames)
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future[_Reclustered] | None = None
        self._pending_frames = 0  # frames processed since the pending recluster was started

    def _pooled(self, x: np.ndarray) -> np.ndarray:
        return (np.concatenate([self.pool, x]) if len(self.pool) else x)[-self.pool_size:]

    def _recluster(self, x: np.ndarray, frame_index: int) -> TrackResult:
        pool = self._pooled(x)
        clusters = cluster_features(pool, self.method, self.components, self.seed, **self.options)
        labels = refine_labels(pool, clusters.labels, self.components, self.refine_iterations)
        upd = self.library.update(pool, labels, frame_index, replace=True)
        self.classifier.fit(pool, upd.ids)
        self._fitted = True
        self.pool = pool
        self._frames_since = 0
        self.unexplained_since = 0
        ids = self.classifier.ids[np.argmin(self.classifier.distances2(x), axis=1)] if self.relabel else upd.ids[-len(x):]
        return TrackResult(ids, np.zeros(len(x), dtype=bool), True, clusters.n_clusters, upd.new)

    # --- reclusters off the frame path (adopt_after_frames > 0) ---------------------------------
    def _start_recluster(self, pool: np.ndarray, frame_index: int) -> None:
        """Recluster ``pool`` (frame ``frame_index``'s snapshot) in the worker thread, on a copy of the library."""
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemagent-motif-recluster")
        self._pending = self._worker.submit(_recluster_job, pool, self.method, self.components, self.seed, dict(self.options),
                                            self.refine_iterations, copy.deepcopy(self.library), frame_index)
        self._pending_frames = 0
        self._frames_since = 0
        self.unexplained_since = 0

    def _adopt(self) -> _Reclustered | None:
        """The recluster started ``adopt_after_frames`` frames ago, adopted now (waiting for it if it
        is not done; its error raises here); None when none is pending or it is not yet its frame."""
        if self._pending is None:
            return None
        self._pending_frames += 1
        if self._pending_frames < self.adopt_after_frames:
            return None
        pending, self._pending = self._pending, None
        done = pending.result()
        self.library, self.classifier = done.library, done.classifier
        self.unexplained_since = 0  # what the old motifs did not explain is judged again by the new ones
        return done

    def close(self) -> None:
        """Drop a recluster in flight and stop the worker thread (the tracker then reclusters on
        the frame path again if it is used further)."""
        self._pending = None
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
            self._worker = None

    def _novelty_due(self, n_novel: int, n_atoms: int) -> bool:
        """Recluster for ``n_novel`` unexplained atoms of an ``n_atoms`` frame? (see the module docstring)"""
        if n_novel == 0 or self._frames_since < self.min_frames_between:
            return False
        by_fraction = self.min_unexplained_fraction > 0 and n_novel >= self.min_unexplained_fraction * n_atoms
        return by_fraction or self.unexplained_since >= self.min_unexplained

    def process(self, x: np.ndarray, frame_index: int = 0) -> TrackResult:
        """Motif ids of one frame's atoms (``x`` ``(N, d)`` finite features)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) == 0 or not np.all(np.isfinite(x)):
            raise InputError("features", getattr(x, "shape", None), "must be a non-empty (N, d) array of finite numbers")
        if len(self.pool) and self.pool.shape[1] != x.shape[1]:
            raise InputError("features.shape", x.shape, f"must have {self.pool.shape[1]} columns like the pool")
        adopted = self._adopt()
        self._frames_since += 1
        background = self.adopt_after_frames > 0 and self._fitted
        due = not self._fitted or (self.recluster_every > 0 and self._frames_since >= self.recluster_every)
        if due and not background:
            return self._recluster(x, frame_index)
        d2 = self.classifier.distances2(x)
        best = np.argmin(d2, axis=1)
        novel = d2[np.arange(len(x)), best] > chi2.ppf(1.0 - self.novelty_alpha, self.classifier.means.shape[1])
        self.unexplained_since += int(novel.sum())
        start = self._pending is None and (due or self._novelty_due(int(novel.sum()), len(x)))
        if start and not background:
            res = self._recluster(x, frame_index)
            res.novel = novel
            return res
        self.pool = self._pooled(x)
        if start:
            self._start_recluster(self.pool, frame_index)
        if adopted is None:
            return TrackResult(self.classifier.ids[best], novel, False, recluster_started=start)
        return TrackResult(self.classifier.ids[best], novel, True, adopted.clusters, adopted.new, recluster_started=start)


def _recluster_job(pool: np.ndarray, method: str, components: int, seed: int, options: dict[str, Any],
                   refine_iterations: int, library: MotifLibrary, frame_index: int) -> _Reclustered:
    """One recluster of ``pool`` into ``library`` (a copy: the worker owns it), as
    :meth:`MotifTracker._recluster` does on the frame path."""
    clusters = cluster_features(pool, method, components, seed, **options)
    labels = refine_labels(pool, clusters.labels, components, refine_iterations)
    upd = library.update(pool, labels, frame_index, replace=True)
    classifier = MotifClassifier(components)
    classifier.fit(pool, upd.ids)
    return _Reclustered(library, classifier, clusters.n_clusters, upd.new)
