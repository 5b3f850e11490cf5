"""Score a run's logged atoms against the twin's ground truth.

For every logged frame the twin kept truth for, atoms found are matched one-to-one (within
``radius_A``) to the columns where the truth says they appear in that frame (drift, rotation and
jitter applied), class-agnostically: the question is whether the agent saw the atoms where they
were. Vacancy sites (no atom to see) are left out of the truth and of the predictions, and so is
a margin at the frame's edges where columns are cut off.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stemagent.runlog import RunLog
from stemagent.segmentation.metrics import match
from stemagent.types import ScanGeometry


def _is_vacancy(class_name: str) -> bool:
    """Vacancy classes ("vacancy", "column-vacancy", ...) mark empty sites, not atoms."""
    return "vacancy" in class_name


def _inside(geometry: ScanGeometry, rc: np.ndarray, margin_A: float) -> np.ndarray:
    rows, cols = geometry.shape_px
    px = float(np.mean(geometry.pixel_size_A))
    m = margin_A / px
    return (rc[:, 0] >= m - 0.5) & (rc[:, 0] <= rows - 0.5 - m) & (rc[:, 1] >= m - 0.5) & (rc[:, 1] <= cols - 0.5 - m)


def score_run(log: RunLog, ground_truth: Any, radius_A: float = 0.5, margin_A: float = 1.0) -> dict[str, Any]:
    """Detection F1, precision, recall and matched-position RMSE (Å) over all frames with truth."""
    tp = fp = fn = 0
    sq: list[np.ndarray] = []
    frames = 0
    for atoms in log.atoms():
        truth = ground_truth.frame_truth(atoms.frame_index)
        if truth is None:
            continue
        frames += 1
        g = truth.geometry
        names = truth.class_names
        real = np.array([not _is_vacancy(names[k]) for k in truth.labels], dtype=bool)
        t_rc = truth.pixels_rc[real]
        t_rc = t_rc[_inside(g, t_rc, margin_A)]
        true_xy = g.pixel_to_sample(t_rc) if len(t_rc) else np.zeros((0, 2))
        keep = np.array([not _is_vacancy(atoms.class_names[k]) for k in atoms.classes], dtype=bool)
        p_xy = atoms.positions_A[keep]
        p_xy = p_xy[_inside(g, g.sample_to_pixel(p_xy), margin_A)] if len(p_xy) else p_xy
        res = match(p_xy, np.zeros(len(p_xy)), true_xy, np.zeros(len(true_xy)), radius_A)
        tp += res.tp.get(0, 0)
        fp += res.fp.get(0, 0)
        fn += res.fn.get(0, 0)
        if len(res.pred_idx):
            sq.append(np.sum((p_xy[res.pred_idx] - true_xy[res.true_idx]) ** 2, axis=1))
    d2 = np.concatenate(sq) if sq else np.zeros(0)
    return {
        "frames_scored": frames,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "rmse_A": float(np.sqrt(d2.mean())) if len(d2) else float("nan"),
        "match_radius_A": radius_A,
    }
