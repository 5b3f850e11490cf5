"""The stemagent wire protocol, version 1 (see ``drivers/PROTOCOL.md``).

Two ZeroMQ channels connect a console-side bridge to the agent's client driver:

- **control** (client DEALER -> bridge ROUTER): one JSON request per message, one reply per
  request, matched by request id. Replies may carry raw array parts after the JSON.
- **frames** (bridge PUB -> client SUB): multipart ``[header JSON, image bytes]``.

Everything arriving from a socket is validated here before anything else sees it: a message
that is malformed, truncated, oversized or of another protocol version raises
:class:`WireError` naming the field, and is never interpreted further. Nothing is pickled.

Core types are encoded by their one codec (:mod:`stemagent.codec`): a frame header is the
frame's metadata document plus the wire's own fields, a park reply the park result's document
plus its signal as a raw part, a capabilities reply the capabilities document.

This module imports only numpy, pydantic and the stemagent core types, so the bridge can run
inside a vendor's Python environment.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from stemagent.codec import (
    Coordinate,
    FrameMetaDoc,
    GeometryDoc,
    decode_capabilities,
    decode_frame_meta,
    decode_geometry,
    decode_park_result,
    encode_frame_meta,
    encode_park_result,
)
from stemagent.errors import InputError
from stemagent.types import Capabilities, Frame, ParkResult, ScanGeometry

PROTOCOL_VERSION = 2  # 2: requests carry "client"; "Refused" errors; bounded geometry; capabilities.probe_fwhm_A

#: Largest JSON part (request, reply or frame header) a peer accepts, bytes.
MAX_JSON_BYTES = 1 << 20
#: Default largest array part accepted, bytes (an 8192 x 8192 float32 frame).
DEFAULT_MAX_ARRAY_BYTES = 8192 * 8192 * 4
#: Arrays at least this large are sent without copying them into ZeroMQ (``copy=False``).
ZERO_COPY_THRESHOLD_BYTES = 64 * 1024

#: dtypes allowed on the wire, always spelled with explicit byte order.
ALLOWED_DTYPES = ("<f4", "<f8", "<u1", "<u2", "<u4", "<i2", "<i4")


class WireError(InputError):
    """A message that violates the protocol; carries the field and the offending value."""


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _finite(v: float, name: str) -> float:
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite")
    return v


#: the wire form of :class:`~stemagent.types.ScanGeometry` is its one codec's document
GeometryModel = GeometryDoc


# --- control requests ---------------------------------------------------------------------

RequestId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


class _Request(_Msg):
    v: Literal[2]
    id: RequestId
    #: who sends it (the client's session); the bridge gives the beam to one client at a time
    client: RequestId | None = None


class HeartbeatRequest(_Request):
    op: Literal["heartbeat"]


class StatusRequest(_Request):
    op: Literal["status"]


class CapabilitiesRequest(_Request):
    op: Literal["capabilities"]


class BlankRequest(_Request):
    op: Literal["blank"]


class AcquireRequest(_Request):
    op: Literal["acquire"]
    geometry: GeometryModel


class ParkRequest(_Request):
    op: Literal["park"]
    position_A: tuple[Coordinate, Coordinate]
    dwell_s: float = Field(gt=0, le=3600.0)

    @field_validator("position_A")
    @classmethod
    def _pos(cls, v: tuple[float, float]) -> tuple[float, float]:
        return (_finite(v[0], "position_A"), _finite(v[1], "position_A"))


class StreamStartRequest(_Request):
    op: Literal["stream_start"]
    stream: RequestId
    geometry: GeometryModel
    n_frames: Annotated[int, Field(ge=1)] | None = None


class StreamStopRequest(_Request):
    op: Literal["stream_stop"]
    stream: RequestId


Request = Annotated[
    Union[
        HeartbeatRequest,
        StatusRequest,
        CapabilitiesRequest,
        BlankRequest,
        AcquireRequest,
        ParkRequest,
        StreamStartRequest,
        StreamStopRequest,
    ],
    Field(discriminator="op"),
]
_request_adapter: TypeAdapter[Any] = TypeAdapter(Request)


# --- replies ------------------------------------------------------------------------------


class ArraySpec(_Msg):
    """Describes one raw array part that follows a JSON part."""

    dtype: Literal["<f4", "<f8", "<u1", "<u2", "<u4", "<i2", "<i4"]
    shape: tuple[Annotated[int, Field(ge=0, le=1 << 28)], ...] = Field(max_length=4)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class ErrorInfo(_Msg):
    type: str = Field(max_length=64)
    message: str = Field(max_length=4096)


class Reply(_Msg):
    """Reply to the request with the same ``id``. ``ok=False`` carries ``error``.

    ``arrays`` lists raw parts that follow this JSON part in the same message, in order.
    """

    v: Literal[2]
    id: RequestId
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    arrays: tuple[ArraySpec, ...] = Field(default=(), max_length=4)


# --- frames -------------------------------------------------------------------------------


class FrameHeader(FrameMetaDoc):
    """The JSON part in front of every frame's pixel buffer: the frame's metadata document
    (:class:`~stemagent.codec.FrameMetaDoc`) plus the wire's version, stream, shape and dtype."""

    v: Literal[2]
    kind: Literal["frame"] = "frame"
    stream: str = Field("", max_length=64)
    shape: tuple[Annotated[int, Field(ge=1, le=16384)], Annotated[int, Field(ge=1, le=16384)]]
    dtype: Literal["<f4", "<f8", "<u1", "<u2", "<u4", "<i2", "<i4"]

    @field_validator("line_times_s")
    @classmethod
    def _times(cls, v: list[float]) -> list[float]:
        if not all(math.isfinite(t) for t in v):
            raise ValueError("line times must be finite")
        return v

    @field_validator("dose_e_per_A2")
    @classmethod
    def _dose(cls, v: float) -> float:
        return _finite(v, "dose_e_per_A2")

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * np.dtype(self.dtype).itemsize


# --- helpers ------------------------------------------------------------------------------


def _as_bytes(part: Any) -> bytes | memoryview:
    """Accept bytes, a zmq.Frame (``.buffer``) or anything with a contiguous buffer."""
    buf = getattr(part, "buffer", None)
    if isinstance(buf, memoryview):
        return buf
    if isinstance(part, bytes):
        return part
    try:
        view = memoryview(part)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError):
        raise WireError("part", type(part).__name__, "must be bytes or a ZeroMQ frame") from None


def _load_json(part: Any, what: str) -> Any:
    raw = _as_bytes(part)
    if len(raw) > MAX_JSON_BYTES:
        raise WireError(what, f"<{len(raw)} bytes>", f"is larger than the {MAX_JSON_BYTES}-byte limit")
    try:
        return json.loads(bytes(raw))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting bombs
        raise WireError(what, bytes(raw[:40]), f"is not valid JSON ({exc.__class__.__name__})") from None


def _validation_error(what: str, data: Any, exc: ValidationError) -> WireError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    return WireError(f"{what}.{loc}" if loc else what, err.get("input", data), err.get("msg", "is invalid"))


def _check_version(data: Any, what: str) -> None:
    if not isinstance(data, dict):
        raise WireError(what, type(data).__name__, "must be a JSON object")
    v = data.get("v", "<missing>")
    if v != PROTOCOL_VERSION:
        raise WireError(f"{what}.v", v, f"unsupported protocol version (this side speaks {PROTOCOL_VERSION})")


def dumps(model: BaseModel) -> bytes:
    return model.model_dump_json().encode("utf-8")


def wire_dtype(dtype: Any) -> str:
    """The wire spelling (explicit little-endian) of a numpy dtype, or :class:`WireError`."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise WireError("dtype", str(dtype), "is not a numpy dtype") from None
    s = "<" + dt.str[1:]
    if s not in ALLOWED_DTYPES:
        raise WireError("dtype", str(dt), f"is not one of the wire dtypes {ALLOWED_DTYPES}")
    return s


def array_part(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """A C-contiguous little-endian array ready to send, and whether to send it zero-copy."""
    dt = wire_dtype(a.dtype)
    out = np.ascontiguousarray(a, dtype=np.dtype(dt))
    return out, out.nbytes >= ZERO_COPY_THRESHOLD_BYTES


def _array_from(part: Any, spec_dtype: str, shape: Sequence[int], what: str, max_bytes: int) -> np.ndarray:
    raw = _as_bytes(part)
    expected = math.prod(int(n) for n in shape) * np.dtype(spec_dtype).itemsize
    if expected > max_bytes:
        raise WireError(f"{what}.shape", tuple(shape), f"needs {expected} bytes, above the {max_bytes}-byte limit")
    if len(raw) != expected:
        raise WireError(what, f"<{len(raw)} bytes>", f"must be exactly {expected} bytes for shape {tuple(shape)} {spec_dtype}")
    return np.frombuffer(raw, dtype=np.dtype(spec_dtype)).reshape(tuple(shape))


# --- requests -----------------------------------------------------------------------------


def encode_request(req: BaseModel) -> list[bytes]:
    return [dumps(req)]


def decode_request(parts: Sequence[Any]) -> Any:
    """Validate one request message (the parts after the ROUTER identity)."""
    if len(parts) != 1:
        raise WireError("request.parts", len(parts), "a request must be exactly one JSON part")
    data = _load_json(parts[0], "request")
    _check_version(data, "request")
    try:
        return _request_adapter.validate_python(data)
    except ValidationError as exc:
        raise _validation_error("request", data, exc) from None


def request_id_of(parts: Sequence[Any]) -> str | None:
    """Best-effort id of a rejected request, so the bridge can still answer it."""
    try:
        data = _load_json(parts[0], "request") if len(parts) == 1 else None
    except WireError:
        return None
    rid = data.get("id") if isinstance(data, dict) else None
    try:
        return RequestIdAdapter.validate_python(rid)
    except ValidationError:
        return None


RequestIdAdapter: TypeAdapter[str] = TypeAdapter(RequestId)


# --- replies ------------------------------------------------------------------------------


def encode_reply(
    rid: str,
    ok: bool,
    result: dict[str, Any] | None = None,
    error: tuple[str, str] | None = None,
    arrays: Sequence[np.ndarray] = (),
) -> tuple[list[Any], list[bool]]:
    """Parts of a reply and, per part, whether it may be sent without copying."""
    prepared = [array_part(a) for a in arrays]
    specs = tuple(ArraySpec(dtype=wire_dtype(a.dtype), shape=a.shape) for a, _ in prepared)
    err = ErrorInfo(type=error[0][:64], message=error[1][:4096]) if error else None
    reply = Reply(v=PROTOCOL_VERSION, id=rid, ok=ok, result=result or {}, error=err, arrays=specs)
    parts: list[Any] = [dumps(reply)] + [a for a, _ in prepared]
    zero_copy = [False] + [z for _, z in prepared]
    return parts, zero_copy


def decode_reply(parts: Sequence[Any], max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES) -> tuple[Reply, list[np.ndarray]]:
    if not parts:
        raise WireError("reply.parts", 0, "a reply needs at least one JSON part")
    data = _load_json(parts[0], "reply")
    _check_version(data, "reply")
    try:
        reply = Reply.model_validate(data)
    except ValidationError as exc:
        raise _validation_error("reply", data, exc) from None
    if len(parts) != 1 + len(reply.arrays):
        raise WireError("reply.parts", len(parts), f"must be 1 + {len(reply.arrays)} (the arrays the reply lists)")
    arrays = [
        _array_from(p, s.dtype, s.shape, f"reply.arrays[{i}]", max_array_bytes)
        for i, (p, s) in enumerate(zip(parts[1:], reply.arrays))
    ]
    return reply, arrays


# --- frames -------------------------------------------------------------------------------


def frame_header(frame: Frame, stream: str = "") -> tuple[FrameHeader, np.ndarray, bool]:
    image, zero_copy = array_part(np.asarray(frame.image))
    header = FrameHeader.model_validate(
        {**encode_frame_meta(frame), "v": PROTOCOL_VERSION, "stream": stream, "shape": image.shape,
         "dtype": wire_dtype(image.dtype)}
    )
    return header, image, zero_copy


def encode_frame(frame: Frame, stream: str = "") -> tuple[list[Any], list[bool]]:
    """``[header JSON, image]`` and whether each part may go zero-copy."""
    header, image, zero_copy = frame_header(frame, stream)
    return [dumps(header), image], [False, zero_copy]


def decode_frame_header(part: Any) -> FrameHeader:
    data = _load_json(part, "frame.header")
    _check_version(data, "frame.header")
    try:
        return FrameHeader.model_validate(data)
    except ValidationError as exc:
        raise _validation_error("frame.header", data, exc) from None


def decode_frame(parts: Sequence[Any], max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES) -> tuple[FrameHeader, Frame]:
    """Validate ``[header, image]`` and rebuild the :class:`Frame` (image as float32)."""
    if len(parts) != 2:
        raise WireError("frame.parts", len(parts), "a frame message must be [header, image]")
    header = decode_frame_header(parts[0])
    _check_header(header)
    image = _array_from(parts[1], header.dtype, header.shape, "frame.image", max_array_bytes)
    return header, build_frame(header, image)


def frame_header_from_dict(data: Any) -> FrameHeader:
    """Validate a frame header that arrived inside a reply's ``result``."""
    _check_version(data, "frame.header")
    try:
        header = FrameHeader.model_validate(data)
    except ValidationError as exc:
        raise _validation_error("frame.header", data, exc) from None
    _check_header(header)
    return header


def _check_header(header: FrameHeader) -> None:
    if tuple(header.shape) != tuple(header.geometry.shape_px):
        raise WireError("frame.header.shape", header.shape, f"must equal geometry.shape_px {header.geometry.shape_px}")
    if len(header.line_times_s) != header.shape[0]:
        raise WireError("frame.header.line_times_s", len(header.line_times_s), f"must hold {header.shape[0]} line times")


def build_frame(header: FrameHeader, image: np.ndarray) -> Frame:
    """The :class:`Frame` described by a validated header; ``image`` must match its shape and dtype."""
    if tuple(image.shape) != tuple(header.shape) or image.dtype != np.dtype(header.dtype):
        raise WireError("frame.image", f"{image.dtype}{tuple(image.shape)}", f"must be {header.dtype}{tuple(header.shape)}")
    if image.dtype != np.float32:
        image = image.astype(np.float32)
    meta = header.model_dump(include=set(FrameMetaDoc.model_fields))
    try:
        return decode_frame_meta(meta, image, "frame.header")
    except InputError as exc:
        field = exc.field.replace("frame.header.image", "frame.image", 1)
        raise WireError(field, exc.value, exc.problem) from None


def geometry_from_wire(model: GeometryDoc) -> ScanGeometry:
    try:
        return decode_geometry(model, "geometry")
    except InputError as exc:
        raise WireError(exc.field, exc.value, exc.problem) from None


# --- park and capabilities ----------------------------------------------------------------


def park_result_fields(p: ParkResult) -> tuple[dict[str, Any], np.ndarray]:
    """A park reply's ``result`` and its signal part (the park result's codec)."""
    return encode_park_result(p)


def park_result_from(reply: Reply, arrays: list[np.ndarray]) -> ParkResult:
    if len(arrays) != 1 or arrays[0].ndim != 1:
        raise WireError("reply.arrays", len(arrays), "a park reply carries one 1-D signal array")
    try:
        return decode_park_result(reply.result, arrays[0], "reply.result")
    except InputError as exc:
        raise WireError(exc.field, exc.value, exc.problem) from None


def capabilities_from(result: dict[str, Any]) -> Capabilities:
    try:
        return decode_capabilities(result, "reply.result")
    except InputError as exc:
        raise WireError(exc.field, exc.value, exc.problem) from None


# --- stream control messages on the frame channel ------------------------------------------


class StreamEnd(_Msg):
    """Single-part message on the frame channel: a stream finished (``error`` set if it failed)."""

    v: Literal[2]
    kind: Literal["stream_end"] = "stream_end"
    stream: RequestId
    frames: int = Field(ge=0)
    error: ErrorInfo | None = None


def encode_stream_end(stream: str, frames: int, error: tuple[str, str] | None = None) -> list[bytes]:
    err = ErrorInfo(type=error[0][:64], message=error[1][:4096]) if error else None
    return [dumps(StreamEnd(v=PROTOCOL_VERSION, stream=stream, frames=frames, error=err))]


def decode_stream_message(
    parts: Sequence[Any], max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES
) -> tuple[FrameHeader, Frame] | StreamEnd:
    """A message from the frame channel: a frame, or the end of a stream."""
    if len(parts) == 1:
        data = _load_json(parts[0], "stream_end")
        _check_version(data, "stream_end")
        try:
            return StreamEnd.model_validate(data)
        except ValidationError as exc:
            raise _validation_error("stream_end", data, exc) from None
    return decode_frame(parts, max_array_bytes)
