"""Units and axes between stemagent and Nion Swift, converted here and nowhere else.

Pure functions on plain numbers and mappings: no Nion import, so they are tested without Nion.

stemagent (``stemagent.types.ScanGeometry``)        Nion (``scan_base.ScanFrameParameters``)
--------------------------------------------------  ---------------------------------------------------
``center_A = (x, y)``, Å, sample frame               ``center_nm = (y, x)``, nm (a ``FloatPoint``: y first)
``fov_A = (width, height)``, Å                        ``fov_nm``: extent of the *larger* pixel dimension, nm;
                                                      pixels are square (``fov_nm / max(rows, cols)``)
``shape_px = (rows, cols)``                           ``pixel_size = (height, width)`` = (rows, cols)
``rotation_rad``, counter-clockwise in (x, y)         ``rotation_rad``, the same sense
``dwell_s``                                           ``pixel_time_us``
``flyback_s``                                         device-defined: read back as ``line_time_us``
                                                      minus ``cols * pixel_time_us``
image ``[row, col]``, fast axis along columns         the same: Nion's data is ``(height, width)``,
                                                      row 0 at the top of the field

Pixel ``(r, c)`` of a Nion scan looks at scan position ``center + R(rotation) (u, v)`` with
``u = (c - (cols - 1) / 2) * pixel``, ``v = (r - (rows - 1) / 2) * pixel``, y growing with the
row: exactly :meth:`ScanGeometry.pixel_to_sample`. That is how Nion's simulated microscope renders
its own samples (scan rectangle centred on ``center_nm``, then ``Core.function_crop_rotated`` by
``-rotation``); ``tests/system/test_nion_usim.py`` checks it against usim's own renderer, so a sign
or axis error here fails a test that none of our code can satisfy by itself.

Nion's dimensional calibrations of a scan are ``(y, x)`` with ``scale`` = pixel size and
``offset = -center - scale * n / 2``: the offset carries the centre with the opposite sign of
``center_nm``. We take only the *scale* from the calibrations and the centre and rotation from
the scan metadata (``center_x_nm``, ``center_y_nm``, ``rotation``), which are what was scanned.

The probe position of a parked beam is normalised to the scan context (the last scan), origin
top left, as ``(y, x)`` in ``[0, 1]``: pixel ``(r, c)`` is at ``((r + 0.5) / rows, (c + 0.5) / cols)``.
Nion clamps positions outside ``[0, 1]`` silently, so :func:`probe_fraction` refuses them instead.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any, Mapping

import numpy as np

from stemagent.errors import InputError
from stemagent.types import ScanGeometry

#: Å per unit for the length units Nion calibrations use
ANGSTROM_PER_UNIT: dict[str, float] = {"m": 1e10, "mm": 1e7, "µm": 1e4, "um": 1e4, "nm": 10.0, "Å": 1.0, "A": 1.0, "pm": 0.01}

#: relative tolerance under which a read-back number counts as the requested one
READBACK_RTOL = 1e-6


def square_pixel_A(geometry: ScanGeometry) -> float:
    """The pixel size of ``geometry`` in Å, or :class:`InputError` when its pixels are not square."""
    px, py = geometry.pixel_size_A
    if not math.isclose(px, py, rel_tol=READBACK_RTOL):
        raise InputError("geometry.fov_A", geometry.fov_A,
                         f"Nion scans square pixels: fov_A / shape_px must match along x and y (got {px:g} x {py:g} Å)")
    return px


def frame_parameters(geometry: ScanGeometry) -> dict[str, Any]:
    """The Nion scan frame parameters (as the dict ``ScanFrameParameters`` is built from) for ``geometry``.

    The flyback is not sent: Nion's scan devices set it themselves (it comes back with the frame)."""
    rows, cols = geometry.shape_px
    pixel_nm = square_pixel_A(geometry) / 10.0
    cx, cy = geometry.center_A
    return {
        "pixel_size": (int(rows), int(cols)),
        "fov_nm": pixel_nm * max(rows, cols),
        "center_nm": (cy / 10.0, cx / 10.0),
        "rotation_rad": float(geometry.rotation_rad),
        "pixel_time_us": geometry.dwell_s * 1e6,
    }


def length_A(value: float, units: str, field: str) -> float:
    """``value`` in ``units`` as Å; unknown units are a :class:`InputError` naming ``field``."""
    try:
        return float(value) * ANGSTROM_PER_UNIT[units]
    except KeyError:
        raise InputError(field, units, f"is not a length unit this adapter knows ({sorted(ANGSTROM_PER_UNIT)})") from None


def geometry_from_scan(
    shape: tuple[int, int],
    calibrations: list[tuple[float, str]],
    scan_metadata: Mapping[str, Any],
    detector_metadata: Mapping[str, Any],
) -> ScanGeometry:
    """The geometry Nion says it scanned: ``calibrations`` are ``(scale, units)`` of the y and x axes,
    ``scan_metadata`` is the frame's ``metadata["scan"]``, ``detector_metadata`` its ``metadata["hardware_source"]``."""
    rows, cols = int(shape[0]), int(shape[1])
    if len(calibrations) != 2:
        raise InputError("calibrations", calibrations, "a scan has two dimensional calibrations (y, x)")
    py = length_A(calibrations[0][0], calibrations[0][1], "calibrations[0].units")
    px = length_A(calibrations[1][0], calibrations[1][1], "calibrations[1].units")
    try:
        cx_nm = float(scan_metadata["center_x_nm"])
        cy_nm = float(scan_metadata["center_y_nm"])
        rotation = float(scan_metadata.get("rotation", 0.0))
        dwell_s = float(detector_metadata["pixel_time_us"]) * 1e-6
        line_s = float(detector_metadata.get("line_time_us", cols * dwell_s * 1e6)) * 1e-6
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError("metadata", exc, "a Nion scan frame carries center_x_nm, center_y_nm and pixel_time_us") from None
    return ScanGeometry(
        center_A=(cx_nm * 10.0, cy_nm * 10.0),
        fov_A=(px * cols, py * rows),
        shape_px=(rows, cols),
        rotation_rad=rotation,
        dwell_s=dwell_s,
        flyback_s=max(0.0, line_s - cols * dwell_s),
    )


def same_geometry(a: ScanGeometry, b: ScanGeometry, abs_A: float = 1e-6) -> bool:
    """Whether ``b`` (read back) is ``a`` (requested) up to rounding in the unit conversions."""
    close = lambda x, y, tol: abs(x - y) <= tol + READBACK_RTOL * max(abs(x), abs(y))  # noqa: E731
    return (
        a.shape_px == b.shape_px
        and all(close(x, y, abs_A) for x, y in zip(a.center_A + a.fov_A, b.center_A + b.fov_A))
        and close(a.rotation_rad, b.rotation_rad, 1e-9)
        and close(a.dwell_s, b.dwell_s, 1e-12)
        and close(a.flyback_s, b.flyback_s, 1e-9)
    )


def probe_fraction(context: ScanGeometry, position_A: tuple[float, float]) -> tuple[float, float]:
    """Nion's normalised probe position ``(y, x)`` of a sample-frame position in the scan ``context``.

    Raises :class:`InputError` for a position outside the context's field (Nion would clamp it)."""
    rows, cols = context.shape_px
    r, c = context.sample_to_pixel(np.asarray([position_A], dtype=np.float64))[0]
    fy, fx = (r + 0.5) / rows, (c + 0.5) / cols
    if not (0.0 <= fx <= 1.0 and 0.0 <= fy <= 1.0):
        raise InputError("position_A", tuple(position_A),
                         "lies outside the last scanned field (Nion places a parked probe inside the scan context)")
    return (float(fy), float(fx))


def position_from_fraction(context: ScanGeometry, fraction_yx: tuple[float, float]) -> tuple[float, float]:
    """Inverse of :func:`probe_fraction`: the sample-frame position of Nion's normalised ``(y, x)``."""
    rows, cols = context.shape_px
    rc = np.array([[fraction_yx[0] * rows - 0.5, fraction_yx[1] * cols - 0.5]])
    x, y = context.pixel_to_sample(rc)[0]
    return (float(x), float(y))


def monotonic_of(timestamp: _dt.datetime, now_monotonic_s: float, now_epoch_s: float) -> float:
    """A Nion data timestamp (UTC, naive or aware) on the process's monotonic clock."""
    ts = timestamp if timestamp.tzinfo is not None else timestamp.replace(tzinfo=_dt.UTC)
    return now_monotonic_s - (now_epoch_s - ts.timestamp())


def frame_start_s(end_s: float, geometry: ScanGeometry, called_s: float) -> float:
    """Start of a frame Nion stamped at ``end_s`` (when it packaged the data, just after the last
    line): ``end_s - frame_time``, never before the call that started it (``called_s``)."""
    return max(called_s, end_s - geometry.frame_time_s)
