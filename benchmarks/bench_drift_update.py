"""Per-frame cost of ``DriftStage.update`` by phase, this tree against a git revision, in one run.

The twin's frames of ``bench_drift.py`` (MoS2, 512 x 512 at 0.1 Å/px, drift 0.5 Å/s + wobble +
random walk, LoG finder; ~560 tracked atoms) are acquired and segmented first; then two stages,
this tree's and the drift package of ``--baseline`` (extracted from git into a temporary
package), update on the same frames, interleaved frame by frame (which one goes first
alternates), so both see the same machine load. Hyperparameter refits are outside the timed
update (``refit_in_update=False``, ``DriftStage.refit()`` after it, on both stages; timed
separately), so every timed update is the same work. The CPU time of the calling thread
(``time.thread_time``) and of the process (``time.process_time``, which also counts other
threads, e.g. spinning OpenMP workers) is recorded per phase:

- ``tracking``: ``match`` (KD-tree gating, Hungarian on conflicts) and the predicted positions;
- ``gp``: everything in ``DisplacementGP.predict`` / ``set_data`` (conditioning on the new
  observations, the posterior on the window's grid and over the new frame);
- ``observations``: binning the window's sightings into observations, refreshing the references;
- ``other``: the rest of the update (bookkeeping, calibration, the estimate document);
- ``forecast``: one ``forecast(t)`` 0.1 s after the frame (not part of the update);
- ``refit``: ``refit()`` when due.

The estimates of both stages are compared per frame (drift on the frame's grid, its std,
refined positions): the largest absolute difference is reported, it should be ~1e-10 Å or less.

    .venv/bin/python benchmarks/bench_drift_update.py --baseline main --seeds 2 --frames 100
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stemagent.clock import VirtualClock
from stemagent.drift import DriftConfig
from stemagent.simulators import DriftModel, TwinDriver, build_specimen

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_drift import GEOMETRY, WARMUP, _finder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("tracking", "gp", "observations")


def baseline_package(rev: str, where: Path) -> Any:
    """The drift package at git revision ``rev`` as an importable package ``drift_baseline``."""
    pkg = where / "drift_baseline"
    pkg.mkdir(parents=True)
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "src/drift/"], check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], check=True, capture_output=True,
                              text=True).stdout
        text = re.sub(r"stemagent\.drift\b", "drift_baseline", text)
        (pkg / Path(name).name).write_text(text)
    sys.path.insert(0, str(where))
    return importlib.import_module("drift_baseline.stage")


async def frames_of(seed: int, n_frames: int) -> list[tuple[Any, Any]]:
    rng = np.random.default_rng(seed)
    specimen = build_specimen("mos2", size_A=(110.0, 110.0), center_A=(0.0, 0.0), rng=rng)
    angle = rng.uniform(0, 2 * np.pi)
    drift = DriftModel(velocity_A_per_s=(0.5 * np.cos(angle), 0.5 * np.sin(angle)), wobble_amplitude_A=0.3,
                       wobble_period_s=30.0, random_walk_A_per_sqrt_s=0.02, seed=seed)
    twin = TwinDriver(specimen, clock=VirtualClock(), rng=seed, drift=drift, dynamics=False, jitter_A=0.02,
                      beam_current_pA=20.0)
    await twin.connect()
    finder = _finder("log")
    out = []
    for _ in range(n_frames):
        frame = await twin.acquire(GEOMETRY)
        out.append((frame, finder.find(frame)))
    return out


class Timed:
    """A stage of one stage module with per-phase CPU timers (thread and process time, ms)."""

    def __init__(self, stage_module: Any, config: DriftConfig) -> None:
        self.stage = stage_module.DriftStage(config)
        self.acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.rows: list[dict[str, float]] = []
        self._patch(stage_module, "match", "tracking")
        for name in ("_predict_positions",):
            self._patch_method(self.stage, name, "tracking")
        for name in ("_observations", "_refresh_references"):
            self._patch_method(self.stage, name, "observations")
        for name in ("predict", "set_data"):
            self._patch_method(self.stage.gp, name, "gp")

    def _timer(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        depth = [0]

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            t, p = time.thread_time(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                acc = self.acc[label]
                acc[0] += time.thread_time() - t
                acc[1] += time.process_time() - p

        return timed

    def _patch(self, module: Any, name: str, label: str) -> None:
        setattr(module, name, self._timer(getattr(module, name), label))

    def _patch_method(self, obj: Any, name: str, label: str) -> None:
        setattr(obj, name, self._timer(getattr(obj, name), label))

    def step(self, frame: Any, atoms: Any, latency_s: float) -> Any:
        self.acc.clear()
        t, p = time.thread_time(), time.process_time()
        est = self.stage.update(frame, atoms)
        t, p = time.thread_time() - t, time.process_time() - p
        row = {"update_thread_ms": 1e3 * t, "update_process_ms": 1e3 * p}
        inner = [0.0, 0.0]
        for ph in PHASES:
            a = self.acc.get(ph, [0.0, 0.0])
            row[f"{ph}_thread_ms"], row[f"{ph}_process_ms"] = 1e3 * a[0], 1e3 * a[1]
            inner[0] += a[0]
            inner[1] += a[1]
        row["other_thread_ms"], row["other_process_ms"] = 1e3 * (t - inner[0]), 1e3 * (p - inner[1])
        t, p = time.thread_time(), time.process_time()
        self.stage.forecast(frame.end_time_s + latency_s)
        row["forecast_thread_ms"], row["forecast_process_ms"] = 1e3 * (time.thread_time() - t), 1e3 * (time.process_time() - p)
        t, p = time.thread_time(), time.process_time()
        ms = self.stage.refit()
        row["refit_thread_ms"] = 1e3 * (time.thread_time() - t) if ms > 0 else float("nan")
        row["refit_process_ms"] = 1e3 * (time.process_time() - p) if ms > 0 else float("nan")
        row["n_matched"] = float(est.n_matched)
        self.rows.append(row)
        return est


def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys()
    return {k: float(np.nanmedian([r[k] for r in rows])) if not all(np.isnan(r[k]) for r in rows) else float("nan")
            for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default="main", help="git revision whose src/drift is the baseline")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--latency", type=float, default=0.1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    config = DriftConfig(refit_in_update=False)
    new_module = importlib.import_module("stemagent.drift.stage")
    result: dict[str, Any] = {"benchmark": "drift_update", "args": vars(args),
                              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                          "load_average_start": os.getloadavg()}, "per_seed": []}
    with tempfile.TemporaryDirectory() as tmp:
        old_module = baseline_package(args.baseline, Path(tmp))
        all_new, all_old = [], []
        for seed in range(args.seeds):
            frames = asyncio.run(frames_of(seed, args.frames))
            new, old = Timed(new_module, config), Timed(old_module, config)
            diff = {"displacement_A": 0.0, "std_A": 0.0, "refined_A": 0.0}
            for k, (frame, atoms) in enumerate(frames):
                order = (new, old) if k % 2 == 0 else (old, new)
                ests = {id(s): s.step(frame, atoms, args.latency) for s in order}
                en, eo = ests[id(new)], ests[id(old)]
                for key, a, b in (("displacement_A", en.displacement_A, eo.displacement_A), ("std_A", en.std_A, eo.std_A),
                                  ("refined_A", en.refined_positions_A, eo.refined_positions_A)):
                    diff[key] = max(diff[key], float(np.max(np.abs(a - b))) if len(a) else 0.0)
            sn, so = summary(new.rows[WARMUP:]), summary(old.rows[WARMUP:])
            all_new += new.rows[WARMUP:]
            all_old += old.rows[WARMUP:]
            result["per_seed"].append({"seed": seed, "new": sn, "baseline": so, "max_abs_difference": diff})
        sn, so = summary(all_new), summary(all_old)
        result["summary"] = {"new": sn, "baseline": so,
                             "ratio_baseline_over_new": {k: so[k] / sn[k] for k in sn if k.endswith("_ms") and sn[k] > 0}}
    result["machine"]["load_average_end"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
