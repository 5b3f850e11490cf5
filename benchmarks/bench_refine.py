"""The U-Net segmenter's sub-pixel Gaussian refinement: this build against an earlier one, same run.

The earlier ``refine_gaussians`` is read from git (``--baseline-rev``, default the commit before
the refinement's rewrite) into a module of its own; the same :class:`UNetSegmenter` runs ``find``
on the same held-out twin frames with one or the other, alternating frame by frame so the
machine's load falls on both alike. Reported per variant: CPU time (``time.process_time``) of
``refine_gaussians`` and of the whole ``find`` per frame (median), minor page faults per
``find``, and against the twin's truth (as :mod:`bench_segmenter` scores it): F1 per class and
class-agnostic, position RMSE of all atoms and of the heavy species, per specimen and dose; and
the largest difference between the two variants' atom positions.

    .venv/bin/python benchmarks/bench_refine.py --out benchmarks/results/refine.json [--heap keep]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_segmenter import DEFECTS, HEAVY, f1, score  # noqa: E402

from stemagent.agent.app.heap import keep_freed_memory  # noqa: E402
from stemagent.agent.app.segmenter_training import LABEL_OFFSET, twin_frame  # noqa: E402
from stemagent.segmentation import unet_segmenter  # noqa: E402
from stemagent.segmentation.metrics import match  # noqa: E402
from stemagent.types import Frame  # noqa: E402

BASELINE_REV = "f092b1e"  # main before the refinement's rewrite (2026-12-02)


def baseline_refine(rev: str) -> Callable[..., Any]:
    """``refine_gaussians`` of ``src/segmentation/extract.py`` at git revision ``rev``."""
    text = subprocess.run(["git", "show", f"{rev}:src/segmentation/extract.py"], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent.parent).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(text)
    spec = importlib.util.spec_from_file_location("extract_baseline", fh.name)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    os.unlink(fh.name)
    return mod.refine_gaussians  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doses", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6])
    ap.add_argument("--kinds", nargs="+", default=["graphene", "mos2"])
    ap.add_argument("--frames", type=int, default=2, help="frames per (specimen, dose)")
    ap.add_argument("--rounds", type=int, default=2, help="find runs per frame and variant (timing)")
    ap.add_argument("--seed", type=int, default=20261122)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--heap", default="default", choices=("keep", "default"),
                    help="keep: glibc keeps freed memory, as the stemagent command sets it; default: the allocator's own thresholds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.heap == "keep":
        keep_freed_memory()
    variants: dict[str, Callable[..., Any]] = {"before": baseline_refine(args.baseline_rev), "now": unet_segmenter.refine_gaussians}
    seg = unet_segmenter.UNetSegmenter(device="cpu", num_threads=args.threads)
    names = seg.class_names
    rng = np.random.default_rng(args.seed)
    refine_cpu: dict[str, list[float]] = {v: [] for v in variants}
    find_cpu: dict[str, list[float]] = {v: [] for v in variants}
    faults: dict[str, list[float]] = {v: [] for v in variants}
    acc: dict[tuple[str, str], dict[str, Any]] = {}
    max_diff_A = 0.0
    t_start = time.time()
    load_start = os.getloadavg()
    for kind in args.kinds:
        for dose in args.doses:
            for _ in range(args.frames):
                image, truth = twin_frame(kind, 512, 0.1, dose, rng, clean=True, specimen_options=DEFECTS[kind])
                frame = Frame(image=image, geometry=truth.geometry, line_times_s=truth.geometry.line_start_times_s(0.0), index=0, dose_e_per_A2=dose)
                heavy = np.flatnonzero(np.asarray(names)[truth.labels + LABEL_OFFSET[kind]] == HEAVY[kind])
                found = {}
                order = list(variants) if len(refine_cpu["now"]) % 2 == 0 else list(variants)[::-1]
                for r in range(args.rounds):
                    for v in order if r % 2 == 0 else order[::-1]:
                        spent = [0.0]

                        def timed(*a: Any, _fn: Callable[..., Any] = variants[v], _spent: list[float] = spent, **k: Any) -> Any:
                            c = time.process_time()
                            out = _fn(*a, **k)
                            _spent[0] += time.process_time() - c
                            return out

                        unet_segmenter.refine_gaussians = timed  # type: ignore[assignment]
                        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                        c0 = time.process_time()
                        atoms = seg.find(frame)
                        find_cpu[v].append((time.process_time() - c0) * 1e3)
                        faults[v].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                        refine_cpu[v].append(spent[0] * 1e3)
                        found[v] = atoms
                unet_segmenter.refine_gaussians = variants["now"]  # type: ignore[assignment]
                a, b = found["before"].positions_A, found["now"].positions_A
                if a.shape == b.shape and len(a):
                    max_diff_A = max(max_diff_A, float(np.abs(a - b).max()))
                else:
                    max_diff_A = float("inf")
                keep_t = truth.geometry.contains(truth.positions_A, 1.0)
                for v, atoms in found.items():
                    s = score(atoms, truth, kind, names, True, np.zeros((len(heavy), 2)), heavy)
                    m = match(atoms.positions_A, np.zeros(len(atoms)), truth.positions_A, np.zeros(len(truth.positions_A)),
                              count_pred=truth.geometry.contains(atoms.positions_A, 1.0), count_true=keep_t)
                    err = (atoms.positions_A[m.pred_idx] - truth.positions_A[m.true_idx])[keep_t[m.true_idx]]
                    c = acc.setdefault((v, f"{kind} {dose:.0e}"), {"any": np.zeros(3, int), "cls": {}, "heavy": [], "all": []})
                    c["any"] += np.asarray(s["any"])
                    c["heavy"].append(s["heavy_err"])
                    c["all"].append(err)
                    for k2, cnt in s["counts"].items():
                        c["cls"][k2] = tuple(np.add(c["cls"].get(k2, (0, 0, 0)), cnt))
    cells: dict[str, dict[str, Any]] = {}
    for (v, cell), c in acc.items():
        he, ae = np.concatenate(c["heavy"]), np.concatenate(c["all"])
        cells.setdefault(cell, {})[v] = {
            "f1_any": round(f1(*c["any"]), 4), "f1_per_class": {k: round(f1(*x), 4) for k, x in c["cls"].items() if sum(x)},
            "rmse_all_A": round(float(np.sqrt(np.mean(ae**2))), 5), "rmse_heavy_A": round(float(np.sqrt(np.mean(he**2))), 5), "n_heavy": len(he)}
    med = {k: {v: float(np.median(x)) for v, x in d.items()} for k, d in (("refine_cpu_ms", refine_cpu), ("find_cpu_ms", find_cpu), ("minor_faults_per_find", faults))}
    doc = {
        "bench": "refine", "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t_start)),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} torch thread(s)",
        "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
        "command": "benchmarks/bench_refine.py " + " ".join(sys.argv[1:]), "baseline_rev": args.baseline_rev, "heap": args.heap,
        "per_frame_median": med,
        "ratio_refine_cpu": round(med["refine_cpu_ms"]["before"] / med["refine_cpu_ms"]["now"], 3),
        "ratio_find_cpu": round(med["find_cpu_ms"]["before"] / med["find_cpu_ms"]["now"], 3),
        "max_position_difference_A": max_diff_A, "accuracy": cells,
    }
    text = json.dumps(doc, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
