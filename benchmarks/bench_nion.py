"""The Nion path: its overhead over Nion's own ``record_immediate``, and the twin seen through usim.

One headless Nion simulated microscope (nionswift-usim) whose scan-data generator is the twin
(graphene with Si, no beam-induced dynamics so every frame costs the same).

1. **Overhead** (target ≤ 10%): 512x512 frames at 1 µs (a 0.26 s scan), side by side in one run,
   interleaved ``raw, backend, bridge`` ``--repeat`` times:

   - ``raw``: ``scan_hardware_source.record_immediate(frame_parameters)`` called directly (the
     beam unblanked first, as the backend does), the floor any Nion client pays;
   - ``backend``: ``NionDriver.acquire(geometry)`` (geometry -> Nion units, channel check,
     unblank, the record in the worker thread, calibrations -> Å, time stamps, dose, a ``Frame``);
   - ``bridge``: ``ZmqDriver.acquire`` through an in-process ``Bridge`` on that backend (wire
     protocol over loopback TCP) — not part of the target, reported for scale.

   Reported: median wall time of each, the ratio of medians and a bootstrap 95% interval of the
   median of the per-round ratios ``backend / raw``.

2. **Twin through usim vs the direct twin** (target: the same F1 and RMSE within noise): the
   same twin (same config and seed) scanned ``--frames`` times directly (``TwinDriver.acquire`` on a
   virtual clock) and through Nion (``NionDriver.acquire``), at the same seeded random centres and
   rotations; atoms found with the LoG finder of ``configs/zmq-nion-usim.yaml`` and placed with
   each frame's own geometry (for the Nion path: the geometry Nion reported) are matched to the
   twin's truth of that frame (radius 0.5 Å, 1 Å border left out, as ``simulators/scoring.py``).
   With the same seed both paths draw the same noise, so the images should be equal: the largest
   pixel difference is reported too; the direct twin with another noise stream (same specimen)
   gives the scale of "within noise".

    python benchmarks/bench_nion.py [--repeat 15] [--frames 20]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from stemagent.clock import VirtualClock
from stemagent.config import TwinConfig
from stemagent.drivers.bridge import Bridge
from stemagent.drivers.nion import geometry as ng
from stemagent.drivers.nion.backend import NionDriver
from stemagent.drivers.nion.config import NionConfig, UsimConfig
from stemagent.drivers.zmq_driver import ZmqDriver
from stemagent.segmentation.classical import LoGFinder
from stemagent.segmentation.metrics import match
from stemagent.simulators.factory import twin_from_config
from stemagent.types import Frame, ScanGeometry

TWIN = TwinConfig(specimen="graphene", specimen_size_A=120.0, n_si=12, beam_current_pA=30.0, dynamics=False)
SEED = 11


def bootstrap_median_ci(x: np.ndarray, rng: np.random.Generator, n: int = 4000) -> tuple[float, float]:
    meds = np.median(rng.choice(x, size=(n, len(x)), replace=True), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def score(frame: Frame, truth: Any, radius_A: float = 0.5, margin_A: float = 1.0) -> tuple[int, int, int, np.ndarray]:
    """(tp, fp, fn, squared errors) of the LoG finder's atoms against the frame's truth."""
    g = frame.geometry
    found = LoGFinder(sigma_A=0.45, threshold=0.15, min_separation_A=1.0).find(frame).positions_A
    tg = truth.geometry
    real = np.array(["vacancy" not in truth.class_names[k] for k in truth.labels], dtype=bool)
    true_xy = tg.pixel_to_sample(truth.pixels_rc[real])
    keep_t = tg.contains(true_xy, margin_A)
    keep_p = g.contains(found, margin_A)
    res = match(found, np.zeros(len(found)), true_xy[keep_t], np.zeros(keep_t.sum()), radius_A, count_pred=keep_p)
    d2 = np.sum((found[res.pred_idx] - true_xy[keep_t][res.true_idx]) ** 2, axis=1)
    return res.tp.get(0, 0), res.fp.get(0, 0), res.fn.get(0, 0), d2


def summarise(parts: list[tuple[int, int, int, np.ndarray]], rng: np.random.Generator) -> dict[str, Any]:
    tp, fp, fn = (sum(p[i] for p in parts) for i in range(3))
    d2 = np.concatenate([p[3] for p in parts])
    f1_frames = np.array([2 * p[0] / max(1, 2 * p[0] + p[1] + p[2]) for p in parts])
    boot = rng.choice(len(parts), size=(2000, len(parts)), replace=True)
    f1_ci = np.percentile(f1_frames[boot].mean(axis=1), [2.5, 97.5])
    return {"f1": 2 * tp / (2 * tp + fp + fn), "f1_frame_mean_ci95": [float(v) for v in f1_ci],
            "rmse_A": float(np.sqrt(d2.mean())), "tp": tp, "fp": fp, "fn": fn}


async def overhead(backend: NionDriver, repeat: int, rng: np.random.Generator) -> dict[str, Any]:
    g = ScanGeometry(center_A=(0.0, 0.0), fov_A=(51.2, 51.2), shape_px=(512, 512), dwell_s=1e-6)
    hs = backend._hardware_source()
    sc = hs.stem_controller
    fp = hs.get_frame_parameters_from_dict(ng.frame_parameters(g))
    loop = asyncio.get_running_loop()

    def raw() -> None:
        sc.SetVal("C_Blank", 0.0)
        xd = hs.record_immediate(fp)
        assert xd and xd[0] is not None and xd[0].data.shape == (512, 512)

    bridge = Bridge(backend, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", client_timeout_s=30.0)
    await bridge.start()
    serve = asyncio.ensure_future(bridge.serve())
    client = ZmqDriver(bridge.control_endpoint, bridge.frames_endpoint, request_timeout_s=30.0, seed=3)
    await client.connect()
    times: dict[str, list[float]] = {"raw": [], "backend": [], "bridge": []}
    try:
        await backend.acquire(g)  # warm up all three paths
        await client.acquire(g)
        await loop.run_in_executor(None, raw)
        for _ in range(repeat):
            t = time.perf_counter()
            await loop.run_in_executor(None, raw)  # a thread, as any client of a blocking API would
            times["raw"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await backend.acquire(g)
            times["backend"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await client.acquire(g)
            times["bridge"].append(time.perf_counter() - t)
    finally:
        await client.close()
        bridge.stop()
        await serve
        await bridge.close()
    raw_t, be_t, br_t = (np.array(times[k]) for k in ("raw", "backend", "bridge"))
    ratio = be_t / raw_t
    lo, hi = bootstrap_median_ci(ratio, rng)
    return {
        "frame": "512x512, 1 us dwell (scan 0.262 s)",
        "median_s": {k: float(np.median(v)) for k, v in times.items()},
        "backend_over_raw": float(np.median(be_t) / np.median(raw_t)),
        "backend_over_raw_paired_median": float(np.median(ratio)),
        "backend_over_raw_ci95": [lo, hi],
        "bridge_over_raw": float(np.median(br_t) / np.median(raw_t)),
        "target_max": 1.10,
    }


async def detection(backend: NionDriver, frames: int, rng: np.random.Generator) -> dict[str, Any]:
    direct = twin_from_config(TWIN, clock=VirtualClock(), seed=SEED)
    other = twin_from_config(TWIN, clock=VirtualClock(), seed=SEED)  # the same specimen ...
    other.rng = np.random.default_rng(SEED + 1000)  # ... with other noise: the scale of "within noise"
    gen = backend.generator
    geometries = [ScanGeometry(center_A=tuple(rng.uniform(-40, 40, 2)), fov_A=(25.6, 25.6), shape_px=(256, 256),
                               rotation_rad=float(rng.uniform(-np.pi, np.pi)) if i % 2 else 0.0, dwell_s=4e-6)
                  for i in range(frames)]
    parts_d, parts_o, parts_n, max_diff, t_nion = [], [], [], 0.0, 0.0
    for g in geometries:
        fd = await direct.acquire(g)
        parts_d.append(score(fd, direct.ground_truth.frame_truth(fd.index)))
        fo = await other.acquire(g)
        parts_o.append(score(fo, other.ground_truth.frame_truth(fo.index)))
        t = time.perf_counter()
        fn = await backend.acquire(g)
        t_nion += time.perf_counter() - t
        truth = gen.frame_truth(len(gen.frame_indices) - 1)
        parts_n.append(score(fn, truth))
        max_diff = max(max_diff, float(np.max(np.abs(fn.image - fd.image))))
    d, o, n = summarise(parts_d, rng), summarise(parts_o, rng), summarise(parts_n, rng)
    return {"frames": frames, "frame": "256x256, 25.6 A, 4 us dwell, random centres, half rotated",
            "direct_twin": d, "through_usim": n, "direct_twin_other_noise": o, "f1_difference": n["f1"] - d["f1"],
            "rmse_difference_A": n["rmse_A"] - d["rmse_A"], "max_abs_image_difference": max_diff,
            "nion_frame_s_mean": t_nion / frames}


async def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--frames", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    cfg = NionConfig(mode="usim", usim=UsimConfig(twin=TWIN, seed=SEED), call_timeout_s=60.0)
    # detection first, on a fresh twin, so both paths start from the same random state
    det_backend = NionDriver.from_config(cfg)
    await det_backend.connect()
    try:
        det = await detection(det_backend, args.frames, rng)
    finally:
        await det_backend.close()
    ovh_backend = NionDriver.from_config(cfg)
    await ovh_backend.connect()
    try:
        ovh = await overhead(ovh_backend, args.repeat, rng)
    finally:
        await ovh_backend.close()
    return {
        "benchmark": "bench_nion",
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_1min_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
        "nion": "nionswift-instrumentation 23.6.2, nionswift-usim 5.4.2, headless",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "overhead": ovh,
        "detection": det,
    }


if __name__ == "__main__":
    result = asyncio.run(main())
    print(json.dumps(result, indent=2))
