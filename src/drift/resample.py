"""The drift-corrected (resampled) image of a frame, for display and encoding.

The output has the frame's pixel grid placed in the sample frame: its pixel ``(r, c)`` shows
the sample point ``X = pixel_to_sample(r, c)`` of the frame's geometry, i.e. what the frame
would have shown had the specimen stood still at the reference. That point was under the beam
at ``X + d(t)``, where ``t`` is when the beam passed there; it is found by a fixed-point step
on the scan timing and read from the frame by bilinear interpolation. Pixels whose source lies
outside the frame are NaN.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.ndimage import map_coordinates

from stemagent.types import Frame


def corrected_image(frame: Frame, forecast: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], iterations: int = 2) -> np.ndarray:
    """``(rows, cols)`` float32 image of ``frame`` in the sample frame; ``forecast(t (m,)) -> (mean (m, 2), std)``."""
    g = frame.geometry
    rows, cols = g.shape_px
    # the drift on each line's start and end, interpolated in between (drift is smooth on a line)
    t_lines = np.concatenate([frame.line_times_s, [frame.end_time_s]])
    d_lines, _ = forecast(t_lines)
    rr, cc = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    X = g.pixel_to_sample(np.stack([rr.ravel(), cc.ravel()], axis=1))
    t = frame.time_at_pixel(np.stack([rr.ravel(), cc.ravel()], axis=1))
    src = g.sample_to_pixel(X)
    for _ in range(iterations):
        d = np.stack([np.interp(t, t_lines, d_lines[:, 0]), np.interp(t, t_lines, d_lines[:, 1])], axis=1)
        src = g.sample_to_pixel(X + d)
        t = frame.time_at_pixel(src)
    out = map_coordinates(np.asarray(frame.image, dtype=np.float32), [src[:, 0], src[:, 1]], order=1, mode="constant", cval=np.nan)
    return out.reshape(rows, cols).astype(np.float32)
