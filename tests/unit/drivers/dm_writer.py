"""A minimal DigitalMicrograph writer for tests (DM3 or DM4): one calibrated 2-D float32 image.

Only what a DM reader needs: the tag-group tree (header and tag structure big-endian, data
little-endian), ``ImageList`` with one image (``ImageData``: ``Calibrations``, ``Data``,
``DataType``, ``Dimensions``, ``PixelDepth``), its ``Name`` and optional ``ImageTags``.
DM4 differs from DM3 in 8-byte lengths and counts and in a size field before each tag's body.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np


class _Encoder:
    def __init__(self, version: int) -> None:
        if version not in (3, 4):
            raise ValueError(f"version={version!r}: DM3 or DM4 only")
        self.v = version

    def n(self, value: int) -> bytes:  # lengths, counts and info words
        return struct.pack(">q" if self.v == 4 else ">l", value)

    @staticmethod
    def name(name: str) -> bytes:
        raw = name.encode("latin-1")
        return struct.pack(">h", len(raw)) + raw

    def data_tag(self, name: str, info: list[int], payload: bytes) -> bytes:
        body = b"%%%%" + self.n(len(info)) + b"".join(self.n(i) for i in info) + payload
        size = self.n(len(body)) if self.v == 4 else b""
        return b"\x15" + self.name(name) + size + body

    def value(self, name: str, v: Any) -> bytes:
        if isinstance(v, str):  # DM stores strings as arrays of uint16 characters
            return self.data_tag(name, [20, 4, len(v)], v.encode("utf-16-le"))
        if isinstance(v, np.ndarray):
            return self.data_tag(name, [20, 6, v.size], np.ascontiguousarray(v, dtype="<f4").tobytes())
        if isinstance(v, int):
            return self.data_tag(name, [3], struct.pack("<l", v))  # long
        return self.data_tag(name, [7], struct.pack("<d", float(v)))  # double

    def group(self, name: str, entries: list[tuple[str, Any]]) -> bytes:
        body = self.group_body(entries, sized=True)
        return b"\x14" + self.name(name) + body

    def group_body(self, entries: list[tuple[str, Any]], sized: bool = False) -> bytes:
        inner = b"".join(self.group(k, v) if isinstance(v, list) else self.value(k, v) for k, v in entries)
        head = b"\x00\x00"
        if sized and self.v == 4:
            head += self.n(len(inner) + 8)
        return head + self.n(len(entries)) + inner


def write_dm(path: Path, image: np.ndarray, scale: tuple[float, float], units: str = "nm",
             offset: tuple[float, float] = (0.0, 0.0), image_tags: list[tuple[str, Any]] | None = None,
             version: int = 3) -> None:
    """``scale``/``offset`` are (x, y) in ``units``; ``image`` is (rows, cols)."""
    enc = _Encoder(version)
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
    tree = enc.group_body([("ImageList", [("", entry)])])
    header = struct.pack(">l", version) + enc.n(4 + 2 * len(enc.n(0)) + len(tree)) + struct.pack(">l", 1)
    path.write_bytes(header + tree + (b"\x00" * 8 if version == 4 else b""))


def write_dm3(path: Path, image: np.ndarray, scale: tuple[float, float], **kw: Any) -> None:
    write_dm(path, image, scale, version=3, **kw)
