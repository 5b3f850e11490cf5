"""What the live page draws, as one JSON document per update (a *snapshot*).

Built off the control loop (in a thread, only when a page asks) from references the agent
already holds: the frame's image is reduced to at most ``max_px`` pixels a side by block means
and sent as 8-bit grey, base64 text; atoms, the next command and the click-to-target mapping
are in the displayed image's pixels (``col``, ``row``); ``px_to_A`` maps them back to the
sample frame: ``x = a*col + b*row + c``, ``y = d*col + e*row + f`` for ``[[a, b, c], [d, e, f]]``.

Document fields: ``mode`` (``live`` or ``replay``), ``seq`` (grows with every new
observation), ``state``, ``frame`` (``index``, ``width``, ``height``, ``image_b64``,
``px_to_A``, ``fov_A``), ``atoms`` (``class_names``, ``col_row``, ``classes``), ``decision``
(``policy``, ``reason``, ``scores``, ``command``: ``{"kind": "scan", "corners": [[col, row] x 4]}``,
``{"kind": "park", "at": [col, row], "position_A", "dwell_s"}`` or ``{"kind": "blank"}``),
``dose`` (``peak_e_per_A2``, ``budget_e_per_A2``, ``map``: a small grid of dose / budget, 3 significant digits),
``drift`` (``trace``: ``[frame_index, dx_A, dy_A, band95_A]`` rows), ``rates``
(``frames_per_s``, ``latency_ms``, ``latency_ms_p50``), ``timings_ms``, ``events``, ``arrived_wall_s``
and ``ready_wall_s`` (wall clock, s since the epoch, when the shown frame reached the agent and when
its analysis was done; the page measures its frame-to-screen latency from them).
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

from stemagent.types import Atoms, Blank, Decision, Frame, Park, ScanGeometry, ScanRegion

#: the longest side of the image sent to the page, px
DISPLAY_MAX_PX = 256
#: the longest side of the dose map sent to the page, cells
DOSE_MAX_CELLS = 48


def display_image(image: np.ndarray, max_px: int = DISPLAY_MAX_PX) -> tuple[np.ndarray, int]:
    """The image reduced by an integer factor to at most ``max_px`` a side (block means) and
    stretched to 8 bits between its 0.5 and 99.5 percentiles. Returns ``(uint8 (h, w), factor)``."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"image.shape={img.shape}: must be a non-empty 2-D array")
    factor = max(1, math.ceil(max(img.shape) / max_px))
    if factor > 1:
        h, w = img.shape[0] // factor, img.shape[1] // factor
        img = img[: h * factor, : w * factor].reshape(h, factor, w, factor).mean(axis=(1, 3))
    finite = img[np.isfinite(img)]
    sample = finite[:: max(1, finite.size // 16384)]  # the stretch from ~16k pixels: a third of the cost at 256 px
    lo, hi = (np.percentile(sample, [0.5, 99.5]) if sample.size else (0.0, 1.0))
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.clip((np.nan_to_num(img, nan=float(lo)) - lo) * scale, 0, 255).astype(np.uint8)
    return out, factor


def _display_geometry(geometry: ScanGeometry, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with sample (x, y) = A @ (col, row) + b for display pixels (centres of blocks)."""
    # a display pixel (col, row) covers full pixels factor*col .. factor*col + factor - 1: centre at
    # factor*col + (factor - 1)/2; geometry pixels are (row, col)
    half = (factor - 1) / 2.0
    origin = geometry.pixel_to_sample(np.array([[half, half]]))[0]
    ex = geometry.pixel_to_sample(np.array([[half, half + factor]]))[0] - origin
    ey = geometry.pixel_to_sample(np.array([[half + factor, half]]))[0] - origin
    return np.stack([ex, ey], axis=1), origin


def _to_display(geometry: ScanGeometry, factor: int, xy: np.ndarray) -> np.ndarray:
    """Sample positions ``(N, 2)`` (x, y, Å) to display pixels ``(N, 2)`` (col, row)."""
    rc = geometry.sample_to_pixel(np.asarray(xy, dtype=np.float64).reshape(-1, 2))
    return (rc[:, ::-1] - (factor - 1) / 2.0) / factor


def _rounded(a: np.ndarray, digits: int = 2) -> list[Any]:
    return np.round(np.asarray(a, dtype=np.float64), digits).tolist()


def frame_part(frame: Frame, max_px: int = DISPLAY_MAX_PX) -> tuple[dict[str, Any], int]:
    img, factor = display_image(frame.image, max_px)
    m, b = _display_geometry(frame.geometry, factor)
    doc = {
        "index": int(frame.index),
        "width": int(img.shape[1]),
        "height": int(img.shape[0]),
        "image_b64": base64.b64encode(img.tobytes()).decode("ascii"),
        "px_to_A": [[float(m[0, 0]), float(m[0, 1]), float(b[0])], [float(m[1, 0]), float(m[1, 1]), float(b[1])]],
        "fov_A": [float(v) for v in frame.geometry.fov_A],
        "center_A": [float(v) for v in frame.geometry.center_A],
    }
    return doc, factor


def atoms_part(atoms: Atoms, geometry: ScanGeometry, factor: int) -> dict[str, Any]:
    return {
        "class_names": list(atoms.class_names),
        "col_row": _rounded(_to_display(geometry, factor, atoms.positions_A), 1) if len(atoms) else [],
        "classes": atoms.classes.astype(int).tolist(),
    }


def decision_part(decision: Decision | None, geometry: ScanGeometry | None, factor: int) -> dict[str, Any] | None:
    if decision is None:
        return None
    cmd = decision.command
    out: dict[str, Any] = {"policy": decision.policy, "reason": decision.reason,
                           "scores": {k: float(v) for k, v in decision.scores.items() if isinstance(v, (int, float))}}
    if isinstance(cmd, ScanRegion):
        g = cmd.geometry
        rows, cols = g.shape_px
        corners = g.pixel_to_sample(np.array([[-0.5, -0.5], [-0.5, cols - 0.5], [rows - 0.5, cols - 0.5], [rows - 0.5, -0.5]]))
        out["command"] = {"kind": "scan", "center_A": [float(v) for v in g.center_A], "fov_A": [float(v) for v in g.fov_A],
                          "corners": _rounded(_to_display(geometry, factor, corners), 1) if geometry is not None else []}
    elif isinstance(cmd, Park):
        at = _to_display(geometry, factor, np.asarray(cmd.position_A))[0] if geometry is not None else None
        out["command"] = {"kind": "park", "position_A": [float(v) for v in cmd.position_A], "dwell_s": float(cmd.dwell_s),
                          "at": _rounded(at, 1) if at is not None else None}
    elif isinstance(cmd, Blank):
        out["command"] = {"kind": "blank"}
    else:
        out["command"] = {"kind": str(getattr(cmd, "kind", type(cmd).__name__))}
    return out


def dose_part(values: np.ndarray | None, peak_e_per_A2: float, budget_e_per_A2: float,
              max_cells: int = DOSE_MAX_CELLS) -> dict[str, Any]:
    """Peak dose against the budget, and the dose map reduced (block maxima) to a small grid as a
    fraction of the budget, rows along +y."""
    out: dict[str, Any] = {"peak_e_per_A2": float(peak_e_per_A2), "budget_e_per_A2": float(budget_e_per_A2)}
    if values is not None and values.size and budget_e_per_A2 > 0:
        v = np.asarray(values, dtype=np.float64)
        f = max(1, math.ceil(max(v.shape) / max_cells))
        h, w = math.ceil(v.shape[0] / f), math.ceil(v.shape[1] / f)
        padded = np.zeros((h * f, w * f))
        padded[: v.shape[0], : v.shape[1]] = v
        reduced = padded.reshape(h, f, w, f).max(axis=(1, 3)) / budget_e_per_A2
        out["map"] = {"rows": h, "cols": w, "fraction": [[float(f"{x:.3g}") for x in row] for row in reduced.tolist()]}
    return out


def drift_row(drift: Any) -> list[float] | None:
    """``[frame_index, dx_A, dy_A, band95_A]`` at the end of the frame, from a drift estimate
    (anything with ``displacement_A`` ``(G, 2)`` and ``std_A`` ``(G, 2)``), or None."""
    disp = getattr(drift, "displacement_A", None)
    std = getattr(drift, "std_A", None)
    if disp is None or len(disp) == 0:
        return None
    d = np.asarray(disp, dtype=np.float64)[-1]
    band = float(1.959963984540054 * np.max(np.asarray(std, dtype=np.float64)[-1])) if std is not None and len(std) else 0.0
    if not (np.all(np.isfinite(d)) and math.isfinite(band)):
        return None
    return [int(getattr(drift, "frame_index", -1)), round(float(d[0]), 4), round(float(d[1]), 4), round(band, 4)]
