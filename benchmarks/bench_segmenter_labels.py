"""False defect labels across detectors, what the evidence gate costs, and the new checks' latency (issue 12).

Twin frames 512 x 512 at 0.1 Å/px (perfect probe, no drift) of graphene and MoS2, each rendered
through three detectors like real ones: a counting detector stored as uint16; an analog
detector as float (gain 7.3 counts/e, offset 12.5, read noise 3); an analog scan generator as
uint32 (gain 40, offset 3e6, read noise 20), whose pixels are whole numbers.

Two segmenters, the same shipped weights:
- ``main rules``: what main did: an image of non-negative whole numbers is taken as electron
  counts, every other image gets the photon-transfer regression; no evidence gate, no specimen
  prior (the network's classes from either family);
- ``issue 12``: the detector read off the image's statistics, a defect label only with a
  log-likelihood ratio >= ln(200) nats against the host, the specimen prior on ``auto``, the
  out-of-distribution check and the in-frame filter.

Rows:
1. false "vacancy"/"Si" (graphene) and "column-vacancy"/"substituted" (MoS2) labels per host
   site found, on defect-free frames (target <= 0.5 %), and any label from the other
   specimen's classes;
2. defect-label recall and precision on frames with defects (bench_segmenter's densities), the
   cost of the gate: over the frame less a 1 Å border, and over its interior (2 Å from the edge,
   where the count mixture decides classes; in the band between, a defect label needs the
   network's own odds to reach the threshold, which they rarely do);
3. latency: median ``find`` time per 512 x 512 frame with the checks on (``issue 12``) and off
   (``main rules``), and the two new steps alone (detector estimate, frame check).

    nice -n 10 .venv/bin/python benchmarks/bench_segmenter_labels.py --frames 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_segmenter import DEFECTS  # noqa: E402

from stemagent.segmentation.detector import DetectorEstimate, estimate_detector  # noqa: E402
from stemagent.segmentation.metrics import match  # noqa: E402
from stemagent.segmentation.ood import frame_check  # noqa: E402
from stemagent.segmentation.unet_segmenter import UNetSegmenter  # noqa: E402
from stemagent.simulators import render_sample  # noqa: E402
from stemagent.simulators.scan import DetectorModel  # noqa: E402
from stemagent.types import Frame, ScanGeometry  # noqa: E402

DETECTORS: dict[str, tuple[DetectorModel, str | None]] = {
    "counting (uint16)": (DetectorModel(), "uint16"),
    "analog float": (DetectorModel(gain=7.3, offset=12.5, read_noise=3.0), None),
    "analog uint32, offset 3e6": (DetectorModel(gain=40.0, offset=3e6, read_noise=20.0), "uint32"),
}
DEFECT_FREE = {"graphene": {"si_per_nm2": 0.0, "vacancy_per_nm2": 0.0}, "mos2": {"vacancy_fraction": 0.0, "substitution_fraction": 0.0}}
HOST = {"graphene": "C", "mos2": "chalcogen"}
DEFECT_CLASSES = {"graphene": ("Si", "vacancy"), "mos2": ("substituted", "column-vacancy")}
OTHER = {"graphene": ("metal", "chalcogen", "substituted", "column-vacancy"), "mos2": ("C", "Si", "vacancy")}
TRUTH_NAMES = {"graphene": {"C": "C", "Si": "Si", "vacancy": "vacancy"}, "mos2": {"metal": "metal", "chalcogen": "chalcogen", "substituted": "substituted", "vacancy": "column-vacancy"}}


class MainRules(UNetSegmenter):
    """The shipped segmenter with main's rules: dtype-style counting decision, no gate, no prior."""

    def __init__(self) -> None:
        super().__init__(device="cpu", min_evidence_nats=-np.inf)
        self.specimen = "none"  # not a specimen: no restriction (main had none)

    def _electrons(self, image: np.ndarray) -> tuple[np.ndarray, DetectorEstimate]:
        x = np.asarray(image, dtype=np.float64)
        whole = bool(np.all(x == np.round(x)) and x.min() >= 0)
        det = DetectorEstimate("counting" if whole else "unknown", 1.0, 0.0, float("nan"), whole, 0.0, float(x.min()))
        self.last_detector = det
        return x, det


def frame(kind: str, dose: float, det: str, rng: np.random.Generator, options: dict[str, Any]) -> tuple[Frame, Any]:
    model, dtype = DETECTORS[det]
    g = ScanGeometry(fov_A=(51.2, 51.2), shape_px=(512, 512), dwell_s=2e-6)
    img, truth = render_sample(kind, g, dose, rng, detector=model, specimen_options=options)
    if dtype is not None:
        img = np.clip(np.rint(img), 0, None).astype(dtype)
    return Frame(image=img, geometry=g, line_times_s=g.line_start_times_s(0.0), index=0, dose_e_per_A2=dose), truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=2, help="frames per (specimen, dose, detector)")
    ap.add_argument("--doses", type=float, nargs="+", default=[1e3, 1e4, 1e5])
    ap.add_argument("--latency-repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=9012)
    args = ap.parse_args()
    torch.set_num_threads(2)
    methods: dict[str, UNetSegmenter] = {"main rules": MainRules(), "issue 12": UNetSegmenter(device="cpu")}
    rows: list[dict[str, Any]] = []
    for kind in ("graphene", "mos2"):
        for dose in args.doses:
            for det in DETECTORS:
                acc = {m: {"host_sites": 0, "false_defect": 0, "other_specimen": 0, "tp": 0, "fp": 0, "fn": 0, "tp2": 0, "fp2": 0, "fn2": 0} for m in methods}
                rng = np.random.default_rng([args.seed, int(dose), list(DETECTORS).index(det), kind == "mos2"])
                for _ in range(args.frames):
                    clean, _ = frame(kind, dose, det, rng, DEFECT_FREE[kind])
                    dirty, truth = frame(kind, dose, det, rng, DEFECTS[kind])
                    tnames = np.asarray([TRUTH_NAMES[kind].get(c, c) for c in truth.class_names])[truth.labels]
                    inner_t = dirty.geometry.contains(truth.positions_A, 1.0)
                    for m, seg in methods.items():
                        a = seg.find(clean)
                        names = np.asarray(a.class_names)[a.classes]
                        inner = clean.geometry.contains(a.positions_A, 1.0)
                        fam = np.isin(names, (HOST[kind], *DEFECT_CLASSES[kind]))
                        acc[m]["host_sites"] += int((fam & inner).sum())
                        acc[m]["false_defect"] += int((np.isin(names, DEFECT_CLASSES[kind]) & inner).sum())
                        acc[m]["other_specimen"] += int((np.isin(names, OTHER[kind]) & inner).sum())
                        a = seg.find(dirty)
                        names = np.asarray(a.class_names)[a.classes]
                        pred_def = np.isin(names, DEFECT_CLASSES[kind]).astype(np.int64)
                        true_def = np.isin(tnames, DEFECT_CLASSES[kind]).astype(np.int64)
                        res = match(a.positions_A, pred_def, truth.positions_A, true_def, count_pred=dirty.geometry.contains(a.positions_A, 1.0), count_true=inner_t)
                        acc[m]["tp"] += res.tp.get(1, 0)
                        acc[m]["fp"] += res.fp.get(1, 0)
                        acc[m]["fn"] += res.fn.get(1, 0)
                        # the interior, where the count mixture decides classes (2 Å from the edge)
                        res = match(a.positions_A, pred_def, truth.positions_A, true_def, count_pred=dirty.geometry.contains(a.positions_A, 2.0),
                                    count_true=dirty.geometry.contains(truth.positions_A, 2.0))
                        acc[m]["tp2"] += res.tp.get(1, 0)
                        acc[m]["fp2"] += res.fp.get(1, 0)
                        acc[m]["fn2"] += res.fn.get(1, 0)
                for m, v in acc.items():
                    row = {
                        "method": m, "specimen": kind, "dose_e_per_A2": dose, "detector": det, "frames": args.frames,
                        "false_defect_rate": round(v["false_defect"] / max(v["host_sites"], 1), 5),
                        "false_defect_labels": v["false_defect"], "host_sites": v["host_sites"],
                        "other_specimen_labels": v["other_specimen"],
                        "defect_recall": round(v["tp"] / max(v["tp"] + v["fn"], 1), 4),
                        "defect_precision": round(v["tp"] / max(v["tp"] + v["fp"], 1), 4),
                        "defects_true": v["tp"] + v["fn"],
                        "interior_defect_recall": round(v["tp2"] / max(v["tp2"] + v["fn2"], 1), 4),
                        "interior_defect_precision": round(v["tp2"] / max(v["tp2"] + v["fp2"], 1), 4),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    # latency on a 512 x 512 counting graphene frame at 1e4 e/Å2
    lat: dict[str, float] = {}
    f, _ = frame("graphene", 1e4, "counting (uint16)", np.random.default_rng(1), DEFECTS["graphene"])
    for m, seg in methods.items():
        seg.find(f)  # warm-up
        ts = []
        for _ in range(args.latency_repeats):
            t0 = time.perf_counter()
            seg.find(f)
            ts.append(time.perf_counter() - t0)
        lat[m] = round(1e3 * float(np.median(ts)), 2)
    img = np.asarray(f.image)
    ts = []
    for _ in range(args.latency_repeats):
        t0 = time.perf_counter()
        estimate_detector(img)
        ts.append(time.perf_counter() - t0)
    lat["detector estimate alone"] = round(1e3 * float(np.median(ts)), 2)
    rc = np.random.default_rng(0).uniform(0, 511, (1000, 2))
    ts = []
    for _ in range(args.latency_repeats):
        t0 = time.perf_counter()
        frame_check(rc, (0.1, 0.1), (512, 512))
        ts.append(time.perf_counter() - t0)
    lat["frame check alone (1000 atoms)"] = round(1e3 * float(np.median(ts)), 2)
    lat["ratio issue 12 / main rules"] = round(lat["issue 12"] / lat["main rules"], 3)
    print(json.dumps({"latency_ms_per_512_frame": lat}), flush=True)
    print(json.dumps({
        "benchmark": "false defect labels across detectors; evidence gate; latency of the issue-12 checks",
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, 2 threads, shared with other engineers",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seed": args.seed, "results": rows, "latency_ms_per_512_frame": lat,
    }, indent=1))


if __name__ == "__main__":
    main()
