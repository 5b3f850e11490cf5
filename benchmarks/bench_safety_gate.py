"""Safety gate cost per command: the dose map over every cell a footprint touches (stemagent.dose)
vs the previous gate's map, which counted a cell only if its centre lay inside the scan.

Prints JSON: median microseconds per ``check`` and per ``check + record`` of a 256 x 256 survey
scan at random centres in a 300 x 300 Å area, and of a 10 ms park, for
- ``centre_2A``: the old centre-of-cell footprint on 2 Å cells (reimplemented here as the baseline),
- ``overlap_2A``: the new footprint on the same 2 Å cells,
- ``overlap_1A``: the new footprint on 1 Å cells (the new default ``safety.dose_cell_A``),
all in the same process, so the ratios hold under load.
Usage: ``python benchmarks/bench_safety_gate.py [n_commands]``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

from stemagent.agent.safety import SafetyGate
from stemagent.config import SafetyConfig
from stemagent.dose import dose_e_per_A2
from stemagent.types import Park, ScanGeometry, ScanRegion


class CentreGate:
    """The gate's dose rule before issue 10: a cell is dosed iff its centre is inside the scan."""

    def __init__(self, half_width_A: float, cell_A: float, current_pA: float) -> None:
        self.cell_A, self.half, self.current = cell_A, half_width_A, current_pA
        n = int(math.ceil(2 * half_width_A / cell_A))
        self.map = np.zeros((n, n))

    def _cells(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ij = np.floor((np.asarray(xy).reshape(-1, 2) + self.half) / self.cell_A).astype(int)
        n = self.map.shape[0]
        return np.clip(ij[:, 1], 0, n - 1), np.clip(ij[:, 0], 0, n - 1)

    def _footprint(self, cmd):  # type: ignore[no-untyped-def]
        if isinstance(cmd, Park):
            return self._cells(np.asarray(cmd.position_A)), dose_e_per_A2(self.current, cmd.dwell_s, 1.0)
        g = cmd.geometry
        rows, cols = g.shape_px
        corners = g.pixel_to_sample(np.array([[0, 0], [0, cols - 1], [rows - 1, 0], [rows - 1, cols - 1]]))
        r_lo, c_lo = self._cells(corners.min(axis=0))
        r_hi, c_hi = self._cells(corners.max(axis=0))
        cc, rr = np.meshgrid(np.arange(c_lo[0], c_hi[0] + 1), np.arange(r_lo[0], r_hi[0] + 1))
        pts = np.stack([-self.half + (cc.ravel() + 0.5) * self.cell_A, -self.half + (rr.ravel() + 0.5) * self.cell_A], axis=1)
        inside = g.contains(pts)
        px, py = g.pixel_size_A
        return (rr.ravel()[inside], cc.ravel()[inside]), dose_e_per_A2(self.current, g.dwell_s, px * py)

    def check(self, cmd, now_s):  # type: ignore[no-untyped-def]
        cells, d = self._footprint(cmd)
        return float(self.map[cells].max()) + d <= 1e30

    def record(self, cmd, now_s):  # type: ignore[no-untyped-def]
        cells, d = self._footprint(cmd)
        self.map[cells] += d


def commands(n: int, rng: np.random.Generator) -> list:
    out = []
    for _ in range(n):
        c = tuple(rng.uniform(-130.0, 130.0, size=2))
        out.append(ScanRegion(ScanGeometry(center_A=c, fov_A=(25.6, 25.6), shape_px=(256, 256), dwell_s=2e-6,
                                           rotation_rad=float(rng.uniform(0, 0.5)))))
        out.append(Park(c, 0.01))
    return out


def time_gate(gate, cmds: list, record: bool) -> dict[str, float]:  # type: ignore[no-untyped-def]
    scan_us, park_us = [], []
    for i, cmd in enumerate(cmds):
        t = time.perf_counter()
        gate.check(cmd, float(i))
        if record:
            gate.record(cmd, float(i))
        dt = 1e6 * (time.perf_counter() - t)
        (scan_us if isinstance(cmd, ScanRegion) else park_us).append(dt)
    return {"scan_us": round(statistics.median(scan_us), 1), "park_us": round(statistics.median(park_us), 1)}


def main(n: int = 400) -> dict:
    cmds = commands(n, np.random.default_rng(0))
    cfg = dict(area_half_width_A=150.0, max_fov_A=256.0, max_commands_per_s=1e12, dose_budget_e_per_A2=1e30)
    gates = {
        "centre_2A": lambda: CentreGate(150.0, 2.0, 20.0),
        "overlap_2A": lambda: SafetyGate(SafetyConfig(**cfg, dose_cell_A=2.0), beam_current_pA=20.0),
        "overlap_1A": lambda: SafetyGate(SafetyConfig(**cfg, dose_cell_A=1.0), beam_current_pA=20.0),
    }
    out: dict = {"commands": len(cmds), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "load_avg_1min": round(os.getloadavg()[0], 2)}
    for name, make in gates.items():
        time_gate(make(), cmds[:20], record=True)  # warm-up (caches, allocations)
        out[name] = {"check": time_gate(make(), cmds, record=False), "check_record": time_gate(make(), cmds, record=True)}
    base = out["centre_2A"]["check_record"]["scan_us"]
    out["ratio_overlap_1A_vs_centre_2A_scan"] = round(out["overlap_1A"]["check_record"]["scan_us"] / base, 2)
    out["ratio_overlap_2A_vs_centre_2A_scan"] = round(out["overlap_2A"]["check_record"]["scan_us"] / base, 2)
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 400), indent=1))
