"""``stemagent replay LOG``: rebuild a run from its log, play it back, compare the atoms.

* The configuration comes from the log's start document (older logs' field names are migrated),
  with the replay driver in place of the device and telemetry off.
* The operator's control messages (``controls`` stream: targets, dose budgets, pause, resume,
  stop) are applied again after the same number of frames.
* ``--verify`` (:func:`verify_run_log`): no device and no new log; the log's own pipeline,
  built fresh from its configuration, re-runs every observation and every output is compared
  (:mod:`stemagent.pipeline.verify`).
* Frames are compared by identity: a replayed frame carries ``meta["replayed_from"]``, the
  ``log_index`` of the original frame; a frame whose chunk cannot be read is skipped in the
  replay and reported, never paired with the wrong original.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stemagent.agent.app.factory import build_pipeline
from stemagent.agent.control import ControlMessage
from stemagent.codec import decode_capabilities
from stemagent.config import RunConfig, config_from_dict
from stemagent.errors import InputError
from stemagent.pipeline.verify import VerifyReport, verify_log
from stemagent.runlog import RunLog
from stemagent.types import Atoms, Capabilities

#: logged field names of older versions -> today's names
RENAMED = {("safety", "max_total_dose_e_per_A2"): ("safety", "dose_budget_e_per_A2")}


def migrate_config(data: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for (section, old), (_, new) in RENAMED.items():
        sec = out.get(section)
        if isinstance(sec, dict) and old in sec and new not in sec:
            sec[new] = sec.pop(old)
    return out


def replay_config(original: RunLog, log: Path, pace: str) -> RunConfig:
    logged = original.start.get("config")
    if not isinstance(logged, dict):
        raise InputError("start.config", logged, "the log carries no run configuration to replay with")
    n_frames = len(original.events("frames"))
    if n_frames == 0:
        raise InputError("frames", 0, "the log holds no frames to replay")
    data = migrate_config(logged)
    data["driver"] = {"kind": "replay", "path": str(log), "pace": pace}
    data["max_frames"] = n_frames
    data["name"] = f"{data.get('name', 'run')}-replay"[:64]
    data["telemetry"] = {}
    # frame by frame: a stream's newest-wins drops depend on timing and would not replay the same
    data["agent"] = {**(data.get("agent") or {}), "overlap": False}
    # the logged safety limits stay: the same decisions pass the same gate again
    return config_from_dict(data, source=f"{log} (start.config)")


def logged_controls(original: RunLog) -> list[tuple[int, ControlMessage]]:
    """The accepted control messages of the original run, with the frame count they came at."""
    out = []
    for d in original.event_data("controls"):
        if not d.get("accepted"):
            continue
        args = d.get("arguments") or {}
        fields: dict[str, Any] = {"command": d["command"], "id": d.get("id") or None, "reason": d.get("reason", "")}
        if "value" in args:
            fields["value"] = float(args["value"])
        if "target_A" in args:
            fields["target_A"] = tuple(float(v) for v in args["target_A"])
        if args.get("confirm"):
            fields["confirm"] = True
        out.append((int(d.get("frames_done", 0)), ControlMessage.model_validate(fields, strict=False)))
    return out


def atoms_by_log_index(log: RunLog) -> dict[int, tuple[Atoms, dict[str, Any]]]:
    """Each atoms event with the frame event it belongs to, keyed by the frame's log_index.

    An atoms event belongs to the latest frame event before it with the same ``frame_index``
    (older logs numbered frames by the device, which restarted with it)."""
    atoms = iter(log.atoms())
    latest: dict[int, tuple[int, dict[str, Any]]] = {}
    out: dict[int, tuple[Atoms, dict[str, Any]]] = {}
    position = 0
    for stream, data in log.ordered_event_data("frames", "atoms"):
        if stream == "frames":
            latest[int(data["frame_index"])] = (int(data.get("log_index", position)), data)
            position += 1
        else:
            a = next(atoms)
            found = latest.get(a.frame_index)
            if found is not None:
                out[found[0]] = (a, found[1])
    return out


def _same(a: Atoms, b: Atoms) -> bool:
    return (np.array_equal(a.positions_A, b.positions_A) and np.array_equal(a.classes, b.classes)
            and np.array_equal(a.confidence, b.confidence))


def compare_atoms(original: RunLog, replayed: RunLog) -> tuple[int, int]:
    """(frames whose atoms are bit-for-bit equal, frames of the original with atoms)."""
    left = atoms_by_log_index(original)
    same = 0
    for atoms, frame in atoms_by_log_index(replayed).values():
        source = (frame.get("meta") or {}).get("replayed_from")
        if source is not None and int(source) in left and _same(left[int(source)][0], atoms):
            same += 1
    return same, len(left)


def unreadable_frames(replayed: RunLog) -> list[str]:
    """Reasons of the frames the replay had to skip (their chunks could not be read)."""
    return [e["reason"] for e in replayed.event_data("interruptions") if e["kind"] == "bad_input" and "cannot be read" in e["reason"]]


#: how closely a replayed drift estimate must match the logged one (Å; float noise of the GP's algebra)
DRIFT_TOLERANCE_A = 1e-6


def _same_drift(a: dict[str, Any], b: dict[str, Any], atol_A: float) -> bool:
    if a.get("status") != b.get("status") or a.get("reference_id") != b.get("reference_id"):
        return False
    for key in ("times_s", "displacement_A", "std_A"):
        x, y = np.asarray(a.get(key) or [], dtype=np.float64), np.asarray(b.get(key) or [], dtype=np.float64)
        if x.shape != y.shape or not np.allclose(x, y, rtol=0.0, atol=atol_A):
            return False
    return True


def compare_drift(original: RunLog, replayed: RunLog, atol_A: float = DRIFT_TOLERANCE_A) -> tuple[int, int]:
    """(frames whose drift estimate the replay reproduced within ``atol_A``, frames of the original
    with one). Frames are paired by identity (``replayed_from``), as the atoms are."""
    left = {int(d["frame_index"]): d for d in original.event_data("drift")}
    if not left:
        return 0, 0
    by_log_index = {int(f.get("log_index", i)): int(f["frame_index"]) for i, f in enumerate(original.event_data("frames"))}
    source: dict[int, int] = {}
    for f in replayed.event_data("frames"):
        came_from = (f.get("meta") or {}).get("replayed_from")
        if came_from is not None and int(came_from) in by_log_index:
            source[int(f["frame_index"])] = by_log_index[int(came_from)]
    same = 0
    for d in replayed.event_data("drift"):
        logged = left.get(source.get(int(d["frame_index"]), -1))
        if logged is not None and _same_drift(logged, d, atol_A):
            same += 1
    return same, len(left)


def logged_capabilities(original: RunLog) -> Capabilities | None:
    """The device's capabilities the run started with (its start document), as the policy saw them:
    a survey's dose per sub-scan follows the beam current, which the replay's driver does not know.
    None for a log without them (the configuration's values then apply, as before)."""
    doc = original.start.get("capabilities")
    return decode_capabilities(doc, f"{original.path}: start.capabilities") if isinstance(doc, dict) else None


def verify_run_log(original: RunLog, log: Path, rtol: float = 0.0, overlap: bool = True,
                   segment_workers: int | None = None, staged: bool | None = None) -> VerifyReport:
    """``replay LOG --verify``: the log's pipeline, built fresh from its configuration, on every
    logged observation, every output compared (:func:`~stemagent.pipeline.verify.verify_log`;
    ``overlap``: segment ahead in a worker thread; ``staged``: and the later stages ahead, each on its own; None: where each thread has a core)."""
    cfg = replay_config(original, log, "fast")
    pipeline = build_pipeline(cfg, np.random.default_rng(cfg.seed), logged_capabilities(original))
    try:
        return verify_log(original, pipeline, rtol=rtol, overlap=overlap, segment_workers=segment_workers, staged=staged)
    finally:
        pipeline.close()
