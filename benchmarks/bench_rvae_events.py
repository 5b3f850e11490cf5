"""rVAE events (issue 18, item 3's target): on twin sequences of graphene with Si under the beam
(beam-induced Si-C hops and knock-on vacancies, the twin's event log as truth), the events found
from jumps in the atoms' latent trajectories (``stemagent analyze-latents``) against the twin's
events: precision and recall, target >= 0.9 at 1e4 e/Å² per frame.

Each sequence is a real closed-loop run (``stemagent run``'s code path: the twin driver, the
segmenter, the ``pipeline.rvae`` stage with the shipped weights, the run log), scanning one field
``--frames`` times; then the log is analysed exactly as the command does
(:func:`stemagent.agent.app.cli_latents.analyze`), with the twin's truth written beside the log.

::

    nice -n 10 .venv/bin/python benchmarks/bench_rvae_events.py                   # 3 sequences x 100 frames
    nice -n 10 .venv/bin/python benchmarks/bench_rvae_events.py --sequences 1 --frames 30   # a quick look

Prints one JSON document (also written to ``--json``); ``--keep DIR`` keeps the logs and outputs;
``--reanalyze DIR`` analyses the logs a ``--keep DIR`` run kept (``DIR/run-<seed>``, with their
twin truth) with the current settings, without running the twin again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from stemagent.agent.app.cli_latents import analyze
from stemagent.agent.app.factory import build_agent, build_clock
from stemagent.agent.app.latent_log import write_twin_truth
from stemagent.encoding.pathways import DEFAULT_N_SIGMA, DEFAULT_WINDOWS
from stemagent.config import config_from_dict
from stemagent.dose import dose_e_per_A2


def run_config(seed: int, frames: int, dose: float, args: argparse.Namespace) -> dict[str, Any]:
    px_A = args.fov_A / args.shape_px
    dwell = dose / dose_e_per_A2(args.current_pA, 1.0, px_A ** 2)
    seg: dict[str, Any] = {"kind": "unet", "device": "cpu"} if args.segmenter == "unet" else {"kind": "log"}
    pipeline: dict[str, Any] = {"segmenter": seg, "rvae": {"device": "cpu"}}
    if args.drift:
        pipeline["drift"] = {}
    return {
        "name": f"rvae-events-{seed}", "seed": seed, "max_frames": frames,
        "driver": {"kind": "twin", "specimen": "graphene", "specimen_size_A": 60.0, "n_si": args.n_si, "vacancy_per_nm2": args.vacancies,
                   "beam_current_pA": args.current_pA, "si_swap_barn": args.swap_barn, "c_knock_on_barn": args.knock_on_barn,
                   "jitter_A": 0.03, "dynamics": True, "pace": "fast",
                   **({"drift_velocity_A_per_s": [0.05, -0.03]} if args.drift else {})},
        "scan": {"fov_A": args.fov_A, "shape_px": args.shape_px, "dwell_s": dwell},
        "pipeline": pipeline,
        "policy": {"kind": "raster", "overlap": 0.0},
        "safety": {"area_half_width_A": args.fov_A / 2 + 5.0,  # one field (the raster has one centre); room for drift
                   "max_fov_A": 60.0, "dose_budget_e_per_A2": 1e10},
        "log": {"fsync": False},
    }


def one_sequence(seed: int, args: argparse.Namespace, where: Path) -> dict[str, Any]:
    cfg = config_from_dict(run_config(seed, args.frames, args.dose, args))
    run_dir = where / f"run-{seed}"

    async def go() -> Any:
        agent = await build_agent(cfg, run_dir=run_dir, clock=build_clock(cfg))
        agent.driver.ground_truth.frames = deque()  # keep every frame's truth (the twin keeps 16)
        summary = await agent.run()
        return agent, summary

    t0, c0 = time.perf_counter(), time.process_time()
    agent, summary = asyncio.run(go())
    run_s, run_cpu = time.perf_counter() - t0, time.process_time() - c0
    write_twin_truth(summary.log_path, agent.driver.ground_truth)
    kinds: dict[str, int] = {}
    for e in agent.driver.ground_truth.events:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    t0, c0 = time.perf_counter(), time.process_time()
    res = analyze(Path(summary.log_path), where / f"latents-{seed}", windows=[int(w) for w in args.windows.split(",")], n_sigma=args.n_sigma, figures=args.figures)
    return {"seed": seed, "exit": summary.exit_status, "reason": summary.reason, "frames": res["frames"], "twin_events": kinds, "tracks": res["tracks"],
            "states": res["states"], "events": res["events"], "event_groups": res["event_groups"], "score": res["vs_twin_events"],
            "run_wall_s": round(run_s, 1), "run_cpu_s": round(run_cpu, 1),
            "analyze_wall_s": round(time.perf_counter() - t0, 2), "analyze_cpu_s": round(time.process_time() - c0, 2)}


def reanalyze(seed: int, args: argparse.Namespace, where: Path) -> dict[str, Any]:
    """The analysis of a kept log (``--reanalyze``): the same fields as :func:`one_sequence`."""
    run_dir = where / f"run-{seed}"
    if not run_dir.is_dir():
        raise SystemExit(f"--reanalyze: {run_dir} does not exist (keep the logs with --keep first)")
    truth = json.loads((run_dir / "twin_truth.json").read_text(encoding="utf-8"))
    kinds: dict[str, int] = {}
    for e in truth.get("events", []):
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    t0, c0 = time.perf_counter(), time.process_time()
    res = analyze(run_dir, where / f"latents-{seed}", windows=[int(w) for w in args.windows.split(",")], n_sigma=args.n_sigma, figures=args.figures)
    return {"seed": seed, "frames": res["frames"], "twin_events": kinds, "tracks": res["tracks"], "states": res["states"],
            "events": res["events"], "event_groups": res["event_groups"], "score": res["vs_twin_events"],
            "analyze_wall_s": round(time.perf_counter() - t0, 2), "analyze_cpu_s": round(time.process_time() - c0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=3)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--dose", type=float, default=1e4, help="dose per frame, e/Å²")
    ap.add_argument("--seed", type=int, default=101, help="first sequence seed (seeds 106-110 were used to choose --windows, --n-sigma and the grouping)")
    ap.add_argument("--segmenter", choices=("unet", "log"), default="unet")
    ap.add_argument("--drift", action="store_true", help="twin drift and the drift stage")
    ap.add_argument("--fov-A", type=float, default=25.6)
    ap.add_argument("--shape-px", type=int, default=128)
    ap.add_argument("--current-pA", type=float, default=30.0)
    ap.add_argument("--n-si", type=int, default=30)
    ap.add_argument("--vacancies", type=float, default=0.02, help="initial vacancies per nm²")
    ap.add_argument("--swap-barn", type=float, default=100.0, help="raised Si-C swap cross-section (the physical 0.1 b gives ~no hops)")
    ap.add_argument("--knock-on-barn", type=float, default=2.0, help="raised knock-on cross-section")
    ap.add_argument("--windows", default=",".join(map(str, DEFAULT_WINDOWS)), help="jump windows (frames), comma-separated")
    ap.add_argument("--n-sigma", type=float, default=DEFAULT_N_SIGMA)
    ap.add_argument("--figures", action="store_true")
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reanalyze", type=Path, default=None, help="analyse the logs kept in this folder by an earlier --keep run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread",
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_before": os.getloadavg()[0],
                           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if args.reanalyze is not None:
        seqs = [reanalyze(args.seed + i, args, args.reanalyze) for i in range(args.sequences)]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            where = args.keep or Path(tmp)
            where.mkdir(parents=True, exist_ok=True)
            seqs = [one_sequence(args.seed + i, args, where) for i in range(args.sequences)]
    out["sequences"] = seqs
    tot = {k: sum((s["score"] or {}).get(k) or 0 for s in seqs) for k in ("true_events", "observable_true_events", "detected_groups")}
    missed: dict[str, int] = {}
    for s in seqs:
        for k, v in ((s["score"] or {}).get("missed_by_kind") or {}).items():
            missed[k] = missed.get(k, 0) + int(v)
    # pooled over sequences: matched groups / groups, matched seen events / seen events
    tp_g = sum(round(((s["score"] or {}).get("precision") or 0) * ((s["score"] or {}).get("detected_groups") or 0)) for s in seqs)
    tp_t = sum(round(((s["score"] or {}).get("recall") or 0) * ((s["score"] or {}).get("observable_true_events") or 0)) for s in seqs)
    out["pooled"] = {**tot, "precision": round(tp_g / tot["detected_groups"], 4) if tot["detected_groups"] else None,
                     "recall": round(tp_t / tot["observable_true_events"], 4) if tot["observable_true_events"] else None,
                     "missed_observable_by_kind": missed, "target": ">= 0.9 each"}
    out["load_average_after"] = os.getloadavg()[0]
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
