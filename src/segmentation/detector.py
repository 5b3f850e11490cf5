"""Which detector made an image, from the image's statistics (never from its dtype).

A counting detector reports electrons: pixel values are whole numbers, the dark level is 0 and
the variance equals the mean (Poisson). An analog detector (a scan generator digitising a
photomultiplier) reports ``offset + gain * electrons + read noise``, often stored as whole
numbers too (uint16, uint32 with an offset of millions): whole numbers alone say nothing.

:func:`estimate_detector` reads the photon-transfer curve off the image itself: the image is
smoothed with a small Gaussian (the probe spans several pixels, the noise does not), the
squared residuals are binned by the smoothed level, and the noise variance in each bin is a
straight line in the level, ``var = gain * mean + intercept``. ``offset = -intercept / gain``
is the level that makes ``(y - offset) / gain`` Poisson in its first two moments (read noise
shows as a small extra background). The image is called *counting* only when all of these
hold: whole numbers, none negative, a quantisation step of 1, a variance-to-mean slope near 1
and an offset near 0. Otherwise it is *analog* and the caller converts it to electrons with
the estimated gain and offset. How it fails: an image with too little structure to bin (a
constant, or fewer than a few hundred pixels) gets ``kind="unknown"`` with gain 1 and offset
0, and the caller treats it as it stands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: smoothing width (pixels) of the mean estimate: below the probe's width at any usable sampling
SMOOTH_SIGMA_PX = 1.0
#: a counting detector's variance-to-mean slope lies within this band (the estimate's own scatter)
COUNTING_SLOPE = (0.5, 2.2)


@dataclass(frozen=True)
class DetectorEstimate:
    """``kind``: ``"counting"``, ``"analog"`` or ``"unknown"``; ``gain`` (output units per electron)
    and ``offset`` (output units) convert the image to electrons as ``(y - offset) / gain``;
    the statistics behind the decision: ``slope`` (variance-to-mean), ``whole_numbers``,
    ``quantum`` (the step between pixel values; 0 when not whole numbers), ``min_value``."""

    kind: str
    gain: float
    offset: float
    slope: float
    whole_numbers: bool
    quantum: float
    min_value: float

    def to_electrons(self, image: np.ndarray) -> np.ndarray:
        """``image`` in electrons (float64); a counting or unknown detector's image unchanged."""
        x = np.asarray(image, dtype=np.float64)
        if self.kind != "analog":
            return x
        return (x - self.offset) / self.gain

    def describe(self) -> str:
        return (
            f"{self.kind} detector (gain {self.gain:.3g}/e, offset {self.offset:.6g}; variance/mean slope {self.slope:.3g}, "
            f"whole numbers {self.whole_numbers}, step {self.quantum:g}, min {self.min_value:.6g})"
        )


def _quantum(x: np.ndarray, max_values: int = 2000) -> float:
    """Greatest common step between the (whole-number) values of ``x``; 0 if none. A subsample
    of the pixels is enough (every value step shows up many times in a frame)."""
    flat = x.ravel()
    vals = np.unique(flat[:: max(1, len(flat) // 65536)])
    if len(vals) < 2:
        return 0.0
    diffs = np.diff(vals[:max_values]).astype(np.int64)
    return float(np.gcd.reduce(diffs))


#: a second, narrower smoothing: the two residuals leak the signal's curvature in the known
#: ratio ``(sigma_b / sigma_a)^4`` (a Gaussian of small width acts as ``1 + sigma^2/2 nabla^2``),
#: so a combination of them is left with the noise alone (Richardson extrapolation)
SMOOTH_SIGMA_B_PX = 0.7
_K = (SMOOTH_SIGMA_B_PX / SMOOTH_SIGMA_PX) ** 4


def _noise_factors() -> tuple[float, float, float]:
    """Unit white noise's variance in the two residuals and their covariance."""
    delta = np.zeros((33, 33))
    delta[16, 16] = 1.0
    ea = -ndimage.gaussian_filter(delta, SMOOTH_SIGMA_PX, mode="constant")
    eb = -ndimage.gaussian_filter(delta, SMOOTH_SIGMA_B_PX, mode="constant")
    ea[16, 16] += 1.0
    eb[16, 16] += 1.0
    return float((ea * ea).sum()), float((eb * eb).sum()), float((ea * eb).sum())


_FA, _FB, _FAB = _noise_factors()


def estimate_detector(image: np.ndarray, *, bins: int = 24, border_px: int = 4, max_side_px: int = 264) -> DetectorEstimate:
    """The detector model of one 2-D image from its noise (see the module docstring). The noise
    statistics come from the central ``max_side_px`` square at most (65k pixels pin the
    photon-transfer line; a 512x512 frame costs a quarter of the time)."""
    x = np.asarray(image)
    whole = bool(np.issubdtype(x.dtype, np.integer)) or bool(np.all(x == np.round(x)))
    x = x.astype(np.float64)
    lo = float(x.min()) if x.size else 0.0
    quantum = _quantum(x) if whole else 0.0
    unknown = DetectorEstimate("unknown", 1.0, 0.0, float("nan"), whole, quantum, lo)
    if x.ndim != 2 or min(x.shape) <= 2 * border_px + 4 or x.size < 400 or float(np.ptp(x)) == 0.0:
        return unknown
    # condition in float64 around the dark level (offsets of millions), then float32 is exact enough
    h, w = x.shape
    r0, c0 = max(0, (h - max_side_px) // 2), max(0, (w - max_side_px) // 2)
    y = (x[r0 : r0 + max_side_px, c0 : c0 + max_side_px] - lo).astype(np.float32)
    m = ndimage.gaussian_filter(y, SMOOTH_SIGMA_PX, mode="nearest")
    # residual of the narrow smoothing minus the curvature it shares with the wide one, scaled
    rb = y - ndimage.gaussian_filter(y, SMOOTH_SIGMA_B_PX, mode="nearest")
    ra = y - m
    d = rb - math.sqrt(_K) * ra  # curvature parts cancel: sigma_b^2 = sqrt(K) sigma_a^2
    r2 = d * d / (_FB - 2.0 * math.sqrt(_K) * _FAB + _K * _FA)
    b = border_px
    m, r2 = m[b:-b, b:-b].ravel().astype(np.float64), r2[b:-b, b:-b].ravel().astype(np.float64)
    # equal-count bins of the smoothed level (edges from a subsample: no full sort)
    edges = np.quantile(m[:: max(1, len(m) // 32768)], np.linspace(0.0, 1.0, bins + 1)[1:-1])
    which = np.searchsorted(edges, m, side="right")
    cnt = np.bincount(which, minlength=bins)
    full = cnt > 0
    mu = np.bincount(which, weights=m, minlength=bins)[full] / cnt[full]
    var = np.bincount(which, weights=r2, minlength=bins)[full] / cnt[full]
    if len(mu) < 3:
        return unknown
    if float(np.ptp(mu)) <= 0.0:
        return unknown
    slope, intercept = np.polyfit(mu, var, 1)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope <= 1e-9:
        return unknown
    offset = lo - intercept / slope
    counting = (
        whole
        and lo >= 0.0
        and quantum == 1.0
        and COUNTING_SLOPE[0] <= slope <= COUNTING_SLOPE[1]
        # the dark level of electrons is 0: within a read-noise-free Poisson's own scatter
        and abs(offset) <= max(1.0, 3.0 * math.sqrt(max(float(mu.min()) + lo, 0.0) + 1.0))
    )
    if counting:
        return DetectorEstimate("counting", 1.0, 0.0, float(slope), whole, quantum, lo)
    return DetectorEstimate("analog", float(slope), float(offset), float(slope), whole, quantum, lo)
