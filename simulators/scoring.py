"""Score a run's logged atoms against the twin's ground truth.

For every logged frame the twin kept truth for, atoms found are matched one-to-one (within
``radius_A``) to the columns where the truth says they appear in that frame (drift, rotation and
jitter applied), class-agnostically: the question is whether the agent saw the atoms where they
were. Vacancy sites (no atom to see) are left out of the truth and of the predictions, and so is
a margin at the frame's edges where columns are cut off.

Frames the drift stage analysed (the run log's ``drift`` stream has an estimate for them) carry
their atoms in the sample frame: those are matched to the truth's sample-frame positions of the
same columns (``FrameTruth.positions_A``), so a run is scored on where the agent *says* the atoms
are in the specimen, drift estimate included, not on the scan-frame pixels.
"""

from __future__ import annotations

from dataclasses import replace
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
    sample_frame = {int(d["frame_index"]) for d in log.event_data("drift")} if "drift" in log.streams() else set()
    for atoms in log.atoms():
        truth = ground_truth.frame_truth(atoms.frame_index)
        if truth is None:
            continue
        frames += 1
        g = truth.geometry
        names = truth.class_names
        real = np.array([not _is_vacancy(names[k]) for k in truth.labels], dtype=bool)
        inside = _inside(g, truth.pixels_rc, margin_A)[real]
        if atoms.frame_index in sample_frame:
            true_xy = truth.positions_A[real]
            # predictions near the edge: judged in the field as it lay on the specimen (the scan
            # field less the true drift over the frame)
            shift = np.mean(truth.drift_A, axis=0) if len(truth.drift_A) else np.zeros(2)
            g_pred = replace(g, center_A=(float(g.center_A[0] - shift[0]), float(g.center_A[1] - shift[1])))
        else:
            true_xy = g.pixel_to_sample(truth.pixels_rc[real]) if real.any() else np.zeros((0, 2))
            g_pred = g
        keep = np.array([not _is_vacancy(atoms.class_names[k]) for k in atoms.classes], dtype=bool)
        p_xy = atoms.positions_A[keep]
        p_in = _inside(g_pred, g_pred.sample_to_pixel(p_xy), margin_A) if len(p_xy) else np.zeros(0, dtype=bool)
        # everything takes part in the matching; only columns (and unmatched detections) inside the
        # margin are counted, so an atom just inside and its detection just outside is no error
        res = match(p_xy, np.zeros(len(p_xy)), true_xy, np.zeros(len(true_xy)), radius_A, count_pred=p_in, count_true=inside)
        tp += res.tp.get(0, 0)
        fp += res.fp.get(0, 0)
        fn += res.fn.get(0, 0)
        counted = inside[res.true_idx] if len(res.true_idx) else np.zeros(0, dtype=bool)
        if counted.any():
            sq.append(np.sum((p_xy[res.pred_idx[counted]] - true_xy[res.true_idx[counted]]) ** 2, axis=1))
    d2 = np.concatenate(sq) if sq else np.zeros(0)
    return {
        "frames_scored": frames,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "rmse_A": float(np.sqrt(d2.mean())) if len(d2) else float("nan"),
        "match_radius_A": radius_A,
    }
