"""Real acquisitions from other software, played back as a :class:`~stemagent.driver.Driver`.

Readers (all through RosettaSciIO, except Nion's, which is read directly):

| suffix | software | reader |
|---|---|---|
| ``.dm3``, ``.dm4`` | Gatan DigitalMicrograph | ``rsciio.digitalmicrograph`` |
| ``.emd`` | Thermo Fisher Velox, Berkeley NCEM | ``rsciio.emd`` |
| ``.tif``, ``.tiff`` | any (ImageJ / Gatan / FEI calibration tags) | ``rsciio.tiff`` |
| ``.hspy`` | HyperSpy | ``rsciio.hspy`` |
| ``.ndata``, ``.h5`` | Nion Swift | zip of ``metadata.json`` + ``data.npy`` / HDF5 ``data`` + ``properties`` |

Every 2-D image in the file becomes a frame (a stack ``(n, rows, cols)`` becomes ``n`` frames).
The pixel calibration of the two signal axes (converted to Å from m, mm, µm, nm, Å or pm)
sets the :class:`~stemagent.types.ScanGeometry`: ``fov_A = size * scale`` and the centre from
the axis offsets. A file without a usable length calibration is refused with an
:class:`~stemagent.errors.InputError` naming the axis, unless ``pixel_size_A`` is given.
The dwell time comes from the file's metadata when it has one (``dwell_s`` otherwise), line
times are synthesised from it, and the dose is computed when the file also records the beam
current (0 otherwise, flagged in ``frame.meta["dose_known"]``).
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stemagent.clock import Clock
from stemagent.driver import DriverFault
from stemagent.drivers.playback import PlaybackDriver
from stemagent.errors import InputError
from stemagent import dose as dose_model
from stemagent.types import Capabilities, Frame, ParkResult, ScanGeometry

#: suffixes this module reads
ACQUISITION_SUFFIXES = (".dm3", ".dm4", ".emd", ".tif", ".tiff", ".hspy", ".ndata", ".h5")

_TO_ANGSTROM = {
    "m": 1e10, "mm": 1e7, "µm": 1e4, "μm": 1e4, "um": 1e4, "micron": 1e4, "nm": 10.0,
    "å": 1.0, "a": 1.0, "angstrom": 1.0, "ångström": 1.0, "ang": 1.0, "pm": 0.01,
}


def is_acquisition_file(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix.lower() in ACQUISITION_SUFFIXES


@dataclass
class Acquisition:
    """One calibrated 2-D image read from a file."""

    image: np.ndarray  # (rows, cols) float32
    pixel_size_A: tuple[float, float]  # (x, y)
    center_A: tuple[float, float]
    dwell_s: float | None
    beam_current_pA: float | None
    source: str
    title: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def geometry(self, default_dwell_s: float) -> ScanGeometry:
        rows, cols = self.image.shape
        return ScanGeometry(
            center_A=self.center_A,
            fov_A=(cols * self.pixel_size_A[0], rows * self.pixel_size_A[1]),
            shape_px=(rows, cols),
            dwell_s=self.dwell_s or default_dwell_s,
        )


def _angstrom_per_unit(units: Any, where: str) -> float:
    u = str(units or "").strip().lower().replace(" ", "")
    if u in _TO_ANGSTROM:
        return _TO_ANGSTROM[u]
    raise InputError(where, units, "is not a length unit (m, mm, µm, nm, Å, pm); give the pixel size (stemagent replay --pixel-size-A, or pixel_size_A)")


def _is_length(units: Any) -> bool:
    return str(units or "").strip().lower().replace(" ", "") in _TO_ANGSTROM


def _find(d: Any, key: str) -> Any:
    """First value stored under ``key`` anywhere in nested dicts (metadata trees)."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def _mapped(sig: dict[str, Any]) -> dict[str, Any]:
    """Dwell time (s) and beam current (nA) through the reader's own metadata mapping.

    RosettaSciIO leaves applying ``mapping`` (original tag path -> metadata path, converter) to
    HyperSpy; we apply the two entries we need.
    """
    out: dict[str, Any] = {}
    for src, target in (sig.get("mapping") or {}).items():
        try:
            dst, convert = target
        except (TypeError, ValueError):
            continue
        leaf = str(dst).rsplit(".", 1)[-1]
        if leaf not in ("dwell_time", "beam_current"):
            continue
        value: Any = sig.get("original_metadata", {})
        for part in str(src).split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        try:
            out[leaf] = convert(value) if callable(convert) else value
        except Exception:  # noqa: BLE001 - a converter failing on odd metadata: ignore the entry
            continue
    return out


def _positive(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _from_signal(sig: dict[str, Any], path: Path, pixel_size_A: float | None) -> list[Acquisition]:
    """Acquisitions of one RosettaSciIO signal dict (``data``, ``axes``, ``metadata``)."""
    data = np.asarray(sig["data"])
    axes = list(sig.get("axes", []))
    axes = [a for _, a in sorted(enumerate(axes), key=lambda ia: int(ia[1].get("index_in_array", ia[0])))]
    signal_axes = [a for a in axes if not a.get("navigate", False)]
    if len(signal_axes) > 2 and len(axes) == data.ndim and all(_is_length(a.get("units")) for a in axes[-2:]):
        signal_axes = axes[-2:]  # an image stack whose writer marked every axis as signal (NCEM EMD)
    if data.ndim < 2 or len(signal_axes) != 2 or not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        return []  # spectra, spectrum images, diffraction stacks...: not scan images
    if data.ndim > 2:
        data = data.reshape((-1,) + data.shape[-2:])
    else:
        data = data[None]
    ay, ax = signal_axes[0], signal_axes[1]  # rsciio lists signal axes in array order: rows, cols
    if pixel_size_A is not None:
        sx = sy = float(pixel_size_A)
        cx = cy = 0.0
    else:
        fx = _angstrom_per_unit(ax.get("units"), f"{path.name}: axes[{ax.get('name', 'x')}].units")
        fy = _angstrom_per_unit(ay.get("units"), f"{path.name}: axes[{ay.get('name', 'y')}].units")
        sx, sy = float(ax.get("scale", 0)) * fx, float(ay.get("scale", 0)) * fy
        if not (_positive(sx) and _positive(sy)):
            raise InputError(f"{path.name}: axes scale", (ax.get("scale"), ay.get("scale")), "must be positive lengths per pixel")
        rows, cols = data.shape[-2:]
        cx = float(ax.get("offset", 0.0)) * fx + (cols - 1) / 2.0 * sx
        cy = float(ay.get("offset", 0.0)) * fy + (rows - 1) / 2.0 * sy
    md = sig.get("metadata", {}) or {}
    mapped = _mapped(sig)
    om = sig.get("original_metadata", {}) or {}
    scan = om.get("Scan")
    velox_scan: dict[str, Any] = scan if isinstance(scan, dict) else {}
    dwell = (
        _positive(_find(md.get("Acquisition_instrument", {}), "dwell_time"))
        or _positive(mapped.get("dwell_time"))
        or _positive(velox_scan.get("DwellTime"))  # Velox: seconds, as a string
    )
    current_nA = _positive(_find(md.get("Acquisition_instrument", {}), "beam_current")) or _positive(
        mapped.get("beam_current")
    )
    title = str(_find(md.get("General", {}), "title") or "")
    out = []
    for k, img in enumerate(data):
        out.append(
            Acquisition(
                image=np.ascontiguousarray(img, dtype=np.float32),
                pixel_size_A=(sx, sy),
                center_A=(cx, cy),
                dwell_s=dwell,
                beam_current_pA=current_nA * 1e3 if current_nA else None,
                source=f"file:{path.name}",
                title=title,
                meta={"file": str(path), "title": title, "image_in_file": k},
            )
        )
    return out


def _read_nion(path: Path, pixel_size_A: float | None) -> list[Acquisition]:
    """Nion Swift: ``.ndata`` (zip: metadata.json + data.npy) or ``.h5`` (dataset ``data``, attr ``properties``)."""
    try:
        if path.suffix.lower() == ".ndata":
            with zipfile.ZipFile(path) as z:
                props = json.loads(z.read("metadata.json"))
                with z.open("data.npy") as f:
                    data = np.load(f, allow_pickle=False)
        else:
            import h5py  # optional: the 'files' extra

            with h5py.File(path, "r") as f:
                if "data" not in f:
                    raise InputError(f"{path.name}: data", None, "no 'data' dataset: not a Nion Swift HDF5 file")
                data = np.asarray(f["data"])
                props = json.loads(f["data"].attrs.get("properties", "{}"))
    except (OSError, KeyError, ValueError, RecursionError, zipfile.BadZipFile) as exc:
        raise InputError(path.name, str(path), f"is not a readable Nion Swift file ({exc})") from None
    cals = props.get("spatial_calibrations") or props.get("dimensional_calibrations") or []
    axes = []
    n = data.ndim
    for i in range(n):
        c = cals[i] if i < len(cals) and isinstance(cals[i], dict) else {}
        axes.append({"name": f"dim{i}", "scale": c.get("scale", 1.0), "offset": c.get("offset", 0.0),
                     "units": c.get("units", ""), "navigate": i < n - 2})
    md = {"General": {"title": props.get("title", "")}}
    meta_props = props.get("metadata", {})
    hw = meta_props.get("hardware_source", {}) if isinstance(meta_props, dict) else {}
    if isinstance(hw, dict) and _positive(hw.get("pixel_time_us")):
        md["Acquisition_instrument"] = {"TEM": {"dwell_time": float(hw["pixel_time_us"]) * 1e-6}}
    return _from_signal({"data": data, "axes": axes, "metadata": md}, path, pixel_size_A)


def read_acquisitions(path: str | Path, pixel_size_A: float | None = None) -> list[Acquisition]:
    """Every calibrated 2-D image in ``path``; :class:`InputError` if there is none or it cannot be read."""
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.is_file():
        raise InputError("path", str(p), "is not a file")
    if suffix in (".ndata", ".h5"):
        acqs = _read_nion(p, pixel_size_A)
    else:
        reader = _rsciio_reader(suffix)
        try:
            signals = reader(str(p))
        except Exception as exc:  # noqa: BLE001 - third-party readers raise anything on bad files
            raise InputError(p.name, str(p), f"could not be read by RosettaSciIO ({type(exc).__name__}: {exc})") from None
        acqs = [a for sig in signals for a in _from_signal(sig, p, pixel_size_A)]
    if not acqs:
        raise InputError(p.name, str(p), "holds no 2-D image with two signal axes")
    return acqs


def _rsciio_reader(suffix: str) -> Any:
    try:  # rosettasciio is optional (the 'files' extra): imported for the format at hand
        if suffix in (".dm3", ".dm4"):
            from rsciio.digitalmicrograph import file_reader  # optional
        elif suffix == ".emd":
            from rsciio.emd import file_reader  # optional
        elif suffix in (".tif", ".tiff"):
            from rsciio.tiff import file_reader  # optional
        elif suffix == ".hspy":
            from rsciio.hspy import file_reader  # optional
        else:
            raise InputError("path.suffix", suffix, f"is not one of {ACQUISITION_SUFFIXES}")
    except ImportError as exc:
        raise InputError("path.suffix", suffix, f"needs the 'files' extra (pip install stemagent[files]): {exc}") from None
    return file_reader


class FileDriver(PlaybackDriver):
    """Plays the images of one or more acquisition files back as frames, in order.

    Like the run-log replay, the requested geometry is ignored (the file is what the
    microscope saw) and counted in :attr:`mismatched_geometries`. ``pace="recorded"`` releases
    each frame one frame time after the previous on the injected clock; ``"fast"`` at once.
    """

    name = "files"

    def __init__(
        self,
        paths: str | Path | list[str | Path],
        *,
        pace: str = "fast",
        clock: Clock | None = None,
        pixel_size_A: float | None = None,
        dwell_s: float | None = None,
        beam_current_pA: float | None = None,
    ) -> None:
        super().__init__(pace=pace, clock=clock)
        plist = [paths] if isinstance(paths, (str, Path)) else list(paths)
        self.paths = [Path(p) for p in plist]
        self.acquisitions = [a for p in self.paths for a in read_acquisitions(p, pixel_size_A)]
        #: the user's dwell for files that record none (the timing of such files is 1 µs/px otherwise)
        self.user_dwell_s = dwell_s
        self.default_dwell_s = dwell_s or 1e-6
        self.beam_current_pA = beam_current_pA
        self._next = 0
        self._t_s = 0.0

    @property
    def n_frames(self) -> int:
        return len(self.acquisitions)

    async def capabilities(self) -> Capabilities:
        geoms = [a.geometry(self.default_dwell_s) for a in self.acquisitions]
        current = self.beam_current_pA or next((a.beam_current_pA for a in self.acquisitions if a.beam_current_pA), None)
        return Capabilities(
            name=f"files:{','.join(p.name for p in self.paths)}"[:200],
            max_fov_A=max(1e6, *(max(g.fov_A) for g in geoms)),
            max_shape_px=(max(4096, *(g.shape_px[0] for g in geoms)), max(4096, *(g.shape_px[1] for g in geoms))),
            min_dwell_s=1e-9,
            max_dwell_s=10.0,
            can_park=False,
            beam_current_pA=float(current or 20.0),
        )

    def frame(self, i: int, start_s: float = 0.0) -> Frame:
        """Frame ``i`` of the files, its scan starting at ``start_s``."""
        a = self.acquisitions[i]
        g = a.geometry(self.default_dwell_s)
        current = self.beam_current_pA or a.beam_current_pA
        dwell = a.dwell_s or self.user_dwell_s
        dose = 0.0
        if current and dwell:
            dose = dose_model.dose_e_per_A2(current, dwell, a.pixel_size_A[0] * a.pixel_size_A[1])
        return Frame(
            image=a.image,
            geometry=g,
            line_times_s=g.line_start_times_s(start_s),
            index=i,
            dose_e_per_A2=dose,
            source=a.source,
            meta={**a.meta, "dose_known": bool(dose), "dwell_known": dwell is not None},
        )

    async def acquire(self, geometry: ScanGeometry) -> Frame:
        self._check_next(self._next, len(self.acquisitions), ", ".join(map(str, self.paths)))
        i = self._next
        self._next += 1
        g = self.acquisitions[i].geometry(self.default_dwell_s)
        await self._pass(g.frame_time_s)
        frame = self.frame(i, start_s=self._t_s)
        self._t_s += g.frame_time_s
        return self._deliver(frame, geometry)

    async def park(self, position_A: tuple[float, float], dwell_s: float) -> ParkResult:
        raise DriverFault("a file of images cannot park the beam")
