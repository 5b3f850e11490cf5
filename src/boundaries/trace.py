"""From atomic columns to ordered boundary step sequences with confidence.

The boundary sublattice (A-site columns) is registered (:mod:`stemagent.boundaries.register`);
each column's local displacement is classified as *none* or as a pointer along one of the four
lattice directions, by a Gaussian mixture with the measured noise ``sigma`` and the boundary
displacement ``delta`` (configured or estimated from the clearly displaced columns). A
boundary column points at the next column of its boundary, so a boundary is read by starting
at a displaced column nobody points at and following the pointers until

- ``end``: the pointed-at column is not displaced (the boundary's last site),
- ``edge``: the pointed-at column was not found (outside the field or missed),
- ``self``: the pointed-at column was already passed (the boundary ran into itself),
- ``merge``: the pointed-at column belongs to a boundary read before.

Displaced columns left over form closed chains (``cycle``): they are read from their lowest
index, with their first step's confidence halved (where a cycle starts is unknown).

Motif sequences: motif ``m`` of a trace is its steps ``(m, m + 1)``; its confidence is the
product of the two steps' posterior probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stemagent.boundaries.config import BoundaryTraceConfig
from stemagent.boundaries.lattice import STEP_VECTORS, motif_name, states_of_steps, word_name
from stemagent.boundaries.register import LatticeRegistration, register_lattice
from stemagent.errors import InputError
from stemagent.segmentation.classical import LoGFinder
from stemagent.types import Atoms, Frame


@dataclass
class BoundaryTrace:
    """One boundary read from an image.

    ``steps`` ``(L,)`` direction indices (0 E = +a1, 1 N = +a2, 2 W, 3 S); ``sites_ij`` ``(L+1, 2)``
    lattice indices of its columns (the last is where it ends); ``positions_A`` ``(L+1, 2)``
    (sample frame; the end column's model position if it was not found); ``step_confidence``
    ``(L,)`` posterior probability of each step; ``stop`` how the reading ended."""

    steps: np.ndarray
    sites_ij: np.ndarray
    positions_A: np.ndarray
    step_confidence: np.ndarray
    stop: str
    frame_index: int = 0

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def motif_confidence(self) -> np.ndarray:
        c = self.step_confidence
        return c[:-1] * c[1:]

    @property
    def motifs(self) -> list[str]:
        return [motif_name(int(a), int(b)) for a, b in zip(self.steps[:-1], self.steps[1:])]

    @property
    def states(self) -> np.ndarray:
        return states_of_steps(self.steps)

    def to_dict(self) -> dict:
        return {"frame_index": self.frame_index, "steps": word_name(self.steps), "stop": self.stop,
                "start_ij": self.sites_ij[0].tolist(), "motifs": self.motifs,
                "motif_confidence": [round(float(c), 4) for c in self.motif_confidence],
                "positions_A": np.round(self.positions_A, 3).tolist()}


@dataclass
class TraceResult:
    """Traces of one frame plus what the reading measured."""

    traces: list[BoundaryTrace]
    registration: LatticeRegistration
    column_positions_A: np.ndarray
    pointer: np.ndarray  # (N,) -1 none, 0..3 step direction, per column
    pointer_confidence: np.ndarray  # (N,)
    delta_A: float
    notes: list[str] = field(default_factory=list)


def select_columns(atoms: Atoms, intensities: np.ndarray | None, config: BoundaryTraceConfig) -> np.ndarray:
    """Indices of the boundary-sublattice columns among ``atoms``: by class name when the atoms
    carry it, else the bright group of ``intensities`` (2-means on log intensity, or the
    configured brightest fraction)."""
    if config.column_class in atoms.class_names and len(atoms.class_names) > 1:
        return np.flatnonzero(atoms.classes == atoms.class_names.index(config.column_class))
    if intensities is None:
        if len(atoms.class_names) == 1:
            return np.arange(len(atoms))
        raise InputError("atoms.class_names", atoms.class_names, f"have no class {config.column_class!r} and no intensities were given")
    x = np.log(np.maximum(np.asarray(intensities, dtype=np.float64), 1e-12))
    if x.shape != (len(atoms),):
        raise InputError("intensities.shape", x.shape, f"must be ({len(atoms)},)")
    if config.brightest_fraction is not None:
        cut = np.quantile(x, 1.0 - config.brightest_fraction)
        return np.flatnonzero(x >= cut)
    lo, hi = np.percentile(x, 10), np.percentile(x, 95)
    for _ in range(50):
        thr = 0.5 * (lo + hi)
        lo_new, hi_new = x[x < thr].mean() if np.any(x < thr) else lo, x[x >= thr].mean()
        if abs(lo_new - lo) + abs(hi_new - hi) < 1e-9:
            break
        lo, hi = lo_new, hi_new
    return np.flatnonzero(x >= 0.5 * (lo + hi))


def classify_pointers(reg: LatticeRegistration, config: BoundaryTraceConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Per column: pointer direction (-1 none), its posterior probability, and delta (Å)."""
    d = reg.to_lattice_frame(np.nan_to_num(reg.displacement_A))
    ok = reg.indexed
    sigma = max(reg.sigma_A, 1e-3)
    mag = np.linalg.norm(d, axis=1)
    strong = ok & (mag > config.min_sigmas * sigma)
    delta = config.displacement_A if config.displacement_A is not None else (float(np.median(mag[strong])) if np.sum(strong) >= 3 else 0.0)
    n = len(d)
    if delta <= config.min_sigmas * sigma * 0.5:
        return np.full(n, -1), np.where(ok, 1.0, 0.0), float(delta)
    prior_marked = float(np.clip(np.mean(strong[ok]) if np.any(ok) else 0.0, 1e-3, 0.5))
    means = np.vstack([np.zeros(2), delta * STEP_VECTORS.astype(np.float64)])  # (5, 2): none, E, N, W, S
    logp = -np.sum((d[:, None, :] - means[None]) ** 2, axis=2) / (2 * sigma**2)
    logp += np.log(np.array([1 - prior_marked] + [prior_marked / 4] * 4))[None, :]
    logp -= logp.max(axis=1, keepdims=True)
    post = np.exp(logp)
    post /= post.sum(axis=1, keepdims=True)
    best = np.argmax(post, axis=1)
    pointer = np.where(ok & (best > 0), best - 1, -1)
    conf = np.where(ok, post[np.arange(n), best], 0.0)
    return pointer, conf, float(delta)


class BoundaryTracer:
    """Stage: atomic columns -> ordered boundary step sequences with confidence (pure, no I/O)."""

    name = "boundaries"

    def __init__(self, config: BoundaryTraceConfig | None = None) -> None:
        self.config = config or BoundaryTraceConfig()

    def trace(self, atoms: Atoms, intensities: np.ndarray | None = None, scan_rc_px: np.ndarray | None = None) -> TraceResult:
        """Read the boundaries of one frame from its ``atoms`` (sample frame, Å); ``scan_rc_px``
        ``(N, 2)``: where each atom is in the image, to remove errors shared by a scan line."""
        cols = select_columns(atoms, intensities, self.config)
        res = self.trace_columns(atoms.positions_A[cols], None if scan_rc_px is None else np.asarray(scan_rc_px)[cols])
        for t in res.traces:
            t.frame_index = atoms.frame_index
        return res

    def trace_columns(self, positions_A: np.ndarray, scan_rc_px: np.ndarray | None = None) -> TraceResult:
        """Read the boundaries from the positions ``(N, 2)`` of the boundary-sublattice columns."""
        pts = np.asarray(positions_A, dtype=np.float64).reshape(-1, 2)
        reg = register_lattice(pts, neighbourhood_cells=self.config.neighbourhood_cells, flag_sigmas=self.config.min_sigmas,
                               scan_rc_px=scan_rc_px)
        pointer, conf, delta = classify_pointers(reg, self.config)
        traces = self._walk(pts, reg, pointer, conf)
        return TraceResult(traces, reg, pts, pointer, conf, delta)

    def _walk(self, pts: np.ndarray, reg: LatticeRegistration, pointer: np.ndarray, conf: np.ndarray) -> list[BoundaryTrace]:
        index = {tuple(ij): n for n, ij in enumerate(reg.ij.tolist()) if reg.indexed[n]}
        marked = {tuple(reg.ij[n].tolist()): n for n in np.flatnonzero(pointer >= 0)}
        target = {ij: (ij[0] + int(STEP_VECTORS[pointer[n], 0]), ij[1] + int(STEP_VECTORS[pointer[n], 1])) for ij, n in marked.items()}
        indegree: dict[tuple[int, int], int] = {}
        for t in target.values():
            if t in marked:
                indegree[t] = indegree.get(t, 0) + 1
        claimed: set[tuple[int, int]] = set()
        traces: list[BoundaryTrace] = []
        starts = sorted(ij for ij in marked if indegree.get(ij, 0) == 0)
        lin = np.stack([reg.a1_A, reg.a2_A], axis=1)

        def position(ij: tuple[int, int]) -> np.ndarray:
            if ij in index:
                return pts[index[ij]]
            # not found: extrapolate from the nearest indexed column
            near = min(index, key=lambda k: abs(k[0] - ij[0]) + abs(k[1] - ij[1]))
            return pts[index[near]] + lin @ (np.array(ij) - np.array(near))

        def walk(start: tuple[int, int], cycle: bool) -> None:
            path = [start]
            steps: list[int] = []
            confs: list[float] = []
            seen = {start}
            cur = start
            stop = "end"
            while True:
                n = marked[cur]
                steps.append(int(pointer[n]))
                confs.append(float(conf[n]))
                nxt = target[cur]
                path.append(nxt)
                if nxt in seen:
                    stop = "cycle" if cycle else "self"
                    break
                if nxt in claimed:
                    stop = "merge"
                    break
                if nxt not in index:
                    stop = "edge"
                    break
                if nxt not in marked:
                    stop = "end"
                    break
                seen.add(nxt)
                cur = nxt
            claimed.update(seen)
            if cycle and confs:
                confs[0] *= 0.5
            if len(steps) >= self.config.min_steps:
                traces.append(BoundaryTrace(np.array(steps, dtype=np.int64), np.array(path, dtype=np.int64),
                                            np.array([position(p) for p in path]), np.array(confs), stop))

        for s in starts:
            if s not in claimed:
                walk(s, cycle=False)
        for s in sorted(marked):
            if s not in claimed:
                walk(s, cycle=True)
        return traces


def column_intensities(image: np.ndarray, rc: np.ndarray, radius_px: float) -> np.ndarray:
    """Mean image value within ``radius_px`` of each (row, col) position ``(N, 2)``."""
    img = np.asarray(image, dtype=np.float64)
    r = int(np.ceil(radius_px))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = (dy**2 + dx**2) <= radius_px**2
    rows = np.clip(np.rint(rc[:, 0]).astype(int)[:, None] + dy[disc][None], 0, img.shape[0] - 1)
    cols = np.clip(np.rint(rc[:, 1]).astype(int)[:, None] + dx[disc][None], 0, img.shape[1] - 1)
    return img[rows, cols].mean(axis=1)


class BoundaryStage:
    """Stage: a frame -> atomic columns (LoG finder) -> boundary traces. Pure and synchronous."""

    name = "boundaries"

    def __init__(self, config: BoundaryTraceConfig | None = None) -> None:
        self.config = config or BoundaryTraceConfig()
        self.finder = LoGFinder(sigma_A=self.config.finder_sigma_A, threshold=self.config.finder_threshold,
                                min_separation_A=self.config.finder_min_separation_A)
        self.tracer = BoundaryTracer(self.config)

    def columns(self, frame: Frame) -> tuple[Atoms, np.ndarray, np.ndarray]:
        """The frame's atomic columns away from the border: ``(atoms, intensities (N,), pixel rc (N, 2))``."""
        atoms = self.finder.find(frame)
        inside = frame.geometry.contains(atoms.positions_A, self.config.edge_margin_A)
        atoms = Atoms(positions_A=atoms.positions_A[inside], classes=atoms.classes[inside], confidence=atoms.confidence[inside],
                      frame_index=atoms.frame_index, class_names=atoms.class_names)
        if len(atoms) < 9:
            raise InputError(f"frame[{frame.index}]", len(atoms), "has too few atomic columns to read boundaries")
        rc = frame.geometry.sample_to_pixel(atoms.positions_A)
        radius_px = self.config.finder_sigma_A / float(np.mean(frame.geometry.pixel_size_A))
        return atoms, column_intensities(frame.image, rc, max(radius_px, 1.0)), rc

    def process(self, frame: Frame) -> TraceResult:
        atoms, intensities, rc = self.columns(frame)
        return self.tracer.trace(atoms, intensities, scan_rc_px=rc)
