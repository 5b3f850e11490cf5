"""Is a frame like the specimens the atom finder was trained on? A per-frame out-of-distribution score.

The U-Net was trained on graphene and hexagonal TMDs (model card). On anything else (a gold
nanoparticle, a perovskite, a thick crystal) it still returns atoms, with classes of its own
alphabet, and nothing in them says that the frame was unlike its training. Three symptoms,
each cheap to measure from the atoms found, say so:

- ``network_doubt``: the share of atoms whose network class probabilities do not pick one class
  (the largest below ``0.8`` of their sum). On trained specimens a few per cent at most;
  on a nanoparticle or a perovskite a third or more.
- ``lattice_misfit``: the share of interior atoms without exactly three neighbours within
  ``1.25x`` the frame's median nearest-neighbour distance. Every trained lattice is a honeycomb
  in projection (graphene; metal and chalcogen columns of a TMD); square lattices (fcc [001],
  perovskites with their O columns) have four, amorphous regions anything.
- ``uncovered``: the share of the frame's interior farther than ``3 Å`` from any atom. The
  trained specimens cover the frame (nearest-neighbour distances below 2 Å); a particle on
  vacuum, or atoms found only at one edge, leave most of it empty.

``square`` (not a symptom, a hint for ``specimen: auto``): the share of interior atoms with
exactly four such neighbours, as in a perovskite's (or an fcc [001]) projection.

``score`` is the largest of the three, each divided by its warning level, so a frame with
``score >= 1`` is *atypical*. How it fails: a frame with fewer than ``min_atoms`` atoms is
atypical with the reason "too few atoms" (there is no lattice to judge).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

#: warning level of each symptom (a frame is atypical when any reaches it)
WARN_NETWORK_DOUBT = 0.2
WARN_LATTICE_MISFIT = 0.35
WARN_UNCOVERED = 0.05
COVER_RADIUS_A = 3.0


@dataclass(frozen=True)
class FrameCheck:
    """Per-frame out-of-distribution symptoms (shares in [0, 1]; ``network_doubt`` is None
    without class probabilities), ``score`` (>= 1: atypical), ``typical`` and ``reason``."""

    score: float
    network_doubt: float | None
    lattice_misfit: float
    uncovered: float
    n_atoms: int
    typical: bool
    reason: str
    square: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "ood_score": round(self.score, 4),
            "network_doubt": None if self.network_doubt is None else round(self.network_doubt, 4),
            "lattice_misfit": round(self.lattice_misfit, 4),
            "uncovered": round(self.uncovered, 4),
            "square_lattice": round(self.square, 4),
            "typical": self.typical,
            "reason": self.reason,
        }


def frame_check(
    rc_px: np.ndarray,
    pixel_A: tuple[float, float],
    shape_px: tuple[int, int],
    class_probs: np.ndarray | None = None,
    *,
    min_atoms: int = 12,
    margin_A: float = 3.0,
) -> FrameCheck:
    """The symptoms of one frame's atoms ``rc_px`` ``(N, 2)`` (pixel row, col) in a frame of
    ``shape_px`` sampled at ``pixel_A`` ``(x, y)``; ``class_probs`` ``(N, C)`` the network's."""
    rc = np.asarray(rc_px, dtype=np.float64).reshape(-1, 2)
    n = len(rc)
    px, py = float(pixel_A[0]), float(pixel_A[1])
    h, w = int(shape_px[0]), int(shape_px[1])
    xy = np.column_stack([rc[:, 1] * px, rc[:, 0] * py])
    size = (w * px, h * py)
    if n < min_atoms:
        return FrameCheck(float("inf"), None, 1.0, 1.0, n, False, f"too few atoms ({n} < {min_atoms}) to judge a lattice")
    doubt = None
    if class_probs is not None and len(class_probs) == n and np.asarray(class_probs).ndim == 2:
        p = np.clip(np.asarray(class_probs, dtype=np.float64), 0.0, None)
        share = p.max(axis=1) / np.maximum(p.sum(axis=1), 1e-12)
        doubt = float(np.mean(share < 0.8))
    tree = cKDTree(xy)
    d, _ = tree.query(xy, k=2)
    nn = float(np.median(d[:, 1]))
    interior = (xy[:, 0] >= margin_A) & (xy[:, 0] <= size[0] - margin_A) & (xy[:, 1] >= margin_A) & (xy[:, 1] <= size[1] - margin_A)
    if interior.sum() >= 3:
        counts = np.array([len(v) - 1 for v in tree.query_ball_point(xy[interior], 1.25 * nn)])
        misfit = float(np.mean(counts != 3))
        square = float(np.mean(counts == 4))
    else:
        misfit, square = 1.0, 0.0
    # a grid over the interior, at half the cover radius
    step = COVER_RADIUS_A / 2.0
    gx = np.arange(margin_A, size[0] - margin_A + 1e-9, step)
    gy = np.arange(margin_A, size[1] - margin_A + 1e-9, step)
    if len(gx) and len(gy):
        grid = np.stack(np.meshgrid(gx, gy, indexing="xy"), axis=-1).reshape(-1, 2)
        uncovered = float(np.mean(tree.query(grid)[0] > COVER_RADIUS_A))
    else:
        uncovered = 0.0
    parts = {"network doubt": (doubt or 0.0) / WARN_NETWORK_DOUBT, "lattice misfit": misfit / WARN_LATTICE_MISFIT, "uncovered area": uncovered / WARN_UNCOVERED}
    worst = max(parts, key=lambda k: parts[k])
    score = float(parts[worst])
    typical = score < 1.0
    if typical:
        reason = "like the trained specimens"
    elif worst == "network doubt":
        reason = f"unlike the trained specimens: network doubt: {doubt or 0.0:.0%} of atoms without a clear class"
    elif worst == "lattice misfit":
        reason = f"unlike the trained specimens: lattice misfit: {misfit:.0%} of atoms not in a honeycomb"
    else:
        reason = f"unlike the trained specimens: uncovered area: {uncovered:.0%} of the frame farther than {COVER_RADIUS_A:g} Å from any atom"
    return FrameCheck(score, doubt, misfit, uncovered, n, typical, reason, square)
