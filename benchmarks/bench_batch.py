"""``stemagent batch`` throughput on Dask: segmentation of 512 x 512 frames (issue 21).

Inputs: ``--files`` vendor files (Velox ``.emd``, written with RosettaSciIO into a temporary
folder) of ``--frames-per-file`` twin frames each: graphene at 0.1 Å/px, a counting detector at
1e4 e/Å², two rendered specimens, each frame its own Poisson draw (seeded). The batch runs
``--stages segment`` with ``--chunk-frames`` = frames per file: one task per file, which reads
the file and segments its frames.

Measured in one run, on the same files:

- ``replay_2_threads``: the single-process baseline, the replay's stages (the file's config,
  its U-Net segmenter) over every file in order in this process with torch at 2 threads (the
  batch worker's own :func:`analyse`, no Dask, no run log written).
- ``batch_1_worker`` / ``batch_2_workers``: :func:`run_batch` on a LocalCluster of 1 and of 2
  single-threaded worker processes (torch at one thread each), outputs written as Parquet.
  Workers import torch and stemagent before the clock starts; the one model load per worker
  is inside the timing (as the baseline's one load is).
- Targets: 2 workers / 1 worker >= 1.7 (``scaling_2_vs_1``); 2 workers / replay at 2 threads
  >= 0.9 (``batch_vs_replay``); scheduler overhead per task <= 5 % of task time.
- Per task (2-worker run): the compute time inside the task (``TaskResult.seconds``), Dask's
  compute window from its task stream, the idle gap on the worker before the task (the
  scheduler's dispatch and result hand-off), the bytes sent (pickled ``TaskSpec``), returned
  (pickled ``TaskResult``) and read from storage (the file).
  ``overhead_per_task_s``: median gap + (Dask's window - time inside the task);
  ``makespan_overhead_fraction``: (workers x wall - all task compute) / analyse task compute,
  which also holds start-up and the tail where one worker waits for the other.
- ``scheduler_tasks_per_s``: trivial tasks (``client.map`` of an identity over ``--trivial``
  integers) dispatched and gathered by the 2-worker cluster.
- ``model_loads_per_worker``: :class:`ModelCache` loads on each worker after the batch (1 each).
- ``scaling_model``: what ``--model-workers`` (100) workers would reach and what bounds it
  (:func:`scaling_model`; docs/batch_scaling.md explains it).

Prints one JSON document and writes it to ``--json`` (default ``benchmarks/results/batch.json``).

    .venv/bin/python benchmarks/bench_batch.py                      # default size, ~2-4 min on 2 cores
    .venv/bin/python benchmarks/bench_batch.py --files 4 --frames-per-file 4 --trivial 500   # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stemagent.agent.app.batch import BatchOptions, open_client, run_batch
from stemagent.agent.app.batch_worker import PLUGIN_NAME, ModelCache, TaskResult, TaskSpec, analyse, open_frames
from stemagent.batch.inputs import BatchInput, discover
from stemagent.drivers.files import ACQUISITION_SUFFIXES

SHAPE_PX = 512
PIXEL_A = 0.1
DOSE_E_PER_A2 = 1e4


def write_inputs(folder: Path, n_files: int, frames_per_file: int, seed: int) -> list[Path]:
    """``n_files`` .emd files of ``frames_per_file`` 512 x 512 twin frames (two rendered specimens, fresh noise per frame)."""
    from rsciio.emd import file_writer  # optional: the 'files' extra, needed only to write the inputs

    from stemagent.agent.app.segmenter_training import twin_frame  # the twin's renderer: only to make the inputs

    rng = np.random.default_rng(seed)
    expected = [np.asarray(twin_frame("graphene", SHAPE_PX, PIXEL_A, DOSE_E_PER_A2, rng, clean=True)[1].expected_image)
                for _ in range(2)]
    fov_nm = SHAPE_PX * PIXEL_A / 10
    axes = [{"name": a, "size": SHAPE_PX, "scale": fov_nm / SHAPE_PX, "offset": -fov_nm / 2, "units": "nm", "navigate": False}
            for a in "yx"]
    paths = []
    for i in range(n_files):
        stack = np.stack([rng.poisson(expected[(i + k) % 2]).astype(np.float32) for k in range(frames_per_file)])
        path = folder / f"frames-{i:04d}.emd"
        file_writer(str(path), {"data": stack, "axes": [{"name": "t", "size": frames_per_file, "scale": 1.0, "offset": 0.0,
                                                         "units": "s", "navigate": True}, *axes],
                                "metadata": {"General": {"title": "HAADF"}, "Signal": {"signal_type": ""}},
                                "original_metadata": {}})
        paths.append(path)
    return paths


def replay_in_process(inputs: list[BatchInput], chunk_frames: int, threads: int) -> dict[str, Any]:
    """The replay's stages over every input in order in this process (torch at ``threads``), timed."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        warm_up(str(inputs[0].path))
        models = ModelCache(threads)
        t0 = time.perf_counter()
        frames = atoms = 0
        for inp in inputs:
            result = analyse(TaskSpec(path=str(inp.path), kind=inp.kind, stages=("segment",), start=0, stop=None), models)
            assert isinstance(result, TaskResult), result
            frames += result.rows.n_frames
            atoms += result.rows.n_atoms
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    return {"torch_threads": threads, "frames": frames, "atoms": atoms, "elapsed_s": round(elapsed, 3),
            "frames_per_s": round(frames / elapsed, 3), "model_loads": models.loads}


def warm_up(path: str) -> int:
    """Import torch, the batch worker's modules and the file's reader, and read one input (here or on a worker),
    so the clock does not time Python's first imports; the model is not loaded."""
    frames = open_frames(TaskSpec(path=path, kind="file", stages=("segment",)))
    frames.config(TaskSpec(path=path, kind="file", stages=("segment",)))
    return torch.get_num_threads()


def _model_loads(dask_worker: Any) -> int:
    """On a worker (``client.run`` hands it the worker): how many models its cache has loaded."""
    return int(dask_worker.plugins[PLUGIN_NAME].models.loads)


def _identity(x: int) -> int:
    return x


def batch_run(inputs: list[BatchInput], workers: int, out: Path, chunk_frames: int, trivial: int) -> dict[str, Any]:
    """``run_batch`` on a LocalCluster of ``workers`` single-threaded workers, with its task stream; then trivial tasks."""
    from distributed import get_task_stream  # Dask: the 'batch' extra

    results: dict[str, TaskResult] = {}
    with open_client(None, workers) as client:
        threads = client.run(warm_up, str(inputs[0].path))
        with get_task_stream(client) as stream:
            report = run_batch(client, inputs, BatchOptions(out=out, stages=("segment",), chunk_frames=chunk_frames),
                               on_task=lambda key, r: results.__setitem__(key, r))
        loads = client.run(_model_loads)
        tasks = stream.data
        sched: dict[str, Any] = {}
        if trivial:
            client.gather(client.map(_identity, range(50), pure=False))  # the function shipped, the workers' queues warm
            t0 = time.perf_counter()
            futures = client.map(_identity, range(trivial), pure=False)
            client.gather(futures)
            elapsed = time.perf_counter() - t0
            del futures
            sched = {"tasks": trivial, "elapsed_s": round(elapsed, 3), "tasks_per_s": round(trivial / elapsed, 1)}
    d = report.to_dict()
    assert d["done"] == len(inputs) and d["failed"] == 0, d["failures"]
    return {"workers": workers, "torch_threads_per_worker": sorted(set(threads.values())), "frames": d["frames"],
            "elapsed_s": d["elapsed_s"], "frames_per_s": d["frames_per_s"], "client_write_s": round(report.client_write_s, 3),
            "model_loads_per_worker": sorted(loads.values()), "tasks": per_task(tasks, results, inputs, workers, report.elapsed_s),
            "scheduler": sched}


def per_task(stream: list[dict[str, Any]], results: dict[str, TaskResult], inputs: list[BatchInput], workers: int,
             wall_s: float) -> dict[str, Any]:
    """Per-task times and bytes from Dask's task stream and the tasks' own results."""
    size_of = {str(i.path): i.path.stat().st_size for i in inputs}
    rows = []
    for t in stream:
        compute = [s for s in t.get("startstops", ()) if s["action"] == "compute"]
        if not compute:
            continue
        key = str(t["key"])
        r = results.get(key)
        rows.append({"key": key, "worker": t["worker"], "start": compute[0]["start"], "stop": compute[-1]["stop"],
                     "dask_compute_s": compute[-1]["stop"] - compute[0]["start"],
                     "in_task_s": r.seconds if r else None, "frames": r.rows.n_frames if r else 0,
                     "bytes_in_spec": len(pickle.dumps(r.spec, protocol=5)) if r and r.spec else None,
                     "bytes_out": len(pickle.dumps(r, protocol=5)) if r else None,
                     "bytes_read": size_of.get(r.spec.path) if r and r.spec else None})
    rows.sort(key=lambda x: (x["worker"], x["start"]))
    gaps = [b["start"] - a["stop"] for a, b in zip(rows, rows[1:]) if a["worker"] == b["worker"]]
    for r in rows:
        r["start"] = round(r["start"], 4)
        r["stop"] = round(r["stop"], 4)
    analysed = [r for r in rows if r["in_task_s"] is not None]
    task_s = statistics.median(r["in_task_s"] for r in analysed)
    wrap_s = statistics.median(r["dask_compute_s"] - r["in_task_s"] for r in analysed)
    gap_s = statistics.median(gaps) if gaps else 0.0
    all_compute_s = sum(r["dask_compute_s"] for r in rows)
    analyse_compute_s = sum(r["in_task_s"] for r in analysed)
    frames = sum(r["frames"] for r in analysed)
    return {
        "analyse_tasks": len(analysed), "other_tasks": len(rows) - len(analysed), "frames_per_task": frames / len(analysed),
        "task_s_median": round(task_s, 4), "frame_s_median": round(task_s * len(analysed) / frames, 4),
        "dask_wrap_s_median": round(wrap_s, 5), "worker_gap_s_median": round(gap_s, 5),
        "worker_gap_s_p90": round(float(np.percentile(gaps, 90)), 5) if gaps else None,
        "overhead_per_task_s": round(gap_s + wrap_s, 5), "overhead_fraction": round((gap_s + wrap_s) / task_s, 4),
        "makespan_overhead_fraction": round((workers * wall_s - analyse_compute_s) / analyse_compute_s, 4),
        "idle_worker_s": round(workers * wall_s - all_compute_s, 3),
        "bytes_in_spec_per_task": statistics.median(r["bytes_in_spec"] for r in analysed),
        "bytes_out_per_task_median": statistics.median(r["bytes_out"] for r in analysed),
        "bytes_read_per_task_median": statistics.median(r["bytes_read"] for r in analysed),
        "per_task": rows,
    }


def scaling_model(two: dict[str, Any], workers: int, storage_GB_per_s: float) -> dict[str, Any]:
    """Frames/s a cluster of ``workers`` single-threaded workers would reach, by what bounds it (from the 2-worker run).

    compute: each worker does a frame every (task + overhead per task) / frames per task seconds;
    scheduler: one dispatch per task at the measured trivial-task rate (here the scheduler shares 2
    cores with everything, so this is a floor for a scheduler on its own node); client: the client
    writes every input's Parquet tables itself, serially (frames written per second of its writing);
    storage: bytes each task reads (the whole file) against ``storage_GB_per_s`` (assumed, not measured);
    results: bytes returned per frame against the same link into the client."""
    t = two["tasks"]
    per_frame_s = (t["task_s_median"] + t["overhead_per_task_s"]) / t["frames_per_task"]
    bounds = {
        "compute": workers / per_frame_s,
        "scheduler": (two["scheduler"].get("tasks_per_s") or float("inf")) * t["frames_per_task"],
        "client_writes": two["frames"] / two["client_write_s"] if two["client_write_s"] > 0 else float("inf"),
        "storage_reads": storage_GB_per_s * 1e9 / (t["bytes_read_per_task_median"] / t["frames_per_task"]),
        "result_gathering": storage_GB_per_s * 1e9 / (t["bytes_out_per_task_median"] / t["frames_per_task"]),
    }
    limit = min(bounds, key=lambda k: bounds[k])
    return {"workers": workers, "worker_s_per_frame": round(per_frame_s, 4), "storage_GB_per_s_assumed": storage_GB_per_s,
            "bounds_frames_per_s": {k: round(v, 1) for k, v in bounds.items()}, "frames_per_s": round(bounds[limit], 1),
            "bottleneck": limit, "speedup_over_one_worker": round(bounds[limit] * per_frame_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=24, help="input files (one task each; 24 keeps the last task's tail small against the run)")
    ap.add_argument("--frames-per-file", type=int, default=8, help="512x512 frames per file (= frames per task)")
    ap.add_argument("--trivial", type=int, default=2000, help="trivial tasks for the scheduler's throughput (0: skip)")
    ap.add_argument("--seed", type=int, default=2121)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "batch.json")
    ap.add_argument("--note", default="", help="a note stored with the results (e.g. the machine's load)")
    ap.add_argument("--model-workers", type=int, default=100, help="workers of the cluster the scaling model predicts")
    ap.add_argument("--storage-GB-per-s", type=float, default=1.0, help="shared storage (and client link) bandwidth the model assumes")
    args = ap.parse_args()

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        write_inputs(root / "in", args.files, args.frames_per_file, args.seed)
        inputs = discover([str(root / "in")], ACQUISITION_SUFFIXES)
        replay = replay_in_process(inputs, args.frames_per_file, threads=2)
        one = batch_run(inputs, 1, root / "out1", args.frames_per_file, trivial=0)
        two = batch_run(inputs, 2, root / "out2", args.frames_per_file, trivial=args.trivial)
    t2 = two["tasks"]
    result = {
        "benchmark": "bench_batch", "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "note": args.note,
        "inputs": {"files": args.files, "frames_per_file": args.frames_per_file, "shape_px": SHAPE_PX, "pixel_A": PIXEL_A,
                   "dose_e_per_A2": DOSE_E_PER_A2, "seed": args.seed, "stages": ["segment"]},
        "replay_2_threads": replay, "batch_1_worker": one, "batch_2_workers": two,
        "scaling_2_vs_1": round(two["frames_per_s"] / one["frames_per_s"], 3),
        "batch_vs_replay": round(two["frames_per_s"] / replay["frames_per_s"], 3),
        "overhead_fraction": t2["overhead_fraction"],
        "makespan_overhead_fraction": t2["makespan_overhead_fraction"],
        "scheduler_tasks_per_s": two["scheduler"].get("tasks_per_s"),
        "scaling_model": scaling_model(two, args.model_workers, args.storage_GB_per_s),
        "targets": {"scaling_2_vs_1": 1.7, "batch_vs_replay": 0.9, "overhead_fraction": 0.05},
        "bench_wall_s": 0.0,
    }
    result["pass"] = {"scaling_2_vs_1": result["scaling_2_vs_1"] >= 1.7, "batch_vs_replay": result["batch_vs_replay"] >= 0.9,
                      "overhead_fraction": result["overhead_fraction"] <= 0.05}
    result["bench_wall_s"] = round(time.perf_counter() - t_start, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    brief = {k: v for k, v in result.items() if k not in ("batch_1_worker", "batch_2_workers")}
    brief["batch_1_worker"] = {k: v for k, v in one.items() if k != "tasks"}
    brief["batch_2_workers"] = {k: v for k, v in two.items() if k != "tasks"}
    brief["tasks_2_workers"] = {k: v for k, v in t2.items() if k != "per_task"}
    print(json.dumps(brief, indent=1))


if __name__ == "__main__":
    main()
