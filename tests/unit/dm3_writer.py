"""A minimal DigitalMicrograph 3 writer for tests: one calibrated 2-D image (float32).

Only what a DM3 reader needs: the tag-group tree (header and tag structure big-endian, data
little-endian), ``ImageList`` with one image (``ImageData``: ``Calibrations``, ``Data``,
``DataType``, ``Dimensions``, ``PixelDepth``), its ``Name`` and optional ``ImageTags``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

_SIMPLE = {"l": 3, "f": 6, "d": 7}  # DM encoded types: long, float, double


def _name(name: str) -> bytes:
    raw = name.encode("latin-1")
    return struct.pack(">h", len(raw)) + raw


def _data_tag(name: str, info: list[int], payload: bytes) -> bytes:
    return b"\x15" + _name(name) + b"%%%%" + struct.pack(">l", len(info)) + struct.pack(f">{len(info)}l", *info) + payload


def _value(name: str, v: Any) -> bytes:
    if isinstance(v, str):  # DM stores strings as arrays of uint16 characters
        return _data_tag(name, [20, 4, len(v)], v.encode("utf-16-le"))
    if isinstance(v, np.ndarray):
        return _data_tag(name, [20, 6, v.size], np.ascontiguousarray(v, dtype="<f4").tobytes())
    if isinstance(v, int):
        return _data_tag(name, [_SIMPLE["l"]], struct.pack("<l", v))
    return _data_tag(name, [_SIMPLE["d"]], struct.pack("<d", float(v)))


def _group(name: str, entries: list[tuple[str, Any]]) -> bytes:
    return b"\x14" + _name(name) + _group_body(entries)


def _group_body(entries: list[tuple[str, Any]]) -> bytes:
    body = b"\x00\x00" + struct.pack(">l", len(entries))
    for key, v in entries:
        body += _group(key, v) if isinstance(v, list) else _value(key, v)
    return body


def write_dm3(path: Path, image: np.ndarray, scale: tuple[float, float], units: str = "nm",
              offset: tuple[float, float] = (0.0, 0.0), image_tags: list[tuple[str, Any]] | None = None) -> None:
    """``scale``/``offset`` are (x, y) in ``units``; ``image`` is (rows, cols)."""
    rows, cols = image.shape
    dims = [("", [("Origin", -offset[i] / scale[i]), ("Scale", scale[i]), ("Units", units)]) for i in (0, 1)]
    image_data = [
        ("Calibrations", [("Brightness", [("Origin", 0.0), ("Scale", 1.0), ("Units", "counts")]), ("Dimension", dims)]),
        ("Data", np.asarray(image, dtype=np.float32).ravel()),
        ("DataType", 2),
        ("Dimensions", [("", cols), ("", rows)]),
        ("PixelDepth", 4),
    ]
    entry = [("ImageData", image_data), ("ImageTags", image_tags or []), ("Name", "HAADF")]
    tree = _group_body([("ImageList", [("", entry)])])
    header = struct.pack(">lll", 3, 12 + len(tree), 1)
    path.write_bytes(header + tree)
