"""One codec per core type: the document form of each type that crosses a boundary.

The wire protocol (``drivers/wire.py``), the run log (:mod:`stemagent.runlog`), the configs
(:mod:`stemagent.config`) and the device adapters all read and write these types through this
module, so a quantity has one name, one unit and one shape in every document
(``docs/glossary.md``):

============================  ==================================  ==========================
type                          document model                      functions
============================  ==================================  ==========================
:class:`ScanGeometry`         :class:`GeometryDoc`                ``encode_geometry`` / ``decode_geometry``
:class:`Capabilities`         :class:`CapabilitiesDoc`            ``encode_capabilities`` / ``decode_capabilities``
:class:`ParkResult`           :class:`ParkResultDoc` + signal     ``encode_park_result`` / ``decode_park_result``
:data:`BeamCommand`           ``{"kind": ..., ...}``              ``encode_command`` / ``decode_command``
:class:`Decision`             ``{"command", "policy", ...}``      ``encode_decision`` / ``decode_decision``
:class:`Atoms`                ``{"positions_A", "classes", ...}`` ``encode_atoms`` / ``decode_atoms``
:class:`Frame` (metadata)     :class:`FrameMetaDoc` + image       ``encode_frame_meta`` / ``decode_frame_meta``
============================  ==================================  ==========================

Documents are plain JSON-able dicts. Every ``decode_*`` validates (no NaN or infinity, no
unknown field, physical bounds) and raises :class:`~stemagent.errors.InputError` naming the
field, prefixed with where the document came from (``where``), and the value.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stemagent.errors import InputError
from stemagent.types import (
    Atoms,
    BeamCommand,
    Blank,
    Capabilities,
    Decision,
    Frame,
    Park,
    ParkResult,
    ScanGeometry,
    ScanRegion,
)


class Doc(BaseModel):
    """Base of every document model: no unknown field, no NaN or infinity, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


#: positions and lengths stay within a metre of anything sensible: 1e7 Å = 1 mm
Coordinate = Annotated[float, Field(ge=-1e7, le=1e7)]
Length = Annotated[float, Field(gt=0, le=1e7)]
Pixels = Annotated[int, Field(ge=1, le=16384)]


def invalid(where: str, data: Any, exc: ValidationError) -> InputError:
    """The first problem of a failed validation as an :class:`InputError` naming ``where.field``."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    field = f"{where}.{loc}" if where and loc else (where or loc or "<document>")
    return InputError(field, err.get("input", data), str(err.get("msg", "is invalid")).removeprefix("Value error, "))


def _validate(model: type[Doc], data: Any, where: str) -> Any:
    if isinstance(data, BaseModel):
        data = data.model_dump()
    if not isinstance(data, dict):
        raise InputError(where or "<document>", type(data).__name__, "must be a mapping")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(where, data, exc) from None


# --- ScanGeometry -------------------------------------------------------------------------


class GeometryDoc(Doc):
    """Document form of :class:`~stemagent.types.ScanGeometry` (same fields, same units, pairs as
    ``[x, y]`` / ``[rows, cols]``)."""

    center_A: tuple[Coordinate, Coordinate]
    fov_A: tuple[Length, Length]
    shape_px: tuple[Pixels, Pixels]
    rotation_rad: float = Field(0.0, ge=-4 * math.pi, le=4 * math.pi)
    dwell_s: float = Field(gt=0, le=10.0)
    flyback_s: float = Field(0.0, ge=0, le=10.0)

    def to_geometry(self) -> ScanGeometry:
        return ScanGeometry(
            center_A=(float(self.center_A[0]), float(self.center_A[1])),
            fov_A=(float(self.fov_A[0]), float(self.fov_A[1])),
            shape_px=(int(self.shape_px[0]), int(self.shape_px[1])),
            rotation_rad=float(self.rotation_rad),
            dwell_s=float(self.dwell_s),
            flyback_s=float(self.flyback_s),
        )

    @classmethod
    def of(cls, g: ScanGeometry) -> GeometryDoc:
        return cls.model_validate(
            {
                "center_A": (float(g.center_A[0]), float(g.center_A[1])),
                "fov_A": (float(g.fov_A[0]), float(g.fov_A[1])),
                "shape_px": (int(g.shape_px[0]), int(g.shape_px[1])),
                "rotation_rad": float(g.rotation_rad),
                "dwell_s": float(g.dwell_s),
                "flyback_s": float(g.flyback_s),
            }
        )


def encode_geometry(g: ScanGeometry) -> dict[str, Any]:
    return GeometryDoc.of(g).model_dump(mode="json")


def decode_geometry(data: Any, where: str = "geometry") -> ScanGeometry:
    doc: GeometryDoc = _validate(GeometryDoc, data, where)
    try:
        return doc.to_geometry()
    except InputError as exc:  # a rule of ScanGeometry itself
        raise InputError(f"{where}.{exc.field}", exc.value, exc.problem) from None


# --- Capabilities -------------------------------------------------------------------------


class CapabilitiesDoc(Doc):
    """Document form of :class:`~stemagent.types.Capabilities`."""

    name: str = Field(max_length=256)
    max_fov_A: float = Field(gt=0)
    max_shape_px: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
    min_dwell_s: float = Field(gt=0)
    max_dwell_s: float = Field(gt=0)
    max_park_s: float | None = Field(None, gt=0)
    can_park: bool = True
    detectors: tuple[str, ...] = ("HAADF",)
    beam_energy_keV: float = Field(60.0, gt=0)
    beam_current_pA: float = Field(20.0, ge=0)
    probe_fwhm_A: float | None = Field(None, gt=0)


def encode_capabilities(c: Capabilities) -> dict[str, Any]:
    return CapabilitiesDoc(
        name=c.name,
        max_fov_A=float(c.max_fov_A),
        max_shape_px=(int(c.max_shape_px[0]), int(c.max_shape_px[1])),
        min_dwell_s=float(c.min_dwell_s),
        max_dwell_s=float(c.max_dwell_s),
        max_park_s=None if c.max_park_s is None else float(c.max_park_s),
        can_park=bool(c.can_park),
        detectors=tuple(str(d) for d in c.detectors),
        beam_energy_keV=float(c.beam_energy_keV),
        beam_current_pA=float(c.beam_current_pA),
        probe_fwhm_A=None if c.probe_fwhm_A is None else float(c.probe_fwhm_A),
    ).model_dump(mode="json", exclude={"max_park_s"} if c.max_park_s is None else set())


def decode_capabilities(data: Any, where: str = "capabilities") -> Capabilities:
    d = _validate(CapabilitiesDoc, data, where)
    return Capabilities(
        name=d.name,
        max_fov_A=d.max_fov_A,
        max_shape_px=(int(d.max_shape_px[0]), int(d.max_shape_px[1])),
        min_dwell_s=d.min_dwell_s,
        max_dwell_s=d.max_dwell_s,
        max_park_s=d.max_park_s,
        can_park=d.can_park,
        detectors=tuple(d.detectors),
        beam_energy_keV=d.beam_energy_keV,
        beam_current_pA=d.beam_current_pA,
        probe_fwhm_A=d.probe_fwhm_A,
    )


# --- ParkResult ---------------------------------------------------------------------------


class ParkResultDoc(Doc):
    """Document form of :class:`~stemagent.types.ParkResult` without its signal (which travels as
    an array: a raw wire part, or a list in the run log)."""

    position_A: tuple[Coordinate, Coordinate]
    dwell_s: float = Field(gt=0)
    start_time_s: float
    sample_interval_s: float = Field(gt=0)
    dose_e_per_A2: float = Field(0.0, ge=0)


def encode_park_result(p: ParkResult) -> tuple[dict[str, Any], np.ndarray]:
    """``(fields, signal)``: the document and the 1-D signal (float or integer dtype kept)."""
    fields = ParkResultDoc(
        position_A=(float(p.position_A[0]), float(p.position_A[1])),
        dwell_s=float(p.dwell_s),
        start_time_s=float(p.start_time_s),
        sample_interval_s=float(p.sample_interval_s),
        dose_e_per_A2=float(p.dose_e_per_A2),
    ).model_dump(mode="json")
    sig = np.asarray(p.signal)
    if sig.dtype.kind not in "fiu":
        sig = sig.astype(np.float64)
    return fields, sig.reshape(-1)


def decode_park_result(data: Any, signal: Any, where: str = "park", *, besides: tuple[str, ...] = ()) -> ParkResult:
    """A park result from its document and its signal. ``besides``: other fields the document may
    carry (a run log's park event also holds the prediction and the signal), left out."""
    if isinstance(data, dict) and besides:
        data = {k: v for k, v in data.items() if k not in besides}
    d = _validate(ParkResultDoc, data, where)
    sig = np.asarray(signal, dtype=np.float64)
    if sig.ndim != 1:
        raise InputError(f"{where}.signal", sig.shape, "must be one-dimensional (one value per sample)")
    if not np.all(np.isfinite(sig)):
        raise InputError(f"{where}.signal", "non-finite values", "must be finite")
    return ParkResult(
        position_A=(float(d.position_A[0]), float(d.position_A[1])),
        dwell_s=d.dwell_s,
        start_time_s=d.start_time_s,
        sample_interval_s=d.sample_interval_s,
        signal=sig,
        dose_e_per_A2=d.dose_e_per_A2,
    )


# --- commands and decisions ---------------------------------------------------------------


def encode_command(cmd: BeamCommand) -> dict[str, Any]:
    if isinstance(cmd, ScanRegion):
        return {"kind": "scan", "geometry": encode_geometry(cmd.geometry)}
    if isinstance(cmd, Park):
        return {"kind": "park", "position_A": [float(v) for v in cmd.position_A], "dwell_s": float(cmd.dwell_s)}
    return {"kind": "blank"}


def decode_command(data: Any, where: str = "command") -> BeamCommand:
    """Rebuild a command from :func:`encode_command` output; unknown kinds raise :class:`InputError`."""
    if not isinstance(data, dict):
        raise InputError(where, type(data).__name__, "must be a mapping")
    kind = data.get("kind")
    if kind == "scan":
        return ScanRegion(decode_geometry(data.get("geometry"), f"{where}.geometry"))
    if kind == "park":
        pos = data.get("position_A")
        if not (isinstance(pos, (list, tuple)) and len(pos) == 2):
            raise InputError(f"{where}.position_A", pos, "must be two coordinates in Å")
        try:
            return Park(position_A=(float(pos[0]), float(pos[1])), dwell_s=float(data.get("dwell_s", float("nan"))))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise InputError(f"{where}.{exc.field}", exc.value, exc.problem) from None
            raise InputError(where, data, f"is not a park command ({exc})") from None
    if kind == "blank":
        return Blank()
    raise InputError(f"{where}.kind", kind, "must be one of 'scan', 'park', 'blank'")


def encode_decision(decision: Decision) -> dict[str, Any]:
    """The decision's document; ``details`` (a policy's JSON-able record of how it chose) only when given."""
    doc: dict[str, Any] = {
        "command": encode_command(decision.command),
        "policy": decision.policy,
        "reason": decision.reason,
        "scores": {k: float(v) for k, v in decision.scores.items()},
    }
    if decision.details is not None:
        doc["details"] = decision.details
    return doc


def decode_decision(data: Any, where: str = "decision") -> Decision:
    """A :class:`Decision` from :func:`encode_decision` output (a run log's decision event also
    carries ``frame_index`` and ``observation``, which are not part of it)."""
    if not isinstance(data, dict):
        raise InputError(where, type(data).__name__, "must be a mapping")
    scores = data.get("scores") or {}
    if not isinstance(scores, dict):
        raise InputError(f"{where}.scores", scores, "must be a mapping of names to numbers")
    details = data.get("details")
    if details is not None and not isinstance(details, dict):
        raise InputError(f"{where}.details", type(details).__name__, "must be a mapping (or absent)")
    return Decision(command=decode_command(data.get("command"), f"{where}.command"), policy=str(data.get("policy", "")),
                    reason=str(data.get("reason", "")), scores={str(k): float(v) for k, v in scores.items()},
                    details=details)


# --- atoms ----------------------------------------------------------------------------------


def encode_atoms(atoms: Atoms) -> dict[str, Any]:
    """The run log's ``atoms`` document (optional per-atom arrays as empty lists when absent)."""
    return {
        "frame_index": int(atoms.frame_index),
        "positions_A": atoms.positions_A.tolist(),
        "classes": atoms.classes.tolist(),
        "confidence": atoms.confidence.tolist(),
        "class_names": list(atoms.class_names),
        "uncertainty_A": [] if atoms.uncertainty_A is None else atoms.uncertainty_A.tolist(),
        "times_s": [] if atoms.times_s is None else atoms.times_s.tolist(),
        "evidence_nats": [] if atoms.evidence_nats is None else atoms.evidence_nats.tolist(),
        "n_atoms": len(atoms),
    }


def decode_atoms(data: Any, where: str = "atoms") -> Atoms:
    """:class:`~stemagent.types.Atoms` from :func:`encode_atoms` output (an optional array that is
    empty, or of another length, is absent)."""
    if not isinstance(data, dict):
        raise InputError(where, type(data).__name__, "must be a mapping")
    try:
        n = int(data["n_atoms"])

        def optional(key: str) -> np.ndarray | None:
            v = np.asarray(data.get(key, []), dtype=np.float64)
            return v if len(v) == n and n else None

        return Atoms(
            positions_A=np.asarray(data["positions_A"], dtype=np.float64).reshape(-1, 2),
            classes=np.asarray(data["classes"], dtype=np.int64),
            confidence=np.asarray(data["confidence"], dtype=np.float64),
            frame_index=int(data["frame_index"]),
            class_names=tuple(str(c) for c in data["class_names"]),
            uncertainty_A=optional("uncertainty_A"),
            times_s=optional("times_s"),
            evidence_nats=optional("evidence_nats"),
        )
    except KeyError as exc:
        raise InputError(f"{where}.{exc.args[0]}", "<missing>", "is required") from None
    except InputError as exc:
        raise InputError(f"{where}.{exc.field}", exc.value, exc.problem) from None
    except (TypeError, ValueError) as exc:
        raise InputError(where, str(data)[:60], f"is not an atoms document ({exc})") from None


# --- frame metadata -----------------------------------------------------------------------


class FrameMetaDoc(Doc):
    """Everything of a :class:`~stemagent.types.Frame` but its pixels: the wire's frame header and
    the run log's ``frames`` event carry these fields (the log names the index ``frame_index``)."""

    index: int = Field(ge=0)
    geometry: GeometryDoc
    line_times_s: list[float]
    dose_e_per_A2: float = Field(ge=0)
    source: str = Field("unknown", max_length=256)
    detector: str = Field("HAADF", max_length=64)
    meta: dict[str, Any] = Field(default_factory=dict)


def json_safe(meta: dict[str, Any]) -> dict[str, Any]:
    """Keep only the metadata entries that survive a JSON round trip (numbers, strings, small arrays)."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray) and v.size <= 64:
            v = v.tolist()
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError):
            continue
        out[str(k)] = v
    return out


def encode_frame_meta(frame: Frame) -> dict[str, Any]:
    """The frame's metadata document (its image is stored or sent on its own)."""
    return {
        "index": int(frame.index),
        "geometry": encode_geometry(frame.geometry),
        "line_times_s": [float(t) for t in frame.line_times_s],
        "dose_e_per_A2": float(frame.dose_e_per_A2),
        "source": str(frame.source)[:256],
        "detector": str(frame.detector)[:64],
        "meta": json_safe(frame.meta),
    }


def decode_frame_meta(data: Any, image: np.ndarray, where: str = "frame") -> Frame:
    """A :class:`Frame` from its metadata document and its image (kept as given)."""
    d = _validate(FrameMetaDoc, data, where)
    geometry = decode_geometry(d.geometry, f"{where}.geometry")
    try:
        return Frame(
            image=image,
            geometry=geometry,
            line_times_s=np.asarray(d.line_times_s, dtype=np.float64),
            index=d.index,
            dose_e_per_A2=d.dose_e_per_A2,
            source=d.source,
            detector=d.detector,
            meta=dict(d.meta),
        )
    except InputError as exc:
        raise InputError(f"{where}.{exc.field}", exc.value, exc.problem) from None
