"""The wire protocol rejects anything malformed with a WireError, and round-trips valid messages."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stemagent.drivers import wire
from stemagent.types import Frame, ScanGeometry

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_frame(rows: int = 4, cols: int = 6, dtype: Any = np.float32) -> Frame:
    g = ScanGeometry(center_A=(1.0, 2.0), fov_A=(6.0, 4.0), shape_px=(rows, cols), rotation_rad=0.1, dwell_s=2e-6)
    img = np.arange(rows * cols, dtype=dtype).reshape(rows, cols)
    return Frame(image=img, geometry=g, line_times_s=g.line_start_times_s(10.0), index=7, dose_e_per_A2=3.0,
                 source="test", meta={"a": 1, "arr": np.arange(3), "obj": object()})


def decoders() -> list[Any]:
    return [
        wire.decode_request,
        wire.decode_reply,
        wire.decode_frame,
        wire.decode_stream_message,
    ]


@SETTINGS
@given(parts=st.lists(st.binary(max_size=300), min_size=0, max_size=4))
def test_random_bytes_are_rejected_cleanly(parts: list[bytes]) -> None:
    for decode in decoders():
        try:
            decode(parts)
        except wire.WireError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
header_keys = ["v", "kind", "stream", "index", "shape", "dtype", "geometry", "line_times_s", "dose_e_per_A2",
               "source", "id", "op", "ok", "result", "error", "arrays", "position_A", "dwell_s", "n_frames", "frames"]


@st.composite
def mutated_headers(draw: st.DrawFn) -> dict[str, Any]:
    """A valid frame header with random fields replaced, added or removed."""
    header = json.loads(wire.encode_frame(make_frame())[0][0])
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(header_keys))
        if draw(st.booleans()) and key in header:
            del header[key]
        else:
            header[key] = draw(json_values)
    return header


@SETTINGS
@given(header=mutated_headers(), body=st.binary(max_size=200))
def test_random_headers_are_rejected_or_decode_to_valid_frames(header: dict[str, Any], body: bytes) -> None:
    raw = json.dumps(header).encode()
    for parts in ([raw, body], [raw]):
        for decode in decoders():
            try:
                out = decode(parts)
            except wire.WireError:
                continue
            if decode is wire.decode_frame:  # anything accepted is a consistent frame
                _, frame = out
                assert frame.image.shape == frame.geometry.shape_px


@SETTINGS
@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 20),
    dtype=st.sampled_from([np.float32, np.float64, np.uint16, np.int32, ">f4"]),
)
def test_frames_round_trip(rows: int, cols: int, dtype: Any) -> None:
    frame = make_frame(rows, cols, dtype)
    parts, _ = wire.encode_frame(frame, stream="s1")
    header, back = wire.decode_frame([bytes(p) if isinstance(p, bytes) else p.tobytes() for p in parts])
    assert header.stream == "s1" and header.v == wire.PROTOCOL_VERSION
    assert back.image.dtype == np.float32
    np.testing.assert_array_equal(back.image, np.asarray(frame.image, dtype=np.float32))
    np.testing.assert_array_equal(back.line_times_s, frame.line_times_s)
    assert back.geometry == frame.geometry and back.index == 7 and back.dose_e_per_A2 == 3.0
    assert back.meta == {"a": 1, "arr": [0, 1, 2]}  # what JSON cannot carry is left out


@SETTINGS
@given(cut=st.integers(0, 95))
def test_truncated_image_is_rejected(cut: int) -> None:
    parts, _ = wire.encode_frame(make_frame())
    image = parts[1].tobytes()
    with pytest.raises(wire.WireError, match="exactly 96 bytes"):
        wire.decode_frame([parts[0], image[:cut]])


def test_wrong_version_is_rejected() -> None:
    parts, _ = wire.encode_frame(make_frame())
    header = json.loads(parts[0])
    header["v"] = 1  # the previous version
    with pytest.raises(wire.WireError, match="unsupported protocol version"):
        wire.decode_frame([json.dumps(header).encode(), parts[1]])
    with pytest.raises(wire.WireError, match="version"):
        wire.decode_request([b'{"v": 0, "id": "x", "op": "heartbeat"}'])


def test_oversized_messages_are_rejected_before_allocation() -> None:
    parts, _ = wire.encode_frame(make_frame())
    with pytest.raises(wire.WireError, match="limit"):
        wire.decode_frame(parts, max_array_bytes=16)
    with pytest.raises(wire.WireError, match="limit"):
        wire.decode_request([b" " * (wire.MAX_JSON_BYTES + 1)])
    huge = {"v": 2, "id": "r", "ok": True, "arrays": [{"dtype": "<f8", "shape": [1 << 28, 1 << 28, 1 << 28, 1 << 28]}]}
    with pytest.raises(wire.WireError, match="limit"):
        wire.decode_reply([json.dumps(huge).encode(), b""])


def test_requests_validate_fields() -> None:
    ok = wire.decode_request([b'{"v": 2, "id": "a-1", "op": "park", "position_A": [1, 2], "dwell_s": 0.5}'])
    assert isinstance(ok, wire.ParkRequest) and ok.position_A == (1.0, 2.0)
    with pytest.raises(wire.WireError, match="request.park.dwell_s"):
        wire.decode_request([b'{"v": 2, "id": "a-1", "op": "park", "position_A": [1, 2], "dwell_s": -1}'])
    with pytest.raises(wire.WireError, match="request.heartbeat.extra"):
        wire.decode_request([b'{"v": 2, "id": "a-1", "op": "heartbeat", "extra": 1}'])
    assert wire.request_id_of([b'{"v": 7, "id": "keep-me"}']) == "keep-me"
    assert wire.request_id_of([b'{"id": "bad id with spaces"}']) is None


def test_disallowed_dtype_is_refused_on_send() -> None:
    with pytest.raises(wire.WireError, match="dtype"):
        wire.wire_dtype(np.complex64)


def test_nesting_bombs_are_rejected() -> None:
    bomb = b"[" * 100_000 + b"]" * 100_000
    for decode in decoders():
        with pytest.raises(wire.WireError, match="not valid JSON"):
            decode([bomb] if decode is not wire.decode_frame else [bomb, b""])


def test_mqtt_control_rejects_junk_without_a_broker() -> None:
    from stemagent.agent.telemetry import MqttTelemetry
    from stemagent.config import TelemetryConfig

    sink = MqttTelemetry(TelemetryConfig(host="127.0.0.1"), run_name="r", run_id="t")  # never connected: only validation
    for junk in (b"[" * 100_000, b"\xff\xfe", b"{}", b'{"command": "pause", "value": "x"}', b"1" * 70_000):
        ack = sink.handle_control(junk)
        assert ack.accepted is False
    assert sink.stats["control_rejected"] == 5 and len(sink._acks) == 5  # each one acknowledged


@SETTINGS
@given(payload=st.binary(max_size=300) | mutated_headers().map(lambda h: json.dumps(h).encode()))
def test_mqtt_control_never_raises_on_random_payloads(payload: bytes) -> None:
    from stemagent.agent.telemetry import MqttTelemetry
    from stemagent.config import TelemetryConfig

    sink = MqttTelemetry(TelemetryConfig(host="127.0.0.1"), run_name="r", run_id="t")
    ack = sink.handle_control(payload)
    assert ack.accepted is False and len(sink._acks) == 1
