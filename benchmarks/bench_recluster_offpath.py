"""The encoding stage's recluster on the frame path against off it (issue 17: frame -> command p95).

Replays the frames and atoms of a run log (512 px twin frames; make one with ``bench_loop.py`` or
any ``stemagent run`` with an encoding stage) through :class:`~stemagent.encoding.stage.EncodingStage`
with the per-frame path's settings and a recluster every ``--every`` frames (a schedule, so both
variants recluster on the same frames), in one process, the two variants alternating round by
round: ``recluster_adopt_after_frames`` 0 (the recluster runs on the frame that falls due, as
before 2026-12-02 13:10) and ``--k`` (started there in the tracker's worker thread, adopted k
frames later). Each frame is first segmented by the U-Net on one torch thread (``--no-segment``:
the logged atoms, nothing between the encodings), as the loop's frame path does, so a recluster in
the worker thread has the next frames' segmentation to overlap. Per frame: the encoding stage's
wall time, the calling thread's CPU time (the frame path's own work) and segment + encoding wall
time, for the frames that fall due, that adopt, and the others.

Usage: ``python benchmarks/bench_recluster_offpath.py LOG [--rounds 4] [--every 4] [--k 2]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from stemagent.agent.app.heap import keep_freed_memory
from stemagent.encoding.config import EncodingConfig, PipelineEncodingConfig
from stemagent.encoding.stage import EncodingStage
from stemagent.runlog import RunLog


def one_pass(frames, atoms, every: int, k: int, segmenter=None) -> list[dict]:
    settings = PipelineEncodingConfig(recluster_every=every, min_frames_between=10**6, recluster_adopt_after_frames=k).model_dump(exclude={"log_symmetry"})
    stage = EncodingStage(EncodingConfig(**settings))
    out = []
    try:
        for f, a in zip(frames, atoms):
            s0 = time.perf_counter()
            if segmenter is not None:  # the frame path's other big stage, as in the loop (its atoms are the logged ones)
                a = segmenter.find(f)
            t0, c0 = time.perf_counter(), time.thread_time()
            stage.process(f, a)
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            rep = stage.last_report
            out.append({"frame": f.index, "wall_ms": 1e3 * wall, "cpu_ms": 1e3 * cpu, "frame_ms": 1e3 * (time.perf_counter() - s0),
                        "reclustered": bool(rep.get("reclustered")), "started": bool(rep.get("recluster_started"))})
    finally:
        stage.close()
    return out


def summary(passes: list[list[dict]], k: int) -> dict:
    rows = [r for p in passes for r in p[1:]]  # the first frame founds the classifier in both variants
    due = [r for r in rows if (r["reclustered"] and k == 0) or r["started"]]
    adopt = [r for r in rows if r["reclustered"] and k > 0]
    rest = [r for r in rows if r not in due and r not in adopt]

    def stats(rs: list[dict]) -> dict:
        if not rs:
            return {}
        return {"n": len(rs), "frame_ms_mean": round(float(np.mean([r["frame_ms"] for r in rs])), 1),
                "wall_ms_mean": round(float(np.mean([r["wall_ms"] for r in rs])), 1),
                "wall_ms_max": round(float(np.max([r["wall_ms"] for r in rs])), 1),
                "cpu_ms_mean": round(float(np.mean([r["cpu_ms"] for r in rs])), 1)}

    walls = [r["wall_ms"] for r in rows]
    totals = [r["frame_ms"] for r in rows]
    return {"due_frames": stats(due), "adopting_frames": stats(adopt), "other_frames": stats(rest),
            "encoding_ms_p50": round(float(np.percentile(walls, 50)), 1), "encoding_ms_p95": round(float(np.percentile(walls, 95)), 1),
            "encoding_ms_max": round(float(np.max(walls)), 1),
            "frame_ms_p50": round(float(np.percentile(totals, 50)), 1), "frame_ms_p95": round(float(np.percentile(totals, 95)), 1),
            "frame_ms_max": round(float(np.max(totals)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--no-segment", action="store_true", help="encode the logged atoms only (no U-Net between the frames)")
    args = ap.parse_args()
    keep_freed_memory()
    log = RunLog.open(args.log)
    frames = list(log.frames())
    atoms = log.atoms()
    segmenter = None
    if not args.no_segment:
        from stemagent.segmentation.unet_segmenter import UNetSegmenter  # lazy: torch and the weights only when asked for

        segmenter = UNetSegmenter(num_threads=1)
    by_variant: dict[int, list[list[dict]]] = {0: [], args.k: []}
    t0 = time.time()
    for _ in range(args.rounds):
        for k in (0, args.k):
            by_variant[k].append(one_pass(frames, atoms, args.every, k, segmenter))
    print(json.dumps({"bench": "recluster_offpath", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
                      "load_avg": os.getloadavg(), "log": args.log, "frames": len(frames),
                      "atoms_per_frame": round(float(np.mean([len(a) for a in atoms])), 1), "every": args.every,
                      "on_frame (k=0)": summary(by_variant[0], 0), f"off path (k={args.k})": summary(by_variant[args.k], args.k)}, indent=1))


if __name__ == "__main__":
    main()
