"""The run log's frame store: a Zarr v3 group laid out as HyperSpy's ``zspy`` format.

::

    frames.zarr/                      attrs: file_format "ZSpy", file_format_version "3.3"
      Experiments/<key>/              one stack per frame shape and pixel size, key "<rows>x<cols>_<px>A"
        data                          (n_frames, rows, cols) float32, one chunk per frame,
                                      dimension_names ("frame", "y", "x"), attrs units "counts"
        axis-0, axis-1, axis-2        HyperSpy axes: frame | y, x in Å (scale = pixel size, centred on 0)
        x, y                          coordinate arrays in Å (for xarray), attrs units "Å"
        metadata/General, metadata/Signal, original_metadata

so ``rsciio.zspy.file_reader("<run>/frames.zarr")`` (``hyperspy.api.load(..., reader="zspy")``)
returns one calibrated image stack per key, and ``xarray.open_zarr`` on an experiment group
gives ``data`` with ``frame``/``y``/``x`` dimensions. Positions are relative to each frame's
centre; the centre, rotation, line times and dose of each frame are in the ``frames`` events of
``documents.jsonl`` (stack position = ``datum_kwargs.index``).

Each append writes the frame's chunk, then the array's and the frame axis's metadata, every
file to a temporary name renamed into place (Zarr's local store), so a killed writer leaves every
file whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

ZSPY_VERSION = "3.3"


def stack_key(shape: tuple[int, int], pixel_size_A: tuple[float, float]) -> str:
    rows, cols = shape
    px, py = pixel_size_A
    size = f"{px:.6g}A" if np.isclose(px, py, rtol=1e-9, atol=0) else f"{px:.6g}x{py:.6g}A"
    return f"{rows}x{cols}_{size}"


class FrameStore:
    """Appends frames to stacks; :meth:`append` returns (resource path, index in the stack)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._root = zarr.open_group(str(path), mode="w", zarr_format=3)
        self._root.attrs.update({"file_format": "ZSpy", "file_format_version": ZSPY_VERSION, "writer": "stemagent"})
        self._experiments = self._root.create_group("Experiments")
        self._stacks: dict[str, tuple[Any, Any]] = {}  # key -> (data array, frame axis group)

    def _create(self, key: str, rows: int, cols: int, px: float, py: float, detector: str) -> tuple[Any, Any]:
        g = self._experiments.create_group(key)
        g.attrs.update({"package": "", "package_version": ""})
        data = g.create_array(
            "data",
            shape=(0, rows, cols),
            chunks=(1, rows, cols),
            dtype="float32",
            fill_value=float("nan"),
            dimension_names=("frame", "y", "x"),
            # lz4 with byte shuffle: ~3x faster than zarr's default zstd, and detector
            # counts stored as float32 still shrink about 4x (benchmarks/bench_runlog.py)
            compressors=BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"),
        )
        data.attrs.update({"units": "counts", "long_name": detector})
        frame_axis = g.create_group("axis-0")
        frame_axis.attrs.update({"name": "frame", "units": "", "scale": 1.0, "offset": 0.0, "size": 0,
                                 "navigate": True, "index_in_array": 0})
        for i, (name, n, step) in enumerate((("y", rows, py), ("x", cols, px)), start=1):
            offset = -0.5 * (n - 1) * step
            g.create_group(f"axis-{i}").attrs.update(
                {"name": name, "units": "Å", "scale": float(step), "offset": float(offset), "size": int(n),
                 "navigate": False, "index_in_array": i}
            )
            coord = g.create_array(name, shape=(n,), dtype="float64", dimension_names=(name,))
            coord[:] = offset + np.arange(n) * step
            coord.attrs.update({"units": "Å", "long_name": f"{name} from the frame centre"})
        md = g.create_group("metadata")
        md.create_group("General").attrs.update({"title": key})
        md.create_group("Signal").attrs.update({"signal_type": "", "quantity": f"{detector} (counts)"})
        g.create_group("original_metadata").attrs.update({"source": "stemagent run log"})
        return data, frame_axis

    def append(self, image: np.ndarray, pixel_size_A: tuple[float, float], detector: str) -> tuple[str, int, bool]:
        """Store ``image`` (rows, cols float32); returns (resource path, index, whether the stack is new)."""
        rows, cols = image.shape
        key = stack_key((rows, cols), pixel_size_A)
        new = key not in self._stacks
        if new:
            self._stacks[key] = self._create(key, rows, cols, float(pixel_size_A[0]), float(pixel_size_A[1]), detector)
        data, frame_axis = self._stacks[key]
        index = data.shape[0]
        data.append(image[None])
        frame_axis.attrs.update({"size": index + 1})
        return f"{self.path.name}/Experiments/{key}/data", index, new
