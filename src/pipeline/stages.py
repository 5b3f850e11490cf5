"""Adapters that make analysis parts into pipeline stages (:class:`~stemagent.pipeline.core.Stage`).

Each is a few lines: it reads what it needs from the :class:`~stemagent.stages.Observation`,
calls the part's own entry point and puts the result back.

- :class:`SegmentStage` (``segment``): a :class:`~stemagent.stages.Segmenter`; ``obs.atoms``;
- :class:`PolicyStage` (``policy``): a :class:`~stemagent.stages.Policy`; ``obs.decision``, and
  for a park observation the policy's ``observe_park`` when it has one;
- :class:`AtomFeatureStage`: any ``fn(frame, atoms) -> {name: (N, ...) array}`` (e.g.
  ``EncodingStage.process``); ``obs.atom_features``;
- :class:`BoundaryTraceStage` (``boundaries``): :class:`~stemagent.boundaries.trace.BoundaryStage`;
  the traces' summary in ``obs.records``.

- :class:`EncodingAdapter` (``encoding``): :class:`~stemagent.encoding.stage.EncodingStage`
  (duck-typed: ``process(frame, atoms) -> {name: array}`` and ``last_report``); per-atom motif
  labels, motif-cells, symmetry scores and Zernike magnitudes in ``obs.atom_features``, a summary
  in ``obs.records``, and the per-atom labels as the run log's ``motifs`` stream
  (:meth:`EncodingAdapter.log_document`).

- :class:`RVAEAdapter` (``rvae``): :class:`~stemagent.encoding.rvae_stage.RVAEStage` (duck-typed:
  ``process(frame, atoms, drift) -> {name: array}`` and ``weights_version``); per-atom latents
  (angle, shift, content ``z``) in ``obs.atom_features``, a summary in ``obs.records``, and the
  latents as the run log's ``latents`` stream (:meth:`RVAEAdapter.log_document`).

- :class:`DriftAdapter` (``drift``): a drift stage with ``update(frame, atoms) -> estimate``
  (the estimate has ``atoms`` in the sample frame and ``to_dict()``); ``obs.drift``, ``obs.atoms``
  replaced by the estimate's, and ``to_device`` through a conversion function (sample to beam
  coordinates at the time the command acts).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from stemagent.boundaries.trace import BoundaryStage
from stemagent.stages import Observation, Policy, Segmenter
from stemagent.types import Atoms, BeamCommand, Frame

#: converts a sample-frame command to what the device executes, at ``start_s``: ``(command, record)``
Convert = Callable[[BeamCommand, float], tuple[BeamCommand, dict[str, Any]]]


class SegmentStage:
    """Atoms of the frame from a segmenter."""

    name = "segment"

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter

    def process(self, obs: Observation) -> Observation:
        assert obs.frame is not None
        obs.atoms = self.segmenter.find(obs.frame)
        obs.records[self.name] = {"n_atoms": len(obs.atoms), "class_names": list(obs.atoms.class_names),
                                  "counts": np.bincount(obs.atoms.classes, minlength=len(obs.atoms.class_names)).tolist()}
        # a segmenter that reports on its frame (detector, out-of-distribution check, evidence): into the log
        report = getattr(self.segmenter, "last_report", None)
        if isinstance(report, dict) and report:
            obs.records[self.name]["report"] = report
        return obs


class PolicyStage:
    """The decision: ``policy.decide(obs)``; after a park ``policy.observe_park(obs)`` if it has one.

    A policy with ``drain_events() -> [(stream, document), ...]`` (what it found out: steps in a
    park signal, outcomes, re-plans) has them put into ``obs.records["policy"]["events"]``; the
    agent writes each into the run log stream it names."""

    name = "policy"

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def process(self, obs: Observation) -> Observation:
        obs.decision = self.policy.decide(obs)
        self._drain(obs)
        return obs

    def process_park(self, obs: Observation) -> Observation:
        observe = getattr(self.policy, "observe_park", None)
        obs.decision = observe(obs) if observe is not None else None
        self._drain(obs)
        return obs

    def _drain(self, obs: Observation) -> None:
        drain = getattr(self.policy, "drain_events", None)
        events = list(drain()) if drain is not None else []
        if events:
            obs.records[self.name] = {"events": [[str(stream), doc] for stream, doc in events]}

    @property
    def stop_reason(self) -> str:
        """Non-empty when the policy has finished (``policy.stop_reason``)."""
        return str(getattr(self.policy, "stop_reason", "") or "")

    @property
    def goal_reached(self) -> bool | None:
        """``policy.goal_reached``: ``None`` for a policy without a goal (a survey, a raster)."""
        reached = getattr(self.policy, "goal_reached", None)
        return None if reached is None else bool(reached)


class AtomFeatureStage:
    """Per-atom features from ``fn(frame, atoms) -> {name: (N, ...) array}``."""

    def __init__(self, name: str, fn: Callable[[Frame, Atoms], dict[str, Any]]) -> None:
        self.name = name
        self.fn = fn

    def process(self, obs: Observation) -> Observation:
        assert obs.frame is not None
        out = self.fn(obs.frame, obs.atoms)
        obs.atom_features.update({k: np.asarray(v) for k, v in out.items()})
        obs.records[self.name] = {"features": sorted(out)}
        return obs


class BoundaryTraceStage:
    """Domain-boundary traces of the frame (:class:`~stemagent.boundaries.trace.BoundaryStage`)."""

    name = "boundaries"

    def __init__(self, stage: BoundaryStage) -> None:
        self.stage = stage

    def process(self, obs: Observation) -> Observation:
        assert obs.frame is not None
        res = self.stage.process(obs.frame)
        obs.records[self.name] = {"n_traces": len(res.traces), "n_steps": int(sum(len(t) for t in res.traces))}
        obs.features["boundary_traces"] = np.asarray([len(res.traces)])
        return obs


#: the encoding outputs the policy sees (``obs.atom_features``); the complex moments stay in the stage;
#: the last three only when ``pipeline.encoding.site_features`` asks for them
ENCODING_FEATURES = ("motif", "motif_cell", "rare_cell", "encoded", "symmetry", "zernike_magnitude",
                     "coordination", "site_intensity", "neighbour_intensity")


class EncodingAdapter:
    """The encoding stage (motifs) in the pipeline: see the module docstring.

    A frame with no atoms is not an error: it gets no motifs (``records["encoding"]["skipped"]``).
    ``log_symmetry``: the motifs stream carries the symmetry scores too (rounded to 6 digits)."""

    name = "encoding"
    stream = "motifs"

    def __init__(self, stage: Any, log_symmetry: bool = True) -> None:
        self.stage = stage
        self.log_symmetry = log_symmetry

    def process(self, obs: Observation) -> Observation:
        assert obs.frame is not None
        if len(obs.atoms) == 0:
            obs.records[self.name] = {"skipped": "no atoms"}
            return obs
        out = self.stage.process(obs.frame, obs.atoms)
        obs.atom_features.update({k: np.asarray(out[k]) for k in ENCODING_FEATURES if k in out})
        obs.features["symmetry_folds"] = np.asarray(out.get("symmetry_folds", []))
        rep = dict(getattr(self.stage, "last_report", {}) or {})
        motif = np.asarray(out["motif"])
        ids, counts = np.unique(motif[motif >= 0], return_counts=True)
        cells = rep.get("motif_cells") or {}
        obs.records[self.name] = {
            "encoded": int(np.count_nonzero(out["encoded"])),
            "motif_counts": {str(int(i)): int(c) for i, c in zip(ids, counts)},
            "rare_atoms": int(np.count_nonzero(out["rare_cell"])),
            "library_size": int(rep.get("library_size", 0)),
            "new_motifs": [int(m) for m in rep.get("new_motifs", [])],
            "reclustered": bool(rep.get("reclustered", False)),
            "recluster_started": bool(rep.get("recluster_started", False)),
            "unexplained": int(rep.get("unexplained", 0)),
            "radius_A": float(rep.get("radius_A") or 0.0),
            "cell_types": [{k: t.get(k) for k in ("members", "count", "rare")} for t in cells.get("types", [])][:16],
        }
        return obs

    def close(self) -> None:
        closer = getattr(self.stage, "close", None)
        if closer is not None:
            closer()

    def log_document(self, obs: Observation) -> dict[str, Any] | None:
        """The ``motifs`` stream's document of a frame observation (None: nothing to log)."""
        if obs.kind != "frame" or "motif" not in obs.atom_features or self.name in obs.errors:
            return None
        f = obs.atom_features
        doc: dict[str, Any] = {
            "frame_index": int(obs.frame_index),
            "motif": f["motif"].astype(np.int64).tolist(),
            "motif_cell": f["motif_cell"].astype(np.int64).tolist(),
            "rare_cell": f["rare_cell"].astype(bool).tolist(),
        }
        if self.log_symmetry and "symmetry" in f:
            sym = np.round(np.nan_to_num(f["symmetry"].astype(np.float64), nan=-1.0), 6)
            doc["symmetry"] = sym.tolist()
            doc["symmetry_folds"] = np.asarray(obs.features.get("symmetry_folds", [])).astype(np.int64).tolist()
        return doc


#: the rVAE outputs the policy sees (``obs.atom_features``)
RVAE_FEATURES = ("rvae_encoded", "rvae_angle_rad", "rvae_shift_px", "rvae_z")


class RVAEAdapter:
    """The rVAE stage (latents) in the pipeline: see the module docstring.

    A frame with no atoms is not an error: it gets no latents (``records["rvae"]["skipped"]``).
    The log holds the latents rounded to ``log_digits`` decimals (NaN where not encoded is ``null``)."""

    name = "rvae"
    stream = "latents"

    def __init__(self, stage: Any, log_digits: int = 5) -> None:
        self.stage = stage
        self.log_digits = log_digits

    def process(self, obs: Observation) -> Observation:
        assert obs.frame is not None
        version = str(getattr(self.stage, "weights_version", ""))
        if len(obs.atoms) == 0:
            obs.records[self.name] = {"skipped": "no atoms", "weights": version}
            return obs
        out = self.stage.process(obs.frame, obs.atoms, obs.drift)
        obs.atom_features.update({k: np.asarray(out[k]) for k in RVAE_FEATURES if k in out})
        enc = np.asarray(out["rvae_encoded"], dtype=bool)
        z = np.asarray(out["rvae_z"], dtype=np.float64)[enc]
        obs.records[self.name] = {"encoded": int(enc.sum()), "weights": version,
                                  "z_mean": np.round(z.mean(0), 6).tolist() if len(z) else [],
                                  "z_std": np.round(z.std(0), 6).tolist() if len(z) else []}
        return obs

    def _rounded(self, a: np.ndarray) -> list[Any]:
        r = np.round(np.asarray(a, dtype=np.float64), self.log_digits)
        out = r.astype(object)
        out[~np.isfinite(r)] = None
        return list(out.tolist())

    def log_document(self, obs: Observation) -> dict[str, Any] | None:
        """The ``latents`` stream's document of a frame observation (None: nothing to log)."""
        if obs.kind != "frame" or "rvae_z" not in obs.atom_features or self.name in obs.errors:
            return None
        f = obs.atom_features
        return {
            "frame_index": int(obs.frame_index),
            "weights": str(getattr(self.stage, "weights_version", "")),
            "encoded": f["rvae_encoded"].astype(bool).tolist(),
            "angle_rad": self._rounded(f["rvae_angle_rad"]),
            "shift_px": self._rounded(f["rvae_shift_px"]),
            "z": self._rounded(f["rvae_z"]),
        }


class DriftAdapter:
    """A drift stage in the pipeline (duck-typed: ``stage.update(frame, atoms)`` returns an estimate
    with ``atoms`` and ``to_dict()``). ``convert``: the command conversion the agent applies at
    the time a command acts (e.g. ``stemagent.drift.commands``), or None (commands pass as they are)."""

    name = "drift"

    def __init__(self, stage: Any, convert: Convert | None = None) -> None:
        self.stage = stage
        self.convert = convert

    def process(self, obs: Observation) -> Observation:
        assert obs.frame is not None
        estimate = self.stage.update(obs.frame, obs.atoms)
        obs.drift = estimate
        obs.atoms = estimate.atoms
        obs.records[self.name] = estimate.to_dict()
        return obs

    def to_device(self, command: BeamCommand, start_s: float) -> tuple[BeamCommand, dict[str, Any]]:
        return (command, {}) if self.convert is None else self.convert(command, start_s)
