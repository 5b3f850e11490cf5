"""Steps in a parked-beam ADF signal: "something moved under the beam", and when.

An atom hopping next to a parked beam changes the scattered fraction abruptly: the signal
(``ParkResult.signal``, one count per sample interval) steps from one level to another. Slow
changes (specimen drift moving the beam along the probe's flank) are not steps.

The test: at every sample ``t`` and for each window ``w`` the level change from the ``w``
samples before to the ``w`` after, in units of its standard error. Windows of more than
``plain_max_window`` samples fit a common linear trend on both sides first, so a drift ramp
gives no step. The noise is read off the signal itself (the median absolute first difference,
robust to the steps) and scales with the level like shot noise. The largest statistic above
``z_threshold`` is a step; binary segmentation then looks for further steps on each side (a hop
and a hop back are two steps).

Long windows (``long_windows``, e.g. 1024 and 4096 samples of a 1-4 s park) see steps too small
for the short ones (a hop with the beam far from both atoms changes the level by a fraction of
the per-sample noise): the statistic grows with the square root of the window. But slow drift
along the probe's flank is curved over seconds, and the trend only removes it to first order:
a long window alone is not trusted to call a step. :func:`scan_steps` returns, next to the
steps (short windows only), the *evidence*: the largest statistic over the whole park, short
and long windows, in units of its window's threshold (``long_z_threshold`` for the long ones).
A park without a step but with evidence near or above 1 is ambiguous: the policy confirms it
with a small scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stemagent.errors import InputError


@dataclass(frozen=True)
class Step:
    """One step: ``index`` is the first sample at the new level; ``time_s`` is ``index * dt``
    from the park's start; ``size`` the level change (signal units); ``z`` its significance."""

    index: int
    time_s: float
    size: float
    z: float

    def to_dict(self) -> dict:
        return {"index": self.index, "time_s": self.time_s, "size": self.size, "z": self.z}


def noise_scale(signal: np.ndarray) -> float:
    """Robust per-sample noise standard deviation from first differences (steps barely move it)."""
    d = np.diff(np.asarray(signal, dtype=np.float64))
    if len(d) == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


def _window_z(x: np.ndarray, lo: int, hi: int, w: int, sigma2: float, level: float, plain: bool) -> np.ndarray:
    """Statistic ``(hi - lo + 1,)`` for a step at each ``t`` in ``[lo, hi]`` with half-windows of
    up to ``w`` samples clipped to ``[lo, hi)``; zero where a side has fewer than 2 samples."""
    n = hi - lo
    seg = x[lo:hi]
    c1 = np.concatenate([[0.0], np.cumsum(seg)])
    k = np.arange(n, dtype=np.float64)
    ck = np.concatenate([[0.0], np.cumsum(k * seg)])
    t = np.arange(n + 1)
    wb = np.minimum(w, t)
    wa = np.minimum(w, n - t)
    ok = (wb >= 2) & (wa >= 2)
    wb = np.where(ok, wb, 2)
    wa = np.where(ok, wa, 2)
    t = np.clip(t, 2, max(2, n - 2))
    sb = c1[t] - c1[t - wb]
    sa = c1[t + wa] - c1[t]
    mb = sb / wb
    ma = sa / wa
    # shot-noise-like scaling of the variance with the level on each side
    vb = sigma2 * np.maximum(1.0, mb / level)
    va = sigma2 * np.maximum(1.0, ma / level)
    if plain:
        diff = ma - mb
        var = vb / wb + va / wa
    else:
        # common slope from both half-windows (centred sums), step at t net of the trend
        kb_mean = (t - wb + t - 1) / 2.0
        ka_mean = (t + t + wa - 1) / 2.0
        sxy_b = (ck[t] - ck[t - wb]) - kb_mean * sb
        sxy_a = (ck[t + wa] - ck[t]) - ka_mean * sa
        sxx_b = wb * (wb.astype(np.float64) ** 2 - 1) / 12.0
        sxx_a = wa * (wa.astype(np.float64) ** 2 - 1) / 12.0
        sxx = np.maximum(sxx_b + sxx_a, 1e-12)
        slope = (sxy_b + sxy_a) / sxx
        gap = ka_mean - kb_mean
        diff = (ma - mb) - slope * gap
        v = np.maximum(vb, va)
        var = v / wb + v / wa + v * gap**2 / sxx
    z = np.where(ok, diff / np.sqrt(np.maximum(var, 1e-300)), 0.0)
    return z


def detect_steps(signal: np.ndarray, sample_interval_s: float, **options: Any) -> list[Step]:
    """Steps in ``signal`` ``(T,)`` (one value per ``sample_interval_s``), in time order: the
    steps of :func:`scan_steps` (same keyword ``options``) without its evidence."""
    return scan_steps(signal, sample_interval_s, **options)[0]


def scan_steps(
    signal: np.ndarray,
    sample_interval_s: float,
    *,
    z_threshold: float = 6.0,
    windows: tuple[int, ...] = (4, 16, 64, 256),
    plain_max_window: int = 16,
    min_segment: int = 3,
    max_steps: int = 4,
    long_windows: tuple[int, ...] = (),
    long_z_threshold: float = 8.0,
) -> tuple[list[Step], float]:
    """Steps in ``signal`` ``(T,)`` (time order, short windows) and the evidence: the largest
    ``|z| / threshold`` over every window, long ones included, on the whole signal (``>= 1`` when
    there is a step; it may also be ``>= 1`` from a long window alone, without a step)."""
    if not (math.isfinite(long_z_threshold) and long_z_threshold > 0):
        raise InputError("long_z_threshold", long_z_threshold, "must be a positive number")
    x = np.asarray(signal, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise InputError("signal", "non-finite", "park signal must be finite")
    if not (math.isfinite(sample_interval_s) and sample_interval_s > 0):
        raise InputError("sample_interval_s", sample_interval_s, "must be a positive time in s")
    n = len(x)
    if n < 2 * min_segment:
        return [], 0.0
    sigma = noise_scale(x)
    level = max(float(np.median(x)), 1e-12)
    if sigma <= 0:  # a noiseless signal: any change at all is a step
        sigma = 1e-9 * max(1.0, abs(level))
    sigma2 = sigma * sigma
    evidence = 0.0
    for w in long_windows:  # evidence only: the long windows never call a step on their own
        if w > max(windows, default=0):
            z = _window_z(x, 0, n, w, sigma2, level, plain=w <= plain_max_window)
            z[:min_segment] = 0.0
            z[len(z) - min_segment :] = 0.0
            evidence = max(evidence, float(np.abs(z).max()) / long_z_threshold)
    tests = [(w, z_threshold) for w in windows]
    steps: list[Step] = []
    todo = [(0, n)]
    while todo and len(steps) < max_steps:
        lo, hi = todo.pop()
        if hi - lo < 2 * min_segment:
            continue
        best_e, best_z, best_t = 0.0, 0.0, -1
        for w, thr in tests:
            z = _window_z(x, lo, hi, w, sigma2, level, plain=w <= plain_max_window)
            z[:min_segment] = 0.0
            z[len(z) - min_segment :] = 0.0
            j = int(np.argmax(np.abs(z)))
            if abs(z[j]) / thr > best_e:
                best_e, best_z, best_t = abs(float(z[j])) / thr, float(z[j]), lo + j
        if (lo, hi) == (0, n):
            evidence = max(evidence, best_e)
        if best_e < 1.0:
            continue
        size = float(np.mean(x[best_t : min(hi, best_t + 64)]) - np.mean(x[max(lo, best_t - 64) : best_t]))
        steps.append(Step(best_t, best_t * sample_interval_s, size, best_z))
        todo.extend([(lo, best_t), (best_t, hi)])
    return sorted(steps, key=lambda s: s.index), evidence
