"""Atom classes on twin frames with a real detector and real optics: the class stage vs the network.

`bench_segmenter.py` scores clean frames (counting detector, perfect optics, no drift). Here the
frames come from the training distribution's imperfections (`twin_frame(clean=False)`): analog
detector gain 0.5-4 counts per electron, offset 0-20 counts, read noise, defocus, astigmatism,
source size, drift and jitter. Drift moves the atoms in the image, so detections are matched
to the twin's pixel positions of the atoms (0.5 Å), not to sample coordinates.

    .venv/bin/python benchmarks/bench_segmenter_detector.py --frames 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_segmenter import DEFECTS, f1  # noqa: E402

from stemagent.agent.app.segmenter_training import LABEL_OFFSET, twin_frame  # noqa: E402
from stemagent.segmentation.metrics import match  # noqa: E402
from stemagent.segmentation.unet_segmenter import UNetSegmenter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=8, help="frames per (specimen, dose)")
    ap.add_argument("--doses", type=float, nargs="+", default=[1e3, 1e4])
    ap.add_argument("--seed", type=int, default=4242)
    args = ap.parse_args()
    torch.set_num_threads(2)
    methods = {"unet (ours)": UNetSegmenter(device="cpu"), "unet (ours), network classes only": UNetSegmenter(device="cpu", intensity_classes=False)}
    names = methods["unet (ours)"].class_names
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []
    for kind in ("graphene", "mos2"):
        for dose in args.doses:
            acc: dict[str, dict[int, tuple[int, int, int]]] = {m: {} for m in methods}
            detectors = []
            for _ in range(args.frames):
                image, truth = twin_frame(kind, 512, 0.1, dose, rng, clean=False, specimen_options=DEFECTS[kind])
                detectors.append(truth.detector)
                px = truth.geometry.pixel_size_A[0]
                size_A = np.asarray(image.shape) * px

                def counted(p: np.ndarray) -> np.ndarray:
                    return np.all((p > 1.0) & (p < size_A - 1.0), axis=1)

                true_A = truth.pixels_rc * px
                for m, seg in methods.items():
                    found = seg.find_pixels(image, px)
                    found_A = found["rc"] * px
                    res = match(found_A, found["classes"], true_A, truth.labels + LABEL_OFFSET[kind], count_pred=counted(found_A), count_true=counted(true_A))
                    for c in set(res.tp) | set(res.fp) | set(res.fn):
                        acc[m][c] = tuple(np.add(acc[m].get(c, (0, 0, 0)), (res.tp.get(c, 0), res.fp.get(c, 0), res.fn.get(c, 0))))
            for m in methods:
                present = sorted(c for c, v in acc[m].items() if v[0] + v[2] > 0)
                rows.append(
                    {
                        "method": m,
                        "specimen": kind,
                        "dose_e_per_A2": dose,
                        "f1_per_class": {names[c]: round(f1(*acc[m][c]), 4) for c in present},
                        "counts_tp_fp_fn": {names[c]: [int(x) for x in acc[m][c]] for c in present},
                        "detector_gain_range": [round(min(d.gain for d in detectors), 2), round(max(d.gain for d in detectors), 2)],
                        "detector_offset_range": [round(min(d.offset for d in detectors), 1), round(max(d.offset for d in detectors), 1)],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"benchmark": "atom classes with an analog detector", "frames_per_cell": args.frames, "seed": args.seed, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
