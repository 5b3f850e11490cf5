"""Fast-mode ADF frame time of the digital twin (512x512), against a naive baseline in the same run.

Measured (median of repeats, wall time, after warm-up):
- ``render``: the noiseless image (atom placement with drift, FFT convolution with the probe);
- ``frame``: a full frame as the twin makes it: render + Poisson/read noise + ground truth
  (``of_which_poisson_ms``: numpy's Poisson sampler alone on the same 512x512 means);
- ``acquire``: ``TwinDriver.acquire`` on a virtual clock (adds scan-dose dynamics and bookkeeping);
- baseline ``naive``: the same image made by stamping each atom's point-spread function
  (probe intensity x thermal blur, tabulated once, interpolated at every pixel within 3 Å of
  the atom) in a Python loop over atoms, which is how one would write it first.

Prints one JSON object. Usage: ``python benchmarks/bench_twin_fast.py [repeats]``.
"""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import time

import numpy as np
from scipy.ndimage import map_coordinates

from stemagent.clock import VirtualClock
from stemagent.simulators.fast_adf import ADFModel, psf, render_fraction
from stemagent.simulators.optics import ProbeOptics
from stemagent.simulators.render import render_frame
from stemagent.simulators.scan import DriftModel, atom_scan_pixels
from stemagent.simulators.specimens import build_specimen
from stemagent.simulators.twin import TwinDriver
from stemagent.types import ScanGeometry


def median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


async def _acquire_ms(twin: TwinDriver, geo: ScanGeometry, repeats: int) -> float:
    """Median ``acquire`` time inside one running event loop (as the agent calls it)."""
    await twin.acquire(geo)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        await twin.acquire(geo)
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def naive(shape, pixel_A, rc, sigma, u, optics) -> np.ndarray:
    table_spacing = 0.05
    table = psf(optics, float(u[0]), spacing_A=table_spacing, size_A=6.4)
    n = table.shape[0]
    rows, cols = shape
    px = pixel_A[0]
    half = int(np.ceil(3.0 / px))
    img = np.zeros(shape)
    for (r, c), w in zip(rc, sigma):
        r0, c0 = int(round(r)), int(round(c))
        rr = np.arange(max(0, r0 - half), min(rows, r0 + half + 1))
        cc = np.arange(max(0, c0 - half), min(cols, c0 + half + 1))
        if len(rr) == 0 or len(cc) == 0:
            continue
        dy = (rr[:, None] - r) * px / table_spacing + n // 2
        dx = (cc[None, :] - c) * px / table_spacing + n // 2
        dy, dx = np.broadcast_arrays(dy, dx)
        img[np.ix_(rr, cc)] += w * map_coordinates(table, [dy, dx], order=1)
    return img


def main(repeats: int = 20) -> dict:
    optics = ProbeOptics(energy_keV=60.0, convergence_mrad=30.0)
    adf = ADFModel()
    geo = ScanGeometry(center_A=(3.0, -2.0), fov_A=(51.2, 51.2), shape_px=(512, 512), rotation_rad=0.2, dwell_s=1e-6)
    drift = DriftModel(velocity_A_per_s=(0.5, 0.2), wobble_amplitude_A=0.2, random_walk_A_per_sqrt_s=0.05, seed=1)
    rng = np.random.default_rng(0)
    out: dict = {
        "benchmark": "twin_fast_adf_512",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "repeats": repeats,
        "results": {},
    }
    for kind in ("graphene", "mos2", "srtio3"):
        spec = build_specimen(kind, size_A=(200.0, 200.0), rng=np.random.default_rng(1))
        ids = spec.in_box((-40.0, -40.0), (40.0, 40.0))
        rc, _ = atom_scan_pixels(geo, spec.positions_A[ids, :2], 0.0, drift)
        sigma = adf.cross_section_A2(spec.numbers[ids])
        u = spec.u_rms_A[ids]
        t_render = median_ms(lambda: render_fraction(geo.shape_px, geo.pixel_size_A, rc, sigma, u, optics, adf), repeats)
        t_frame = median_ms(
            lambda: render_frame(spec, geo, 100.0, rng, optics=optics, adf=adf, drift=drift, jitter_A=0.05), repeats
        )
        lam = render_fraction(geo.shape_px, geo.pixel_size_A, rc, sigma, u, optics, adf).astype(np.float64) * 100.0
        t_noise = median_ms(lambda: rng.poisson(lam), repeats)
        twin = TwinDriver(spec.copy(), clock=VirtualClock(), rng=2, optics=optics, adf=adf, drift=drift, jitter_A=0.05)
        t_acq = asyncio.run(_acquire_ms(twin, geo, max(5, repeats // 2)))
        t0 = time.perf_counter()
        ref = naive(geo.shape_px, geo.pixel_size_A, rc, sigma, u, optics)
        t_naive = 1e3 * (time.perf_counter() - t0)
        fast = render_fraction(geo.shape_px, geo.pixel_size_A, rc, sigma, np.full(len(u), u[0]), optics, adf)
        rel_err = float(np.max(np.abs(fast - ref)) / np.max(ref))
        out["results"][kind] = {
            "atoms_rendered": int(len(ids)),
            "render_ms": round(t_render, 2),
            "frame_ms": round(t_frame, 2),
            "of_which_poisson_ms": round(t_noise, 2),
            "acquire_ms": round(t_acq, 2),
            "naive_ms": round(t_naive, 1),
            "speedup_render_vs_naive": round(t_naive / t_render, 1),
            "speedup_frame_vs_naive": round(t_naive / t_frame, 1),
            "max_abs_diff_vs_naive_rel_to_peak": round(rel_err, 4),
            "target_ms": 20.0,
            "frame_meets_target": bool(t_frame <= 20.0),
        }
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20), indent=2))
