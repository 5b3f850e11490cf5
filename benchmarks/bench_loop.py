"""The whole agent on the twin: latency per stage, sustained streaming, replay speed (issue 17 targets).

1. **Latency**, 512 x 512 px graphene frames on the physical twin (virtual clock: the twin renders
   as fast as it can; latency is wall time from a frame's arrival to the next command's issue),
   raster policy, one command at a time, for three pipelines in the same run:
   ``log`` (LoG finder + policy, the baseline), ``unet`` (U-Net + policy), ``log+encoding`` and
   ``all`` (U-Net + encoding + policy: every stage on main); the U-Net on one torch thread
   (``num_threads: 1``: on 2 shared cores a second thread makes it 1-5x slower in bursts). Latency p50/p95 and each stage's p50/p95.
   Baseline in the same run: ``log+encoding (before)``, the encoding stage with the settings it had
   before its recluster budget (recluster on the first unexplained atom, torch's threads), and
   ``all (before)``, that and the U-Net on torch's threads (``--threads``); both with the run
   log's element-by-element JSON conversion as it was.
2. **Replay**: ``replay --verify`` of the ``log``, ``log+encoding``, ``all``, ``every stage`` and ``unet``
   runs: wall and CPU time against the run's acquisition time span (x real time), and whether every
   output was reproduced; baselines in the same run (:data:`REPLAY_VARIANTS`): ``(stages ahead)``
   the stages after the segmenter each on a thread of its own, ``(no stages ahead)`` on the main thread, ``(session 6)`` that and the JSON-text comparison
   (main at 14:11), ``(one worker)`` the U-Net segmenting ahead on one worker thread instead of two,
   ``(one thread)`` nothing ahead, ``(before)`` also the comparison walked field by field. ``--heap default`` runs everything without the heap setting
   the ``stemagent`` command makes (``stemagent.agent.app.heap``), for its baseline.
3. **Sustained stream** on the twin at real time, 4 frames/s (512 x 512 px at 0.95 µs), a policy
   that keeps asking for the same field, ``--sustain-pipeline`` (``log+encoding``: what this CPU
   can keep up with), overlap off (one command at a time) and
   on (streaming, newest frame wins), ``--sustain-s`` seconds each: analysed frames/s, drops,
   peak RSS and its samples (flat after warm-up?), and lost log entries (frames acquired that
   have no ``frames`` event: must be 0).

Prints one JSON document. Usage:
``python benchmarks/bench_loop.py [--frames 20] [--unet-frames 12] [--sustain-s 60] [--threads 2]
[--only-sustain] [--sustain-modes both|sequential|overlap]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stemagent.agent.app.factory import build_agent, build_clock
from stemagent.agent.app.heap import keep_freed_memory
from stemagent.agent.app.report import stage_timings
from stemagent.agent.control import ControlMessage
from stemagent.config import config_from_dict
from stemagent.agent.app.replay_log import verify_run_log
from stemagent.pipeline import verify as verify_module
from stemagent.runlog import writer as writer_module
from stemagent.runlog import RunLog
from stemagent.stages import Observation
from stemagent.types import Decision, ScanRegion

BASE: dict[str, Any] = {
    "name": "bench-loop", "seed": 3,
    "driver": {"kind": "twin", "specimen": "graphene", "specimen_size_A": 160.0, "n_si": 20, "vacancy_per_nm2": 0.005,
               "pace": "fast"},
    "scan": {"fov_A": 51.2, "shape_px": 512, "dwell_s": 2e-6},
    "policy": {"kind": "raster", "overlap": 0.1},
    "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0, "dose_budget_e_per_A2": 1e12},
    "log": {"fsync": False},
}
PIPELINES = {
    "log": {"segmenter": {"kind": "log"}},
    "unet": {"segmenter": {"kind": "unet", "device": "auto", "num_threads": 1}},
    "log+encoding": {"segmenter": {"kind": "log"}, "encoding": {}},
    "all": {"segmenter": {"kind": "unet", "device": "auto", "num_threads": 1}, "encoding": {}},
    # the stages issue 17 names: U-Net -> drift -> encoding -> policy
    "unet+drift+encoding": {"segmenter": {"kind": "unet", "device": "auto", "num_threads": 1}, "drift": {}, "encoding": {}},
    # every stage there is: U-Net -> drift -> encoding -> rVAE latents -> policy
    "every stage": {"segmenter": {"kind": "unet", "device": "auto", "num_threads": 1}, "drift": {}, "encoding": {}, "rvae": {}},
    # its baseline in the same run: the encoding stage's recluster on the frame that falls due (before 2026-12-02 13:10)
    "every stage (recluster on frame)": {"segmenter": {"kind": "unet", "device": "auto", "num_threads": 1}, "drift": {},
                                         "encoding": {"recluster_adopt_after_frames": 0}, "rvae": {}},
    # the U-Net in the contiguous NCHW layout it ran in before channels-last became the default
    "all (NCHW)": {"segmenter": {"kind": "unet", "device": "auto", "num_threads": 1, "channels_last": False}, "encoding": {}},
}
#: the baseline of the encoding stage's recluster budget, in the same run: the settings main had
#: before it (recluster on the first unexplained atom, labels from the pool's clusters, torch's threads)
BEFORE_ENCODING = {"min_unexplained": 1, "min_unexplained_fraction": 0.0, "min_frames_between": 0, "relabel": False,
                   "num_threads": None}
PIPELINES_BEFORE = {"log+encoding (before)": {"segmenter": {"kind": "log"}, "encoding": BEFORE_ENCODING},
                    "all (before)": {"segmenter": {"kind": "unet", "device": "auto"}, "encoding": BEFORE_ENCODING}}
SLOW = ("unet", "all", "unet+drift+encoding", "every stage", "every stage (recluster on frame)", "all (NCHW)", "all (before)")
THREADS = {"torch": 2}  # --threads: torch's threads at the start of every run (a U-Net with num_threads changes them)  # U-Net on a CPU: seconds per 512 px frame, run for --unet-frames


class Stare:
    """Asks for the field it was shown, again and again (a survey's overview stream)."""

    name = "stare"

    def decide(self, obs: Observation) -> Decision:
        return Decision(ScanRegion(obs.geometry), self.name, "the same field again")


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s, self.samples, self._stop = every_s, [], threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append((round(time.perf_counter() - self._t0, 1), round(rss_mib(), 1)))

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


async def one_run(cfg_dict: dict[str, Any], out: Path, stare: bool = False, stop_after_s: float | None = None) -> tuple[Any, str]:
    cfg = config_from_dict(cfg_dict)
    torch.set_num_threads(THREADS["torch"])
    agent = await build_agent(cfg, run_dir=out, clock=build_clock(cfg))
    if stare:
        agent.policy = Stare()
    if stop_after_s is not None:
        asyncio.get_running_loop().call_later(stop_after_s, agent.control, ControlMessage(command="stop"))
    summary = await agent.run()
    return summary, summary.log_path


#: the runs the replay part replays (``--replay-only`` runs just these)
REPLAYED = ("log", "log+encoding", "all", "every stage", "unet")


def latency(frames: int, tmp: Path, unet_frames: int, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, pipe in {**PIPELINES, **PIPELINES_BEFORE}.items():
        if only is not None and name not in only:
            continue
        cfg = {**BASE, "max_frames": unet_frames if name in SLOW else frames, "pipeline": pipe}
        fast = writer_module.fast_jsonable
        if name in PIPELINES_BEFORE:  # and the run log's conversion as it was (the element walk)
            writer_module.fast_jsonable = writer_module._jsonable
        try:
            summary, log_path = asyncio.run(one_run(cfg, tmp / f"lat-{name}"))
        finally:
            writer_module.fast_jsonable = fast
        lat = np.asarray(list(summary.latencies_s)[1:]) * 1e3  # the first frame warms torch and the library up
        stages = stage_timings(RunLog.open(log_path))
        enc = [(d.get("records") or {}).get("encoding") or {} for d in RunLog.open(log_path).event_data("pipeline")]
        out[name] = {
            "frames": summary.frames, "exit": summary.exit_status, "atoms_per_frame": round(summary.atoms_per_frame, 1),
            "reclustered_frames": [i for i, e in enumerate(enc) if e.get("reclustered")],
            "recluster_started_frames": [i for i, e in enumerate(enc) if e.get("recluster_started")],
            "library_size": max((e.get("library_size", 0) for e in enc), default=0),
            "latency_ms_by_frame": [round(v, 1) for v in lat],
            "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p95": float(np.percentile(lat, 95)),
            "stages_ms": {s: {"p50": round(t["p50_ms"], 2), "p95": round(t["p95_ms"], 2)} for s, t in stages.items()},
            "log": log_path,
        }
    return out


#: the replay variants, each in the same run: (overlap, staged, segment_workers, comparison); comparison
#: ``values`` (the numeric fast path, then JSON text, then the walk: now), ``text`` (JSON text, then the
#: walk: session 6), ``walk`` (field by field: before the JSON-text fast path)
REPLAY_VARIANTS: dict[str, tuple[bool, bool | None, int | None, str]] = {
    "now": (True, None, None, "values"),  # the later stages ahead where each thread has a core (not on 2 cores)
    "stages ahead": (True, True, None, "values"),  # the later stages ahead on their own threads, whatever the cores
    "no stages ahead": (True, False, None, "values"),  # the later stages on the main thread
    "session 6": (True, False, None, "text"),  # as main had it at 14:11 (two segmenting workers, text comparison)
    "one worker": (True, None, 1, "values"),  # one segmenting worker (U-Net logs only)
    "one thread": (False, False, None, "values"),  # nothing ahead
    "before": (False, False, None, "walk"),  # nothing ahead, the comparison walked field by field
}


def replay_speed(runs: dict[str, Any], rounds: int = 1, variants: tuple[str, ...] = tuple(REPLAY_VARIANTS)) -> dict[str, Any]:
    """``replay --verify`` of each run (as the command does it), and in the same run the baselines of
    :data:`REPLAY_VARIANTS`. ``cpu_s``: the process's CPU time (all threads); ``cpu_s_threads``: the
    main thread's, the segmenting workers' together and each stage's own thread's. ``rounds`` > 1:
    every variant of a log once per round, the variants alternating (a shared machine's load
    changes between them); ``x_real_time`` is then the median over the rounds, each in ``x_by_round``."""
    out: dict[str, Any] = {"load_avg_start": os.getloadavg()}
    for name, variant, (overlap, staged, workers, comparison) in [
            (n, v, REPLAY_VARIANTS[v]) for n in REPLAYED if n in runs for _ in range(rounds) for v in variants]:
        if variant == "one worker" and name not in SLOW:
            continue  # only the U-Net declares per_frame: the LoG always segments ahead on one worker
        log = RunLog.open(runs[name]["log"])
        values, text = verify_module.same_values, verify_module.same_text
        if comparison != "values":
            verify_module.same_values = lambda logged, replayed: False  # type: ignore[assignment]
        if comparison == "walk":
            verify_module.same_text = lambda logged, replayed: False  # type: ignore[assignment]
        c0 = time.process_time()
        try:
            rep = verify_run_log(log, Path(runs[name]["log"]), overlap=overlap, segment_workers=workers, staged=staged)
        finally:
            verify_module.same_values, verify_module.same_text = values, text
        key = name if variant == "now" else f"{name} ({variant})"
        by_round = (out.get(key) or {}).get("x_by_round", []) + [round(rep.speed, 2)]
        ok = rep.ok and (out.get(key) or {}).get("ok", True)
        out[key] = {
            "ok": ok, "observations": rep.observations, "elapsed_s": round(rep.elapsed_s, 3),
            "cpu_s": round(time.process_time() - c0, 3),
            "cpu_s_threads": {k: round(v, 3) for k, v in rep.cpu_s.items()},
            "run_span_s": round(rep.run_span_s, 3), "x_real_time": round(float(np.median(by_round)), 2),
            "x_by_round": by_round, "first_divergence": rep.divergences[0].describe() if rep.divergences else ""}
    out["load_avg_end"] = os.getloadavg()
    return out


def sustained(seconds: float, tmp: Path, pipeline: str, modes: tuple[bool, ...] = (False, True)) -> dict[str, Any]:
    out: dict[str, Any] = {"pipeline": pipeline}
    frame_s = 512 * 512 * 0.95e-6
    for overlap in modes:
        cfg = {**BASE, "max_frames": 10**6, "pipeline": PIPELINES[pipeline], "scan": {**BASE["scan"], "dwell_s": 0.95e-6},
               "driver": {**BASE["driver"], "pace": "realtime"}, "agent": {"overlap": overlap, "stream_burst_frames": 8}}
        t0 = time.perf_counter()
        with RssSampler() as rss:
            summary, log_path = asyncio.run(one_run(cfg, tmp / f"sustain-{overlap}", stare=True, stop_after_s=seconds))
        wall = time.perf_counter() - t0
        log = RunLog.open(log_path)
        frames_logged = len(log.event_data("frames"))
        acquired = summary.frames + summary.frames_dropped
        samples = rss.samples
        half = [r for t, r in samples if t > wall / 2]
        first = [r for t, r in samples if wall / 4 < t <= wall / 2]
        out["overlap" if overlap else "sequential"] = {
            "wall_s": round(wall, 1), "frame_time_s": round(frame_s, 4), "frames_analysed": summary.frames,
            "frames_dropped": summary.frames_dropped, "analysed_per_s": round(summary.frames / wall, 2),
            "acquired_per_s": round(acquired / wall, 2), "latency_ms_p95": round(summary.latency_ms_p95, 1),
            "frames_logged": frames_logged, "lost_log_entries": acquired - frames_logged,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_second_quarter_mib": round(float(np.mean(first)), 1) if first else None,
            "rss_second_half_mib": round(float(np.mean(half)), 1) if half else None,
            "rss_samples": samples[:: max(1, len(samples) // 30)],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--unet-frames", type=int, default=None, help="frames of the U-Net pipelines (default: --frames)")
    ap.add_argument("--sustain-s", type=float, default=60.0)
    ap.add_argument("--replay-only", action="store_true", help="run only the pipelines the replay part replays")
    ap.add_argument("--replay-pipelines", default=",".join(REPLAYED), help="comma-separated runs to replay (with --replay-only: to run)")
    ap.add_argument("--replay-rounds", type=int, default=1, help="replay every variant of a log this many times, alternating")
    ap.add_argument("--replay-variants", default=",".join(REPLAY_VARIANTS), help="comma-separated names of REPLAY_VARIANTS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only-sustain", action="store_true", help="skip the latency and replay parts")
    ap.add_argument("--sustain-modes", default="both", choices=("both", "sequential", "overlap"))
    ap.add_argument("--sustain-pipeline", default="log+encoding", choices=sorted(p for p in PIPELINES if "(" not in p))
    ap.add_argument("--heap", default="keep", choices=("keep", "default"),
                    help="keep: glibc keeps freed memory for reuse, as the stemagent command sets it (since 2026-12-02); "
                         "default: the allocator's own thresholds (large blocks mapped and unmapped one by one)")
    args = ap.parse_args()
    if args.heap == "keep":
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    THREADS["torch"] = args.threads
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.time()
        replayed = tuple(p for p in args.replay_pipelines.split(",") if p)
        if sorted(set(replayed) - set(REPLAYED)):
            raise SystemExit(f"--replay-pipelines: {sorted(set(replayed) - set(REPLAYED))} are not among {list(REPLAYED)}")
        lat = (latency(args.frames, tmp, args.unet_frames or args.frames, replayed if args.replay_only else None)
               if not args.only_sustain else {})
        variants = tuple(v for v in args.replay_variants.split(",") if v)
        unknown = sorted(set(variants) - set(REPLAY_VARIANTS))
        if unknown:
            raise SystemExit(f"--replay-variants: {unknown} are not among {list(REPLAY_VARIANTS)}")
        rep = replay_speed({k: v for k, v in lat.items() if k in replayed}, max(1, args.replay_rounds), variants) if lat else {}
        modes = {"both": (False, True), "sequential": (False,), "overlap": (True,)}[args.sustain_modes]
        sus = sustained(args.sustain_s, tmp, args.sustain_pipeline, modes) if args.sustain_s > 0 else {}
        for v in lat.values():
            v.pop("log")
    print(json.dumps({
        "bench": "loop", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)), "load_avg": os.getloadavg(),
        "torch_threads": args.threads, "cuda": torch.cuda.is_available(), "frame_px": 512, "heap": args.heap,
        "latency": lat, "replay": rep, "sustained": sus,
    }, indent=1))


if __name__ == "__main__":
    main()
