"""A run log's rVAE latents as :class:`~stemagent.encoding.pathways.LatentFrame` s, the twin's truth
beside a log, and events scored against the twin's event log (``stemagent analyze-latents``).

Latents come from the log's ``latents`` stream (the ``pipeline.rvae`` stage's, one document per
frame, aligned with that frame's ``atoms`` event), or, for a log without them, from replaying
every logged frame's atoms through an rVAE (:class:`~stemagent.encoding.rvae_stage.RVAEStage`,
the shipped weights unless told otherwise), with the logged drift estimate putting drift-corrected
atoms back where the beam saw them. Positions are the logged atoms': in the drift stage's sample
frame when the log has a ``drift`` stream (then linked as they are), else in the scan frame
(linked with a common shift per frame taken out).

**Twin truth** (``twin_truth.json`` in the log's folder, written by :func:`write_twin_truth` for a
run on the twin; a real microscope has none): per frame the true sites and their neighbourhood
classes (:data:`~stemagent.agent.app.rvae_training.CLASS_NAMES`), and every beam-induced event with
its time and positions. Positions are the specimen's; the log's frame is registered to them by
the median offset of the first frame's atoms to their nearest true sites.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
from scipy.spatial import cKDTree

from stemagent.encoding.pathways import Event, LatentFrame, Trajectories
from stemagent.errors import InputError
from stemagent.runlog import RunLog

TRUTH_FILE = "twin_truth.json"
TRUTH_FORMAT = "stemagent-twin-truth/1"


@dataclass
class LogLatents:
    """What :func:`latent_frames_from_log` read: the frames, where the latents came from
    (``log`` or ``replayed``), the weights' version, whether positions are in the drift stage's
    sample frame, and each frame's acquisition interval ``(start_s, end_s)``."""

    frames: list[LatentFrame]
    source: str
    weights: str
    sample_frame: bool
    intervals_s: list[tuple[float, float]]


def _numbers(values: Any, n: int, where: str, width: int | None = None) -> np.ndarray:
    """A logged list of ``n`` numbers (``width`` None) or ``n`` rows of ``width`` numbers, None as NaN."""
    if not isinstance(values, list) or len(values) != n:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise InputError(where, got, f"must be a list of {n} entries (one per logged atom)")
    try:
        if width is None:
            return np.array([np.nan if v is None else v for v in values], dtype=np.float64).reshape(n)
        return np.array([[np.nan if x is None else x for x in v] for v in values], dtype=np.float64).reshape(n, width)
    except (TypeError, ValueError):
        raise InputError(where, str(values[:2])[:80], f"must be numbers{'' if width is None else f' in rows of {width}'}") from None


def latent_frames_from_log(log: RunLog, *, weights: Path | None = None, device: str = "cpu", max_frames: int | None = None) -> LogLatents:
    """The log's frames with their latents (see the module docstring)."""
    frame_docs = log.event_data("frames")
    if not frame_docs:
        raise InputError("log", str(log.path), "holds no frames")
    by_index = {int(d.get("frame_index", -1)): d for d in frame_docs}
    atoms = {a.frame_index: a for a in log.atoms()}
    drift_docs = {int(d["frame_index"]): d for d in log.event_data("drift") if "frame_index" in d}
    sample_frame = any(d.get("status") in ("reference", "tracking") for d in drift_docs.values())
    latents = log.event_data("latents")
    frames: list[LatentFrame] = []
    intervals: list[tuple[float, float]] = []
    versions: set[str] = set()

    def interval(d: dict[str, Any]) -> tuple[float, float]:
        lt = d.get("line_times_s") or [math.nan]
        line_s = (lt[-1] - lt[0]) / max(len(lt) - 1, 1) if len(lt) > 1 else 0.0
        return float(lt[0]), float(lt[-1] + line_s)

    if latents:
        source = "log"
        widths = {len(z) for d in latents for z in (d.get("z") or [])[:1] if isinstance(z, list)}
        if len(widths) > 1:
            raise InputError("latents.z", sorted(widths), "every frame's latents must have the same number of content dimensions")
        width = widths.pop() if widths else 0
        for i, d in enumerate(latents):
            fi = int(d.get("frame_index", -1))
            a = atoms.get(fi)
            fd = by_index.get(fi)
            if a is None or fd is None:
                raise InputError(f"latents[{i}].frame_index", fi, "has no logged frame and atoms to go with it")
            n = len(a)
            where = f"latents[{i}]"
            z = _numbers(d.get("z"), n, f"{where}.z", width)
            angle = _numbers(d.get("angle_rad"), n, f"{where}.angle_rad")
            versions.add(str(d.get("weights", "")))
            frames.append(LatentFrame(fi, a.positions_A, z, angle, float(fd.get("dose_e_per_A2", 0.0))))
            intervals.append(interval(fd))
            if max_frames is not None and len(frames) >= max_frames:
                break
    else:
        source = "replayed"
        from stemagent.encoding.config import PipelineRVAEConfig  # torch: only when the log has no latents
        from stemagent.encoding.rvae_stage import RVAEStage  # lazy: the rVAE stage pulls torch: only for logs without latents

        stage = RVAEStage(PipelineRVAEConfig(weights=weights, device=device))
        versions.add(stage.weights_version)
        for fd in frame_docs:
            fi = int(fd.get("frame_index", -1))
            a = atoms.get(fi)
            if a is None:
                continue
            frame = log.frame_from_data(fd)
            dd = drift_docs.get(fi)
            drift = (SimpleNamespace(times_s=np.asarray(dd.get("times_s", [])), displacement_A=np.asarray(dd.get("displacement_A", [])))
                     if dd and dd.get("times_s") else None)
            out = stage.process(frame, a, drift) if len(a) else {"rvae_z": np.zeros((0, stage.model.spec.latent_dim)),
                                                                 "rvae_angle_rad": np.zeros(0)}
            frames.append(LatentFrame(fi, a.positions_A, out["rvae_z"], out["rvae_angle_rad"], float(frame.dose_e_per_A2)))
            intervals.append(interval(fd))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise InputError("log", str(log.path), "holds no frames with atoms")
    return LogLatents(frames, source, ", ".join(sorted(v for v in versions if v)), sample_frame, intervals)


# --- the twin's truth -----------------------------------------------------------------------
def write_twin_truth(run_dir: str | Path, ground_truth: Any) -> Path:
    """``<run_dir>/twin_truth.json`` from a twin's :class:`~stemagent.simulators.twin.GroundTruth`
    (the frames it still holds: make ``ground_truth.frames`` unbounded before a long run)."""
    from stemagent.agent.app.rvae_training import CLASS_NAMES, neighbourhood_classes  # torch: only here

    frames = []
    for index, t in ground_truth.frames:
        cls = neighbourhood_classes(t.positions_A, t.labels)
        keep = cls >= 0
        frames.append({"frame_index": int(index), "positions_A": np.round(t.positions_A[keep], 4).tolist(), "classes": cls[keep].tolist()})
    doc = {"format": TRUTH_FORMAT, "class_names": list(CLASS_NAMES), "frames": frames,
           "events": [e.to_dict() for e in ground_truth.events]}
    path = Path(run_dir) / TRUTH_FILE
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@dataclass
class TwinTruth:
    class_names: list[str]
    frames: dict[int, tuple[np.ndarray, np.ndarray]]  # frame index -> (positions (K, 2), classes (K,))
    events: list[dict[str, Any]]


def read_twin_truth(path: Path) -> TwinTruth:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError("truth", str(path), f"is not a readable JSON file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != TRUTH_FORMAT:
        raise InputError(f"{path.name}.format", doc.get("format") if isinstance(doc, dict) else None, f"must be {TRUTH_FORMAT!r}")
    try:
        frames = {int(f["frame_index"]): (np.asarray(f["positions_A"], dtype=np.float64).reshape(-1, 2), np.asarray(f["classes"], dtype=np.int64))
                  for f in doc.get("frames", [])}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path.name}.frames", type(exc).__name__, f"each frame needs frame_index, positions_A (K, 2) and classes (K,) ({exc})") from None
    names = doc.get("class_names")
    if not isinstance(names, list) or not names:
        raise InputError(f"{path.name}.class_names", names, "must name the classes")
    return TwinTruth([str(n) for n in names], frames, list(doc.get("events", [])))


def register_to_truth(frames: Sequence[LatentFrame], truth: TwinTruth, reach_A: float = 0.7) -> np.ndarray:
    """Offset ``(2,)`` to add to the truth's positions to land on the log's (median over the
    first frames' atoms with a true site within ``reach_A``)."""
    offsets = []
    for f in frames[:5]:
        t = truth.frames.get(f.frame_index)
        if t is None or len(t[0]) == 0 or len(f.positions_A) == 0:
            continue
        d, j = cKDTree(t[0]).query(f.positions_A, distance_upper_bound=reach_A)
        ok = np.isfinite(d)
        offsets.append(f.positions_A[ok] - t[0][j[ok]])
    if not offsets or sum(len(o) for o in offsets) < 3:
        return np.zeros(2)
    return np.median(np.concatenate(offsets), axis=0)


def assign_true_classes(frames: Sequence[LatentFrame], truth: TwinTruth, offset_A: np.ndarray, reach_A: float = 0.6) -> None:
    """Each frame's ``true_class``: the class of the nearest true site within ``reach_A`` (-1 if none)."""
    for f in frames:
        t = truth.frames.get(f.frame_index)
        cls = np.full(len(f.positions_A), -1, dtype=np.int64)
        if t is not None and len(t[0]) and len(f.positions_A):
            d, j = cKDTree(t[0] + offset_A).query(f.positions_A, distance_upper_bound=reach_A)
            ok = np.isfinite(d)
            cls[ok] = t[1][j[ok]]
        f.true_class = cls


def _step_of(time_s: float, intervals: Sequence[tuple[float, float]]) -> int | None:
    """The first frame that ends after ``time_s`` (the frame that shows the event first)."""
    for i, (_, end) in enumerate(intervals):
        if time_s <= end:
            return i
    return None


def score_events(groups: Sequence[Sequence[Event]], truth: TwinTruth, intervals: Sequence[tuple[float, float]], offset_A: np.ndarray,
                 traj: Trajectories, *, observe_frames: int = 3, radius_A: float = 2.0, steps: int = 2,
                 kinds: Sequence[str] = ("swap", "knock_on")) -> dict[str, Any]:
    """Detected event groups against the twin's event log: a group matches a true event when one
    of its events lies within ``radius_A`` of one of the event's positions (before or after) and
    within ``steps`` frames of the frame that first shows it; each true event and each group
    match once (greedy by distance). Recall is over the *observable* true events during the
    sequence: those with a track within ``radius_A`` of one of their positions encoded in at least
    ``observe_frames`` frames before the event and as many from it on (an event at the field's edge, where
    no patch fits, or just before the sequence ends cannot show in a trajectory); ``recall_all``
    is over all of them."""
    tree = cKDTree(traj.positions_A) if len(traj) else None
    true: list[dict[str, Any]] = []
    for e in truth.events:
        if e.get("kind") not in kinds:
            continue
        step = _step_of(float(e["time_s"]), intervals)
        if step is None:
            continue
        p = np.asarray(e["positions_before_A"] + e["positions_after_A"], dtype=np.float64).reshape(-1, 2) + offset_A
        observable = False
        if tree is not None:
            near = np.unique(np.concatenate([np.asarray(tree.query_ball_point(q, radius_A), dtype=np.int64) for q in p]))
            for track in np.unique(traj.track[near]):
                st = traj.step[traj.track == track]
                if np.sum(st < step) >= observe_frames and np.sum(st >= step) >= observe_frames:
                    observable = True
                    break
        true.append({"kind": e["kind"], "step": step, "positions": p, "seen": observable})
    cand = []
    for gi, g in enumerate(groups):
        gp = np.array([ev.position_A for ev in g])
        gs = np.array([ev.step for ev in g])
        for ti, t in enumerate(true):
            ok = np.abs(gs - t["step"]) <= steps
            if not ok.any():
                continue
            d = np.sqrt(((gp[ok][:, None, :] - t["positions"][None, :, :]) ** 2).sum(-1)).min()
            if d <= radius_A:
                cand.append((float(d), gi, ti))
    used_g, used_t = set(), set()
    for _d, gi, ti in sorted(cand):
        if gi not in used_g and ti not in used_t:
            used_g.add(gi)
            used_t.add(ti)
    seen = [i for i, t in enumerate(true) if t["seen"]]
    tp_seen = sum(1 for i in seen if i in used_t)
    n_g = len(groups)
    out = {
        "true_events": len(true), "observable_true_events": len(seen),
        "true_by_kind": {k: sum(1 for t in true if t["kind"] == k) for k in kinds},
        "detected_groups": n_g, "matched": len(used_t),
        "precision": round(len(used_g) / n_g, 4) if n_g else None,
        "recall": round(tp_seen / len(seen), 4) if seen else None,
        "recall_all": round(len(used_t) / len(true), 4) if true else None,
        "missed_by_kind": {k: sum(1 for i in seen if i not in used_t and true[i]["kind"] == k) for k in kinds},
        "match_radius_A": radius_A, "match_steps": steps, "observe_frames": observe_frames,
    }
    return out
