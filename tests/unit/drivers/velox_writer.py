"""A minimal Thermo Fisher Velox EMD writer for tests: one image (or a stack) with its calibration.

The layout a Velox reader needs: a ``Version`` dataset (JSON, format ``Velox``), and under
``Data/Image/<uuid>/`` a ``Data`` dataset shaped ``(rows, cols, frames)`` and a ``Metadata``
dataset holding the JSON metadata as a column of bytes (``BinaryResult`` with ``PixelSize``,
``PixelUnitX``/``Y`` and ``Offset`` in metres; ``Scan`` with ``DwellTime`` and ``FrameTime``).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np


def write_velox(path: Path, images: np.ndarray, pixel_m: tuple[float, float], offset_m: tuple[float, float] = (0.0, 0.0),
                dwell_s: float = 2e-6) -> None:
    import h5py

    stack = np.asarray(images)
    if stack.ndim == 2:
        stack = stack[None]
    n, rows, cols = stack.shape
    md = {
        "BinaryResult": {
            "PixelSize": {"width": repr(pixel_m[0]), "height": repr(pixel_m[1])},
            "PixelUnitX": "m",
            "PixelUnitY": "m",
            "Offset": {"x": repr(offset_m[0]), "y": repr(offset_m[1])},
        },
        "Scan": {"DwellTime": repr(dwell_s), "FrameTime": repr(dwell_s * rows * cols)},
        "Acquisition": {},
        "CustomProperties": {},
    }
    raw = np.frombuffer(json.dumps(md).encode("utf-8"), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("Version", data=np.array([json.dumps({"format": "Velox", "version": "11"}).encode()]))
        g = f.create_group(f"Data/Image/{uuid.UUID(int=1).hex}")
        g.create_dataset("Data", data=np.moveaxis(stack, 0, -1))  # (rows, cols, frames)
        g.create_dataset("Metadata", data=raw[:, None])
