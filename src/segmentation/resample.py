"""Resample frames onto the network's fixed physical sampling and map positions back.

The network is trained at one sampling (``model_pixel_A``, e.g. 0.2 Å/px). A frame of
``(H, W)`` pixels of ``pixel_A = (px, py)`` Å is resized to ``(round(H py / model), round(W px
/ model))`` with antialiased bilinear interpolation (area-like when shrinking), then padded at
the bottom/right edge to a multiple the network needs. Padding at the far edges leaves the
coordinate mapping untouched.

Coordinate mapping (pixel centres, as ``torch.nn.functional.interpolate`` with
``align_corners=False``): a point at fractional pixel ``r`` of the input lies at
``(r + 0.5) * H_out / H_in - 0.5`` on the output grid, and back again with the inverse.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from stemagent.errors import InputError


def model_shape(shape_px: tuple[int, int], pixel_A: tuple[float, float], model_pixel_A: float) -> tuple[int, int]:
    """``(rows, cols)`` of the frame on the model grid (at least 8 px per side)."""
    rows, cols = shape_px
    px, py = pixel_A
    if not (math.isfinite(px) and math.isfinite(py) and px > 0 and py > 0):
        raise InputError("pixel_size_A", pixel_A, "must be two positive finite lengths in Å")
    if not (math.isfinite(model_pixel_A) and model_pixel_A > 0):
        raise InputError("model_pixel_A", model_pixel_A, "must be a positive finite length in Å")
    return max(8, int(round(rows * py / model_pixel_A))), max(8, int(round(cols * px / model_pixel_A)))


def resize(images: torch.Tensor, out_shape: tuple[int, int]) -> torch.Tensor:
    """Resize ``(B, 1, H, W)`` float images to ``(B, 1, *out_shape)`` (antialiased bilinear)."""
    if tuple(images.shape[-2:]) == tuple(out_shape):
        return images
    shrink = out_shape[0] < images.shape[-2] or out_shape[1] < images.shape[-1]
    return F.interpolate(images, size=out_shape, mode="bilinear", align_corners=False, antialias=shrink)


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad ``(B, C, H, W)`` at the bottom and right so ``H`` and ``W`` divide by ``multiple``."""
    h, w = images.shape[-2:]
    ph = (-h) % multiple
    pw = (-w) % multiple
    if ph == 0 and pw == 0:
        return images
    return F.pad(images, (0, pw, 0, ph), mode="replicate")


def scale_rc(rc: torch.Tensor, in_shape: tuple[int, int], out_shape: tuple[int, int]) -> torch.Tensor:
    """Map fractional ``(N, 2)`` (row, col) on an ``in_shape`` grid to the ``out_shape`` grid."""
    sr = out_shape[0] / in_shape[0]
    sc = out_shape[1] / in_shape[1]
    scale = torch.tensor([sr, sc], dtype=rc.dtype, device=rc.device)
    return (rc + 0.5) * scale - 0.5
