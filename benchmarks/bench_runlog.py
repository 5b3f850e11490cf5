"""Run-log write cost per frame: stemagent's Zarr store + fsynced event vs np.save + fsync.

Prints JSON: milliseconds per frame (median over N frames) for each frame size, and the ratio
to the baseline. The baseline writes the same float32 array to its own .npy file and fsyncs it,
the least a crash-safe per-frame writer can do.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stemagent import Atoms, Frame, ScanGeometry
from stemagent.runlog import RunLog, RunLogWriter


def bench(shape: tuple[int, int], n: int, root: Path) -> dict:
    rng = np.random.default_rng(0)
    g = ScanGeometry(shape_px=shape)
    images = [rng.poisson(50, size=shape).astype(np.float32) for _ in range(4)]
    atoms = Atoms(rng.random((2000, 2)) * 50, np.zeros(2000), rng.random(2000), 0)
    ours, base, with_atoms = [], [], []
    w = RunLogWriter(root / f"log-{shape[0]}")
    for i in range(n):
        f = Frame(images[i % 4], g, g.line_start_times_s(i), i, 1.0)
        t = time.perf_counter()
        w.write_frame(f)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        w.write_atoms(atoms)
        with_atoms.append(time.perf_counter() - t)
    w.close()
    bdir = root / f"npy-{shape[0]}"
    bdir.mkdir()
    for i in range(n):
        t = time.perf_counter()
        with open(bdir / f"{i:06d}.npy", "wb") as fh:
            np.save(fh, images[i % 4])
            fh.flush()
            os.fsync(fh.fileno())
        base.append(time.perf_counter() - t)
    t = time.perf_counter()
    frames = list(RunLog.open(root / f"log-{shape[0]}").frames())
    read_s = (time.perf_counter() - t) / len(frames)
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    return {
        "shape": list(shape),
        "frames": n,
        "stemagent_write_ms": round(ms(ours), 3),
        "baseline_npy_fsync_ms": round(ms(base), 3),
        "ratio_vs_baseline": round(ms(ours) / ms(base), 2),
        "atoms_event_2000_ms": round(ms(with_atoms), 3),
        "read_back_ms_per_frame": round(1e3 * read_s, 3),
    }


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    with tempfile.TemporaryDirectory() as d:
        results = [bench(s, n, Path(d)) for s in ((512, 512), (2048, 2048))]
    print(json.dumps({"benchmark": "runlog_write", "machine": f"{platform.machine()} {os.cpu_count()} cores", "results": results}))


if __name__ == "__main__":
    main()
