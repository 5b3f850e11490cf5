"""U-Net ``find`` latency per 512 x 512 frame: the network in channels-last layout (the default
since 2026-12-02) against the contiguous (NCHW) layout it ran in before, in the same run.

Frames: clean twin frames (graphene with Si and vacancies, MoS2 with defects) at 1e4 e/Å², 0.1
Å/px. For each thread count and layout, ``find`` runs on every frame ``--rounds`` times; the two
layouts alternate round by round so the machine's load falls on both alike. Reported per layout:
median and p95 wall time of ``find``, median CPU time (process time, all threads) and the
network's forward pass alone; and the ratio contiguous / channels-last of the medians. The
found atoms are compared between layouts (same count, positions within 1e-4 Å).

    .venv/bin/python benchmarks/bench_segmenter_latency.py --out benchmarks/results/segmenter_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import numpy as np
import torch

from stemagent.agent.app.segmenter_training import twin_frame
from stemagent.segmentation.unet_segmenter import UNetSegmenter
from stemagent.types import Frame, ScanGeometry

SPECIMENS = ("graphene", "mos2")


def frames(n_per_kind: int, dose: float) -> list[Frame]:
    out = []
    for k, kind in enumerate(SPECIMENS):
        for i in range(n_per_kind):
            img, truth = twin_frame(kind, 512, 0.1, dose, np.random.default_rng(9000 + 100 * k + i), clean=True)
            geo: ScanGeometry = truth.geometry
            out.append(Frame(image=img, geometry=geo, line_times_s=geo.line_start_times_s(0.0), index=i, dose_e_per_A2=dose))
    return out


def set_layout(seg: UNetSegmenter, layout: str) -> None:
    seg.use_channels_last(layout == "channels_last")


def forward_ms(seg: UNetSegmenter, layout: str) -> float:
    """The network alone on the model grid of a 512 px frame at 0.1 Å/px (256 x 256 at 0.2 Å/px)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    with torch.inference_mode():
        x = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=fmt)
        t0 = time.perf_counter()
        seg.model(x)
        return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2, help="frames per specimen")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dose", type=float, default=1e4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fr = frames(args.frames, args.dose)
    result: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load_average_start": list(os.getloadavg()),
        "command": "benchmarks/bench_segmenter_latency.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "rows": [],
    }
    layouts = ("contiguous", "channels_last")
    for threads in [int(t) for t in args.threads.split(",")]:
        seg = UNetSegmenter(num_threads=threads)
        wall: dict[str, list[float]] = {lay: [] for lay in layouts}
        cpu: dict[str, list[float]] = {lay: [] for lay in layouts}
        fwd: dict[str, list[float]] = {lay: [] for lay in layouts}
        atoms: dict[str, list[np.ndarray]] = {lay: [] for lay in layouts}
        for lay in layouts:  # warm-up and the atoms compared
            set_layout(seg, lay)
            atoms[lay] = [seg.find(f).positions_A for f in fr]
        for r in range(args.rounds):
            for lay in layouts if r % 2 == 0 else layouts[::-1]:
                set_layout(seg, lay)
                for f in fr:
                    c0, t0 = time.process_time(), time.perf_counter()
                    seg.find(f)
                    wall[lay].append((time.perf_counter() - t0) * 1e3)
                    cpu[lay].append((time.process_time() - c0) * 1e3)
                    fwd[lay].append(forward_ms(seg, lay))
        same = all(a.shape == b.shape and np.allclose(a, b, atol=1e-4) for a, b in zip(atoms["contiguous"], atoms["channels_last"]))
        row: dict[str, Any] = {"threads": threads, "same_atoms": bool(same)}
        for lay in layouts:
            row[lay] = {
                "find_wall_ms_p50": float(np.median(wall[lay])),
                "find_wall_ms_p95": float(np.percentile(wall[lay], 95)),
                "find_cpu_ms_p50": float(np.median(cpu[lay])),
                "forward_wall_ms_p50": float(np.median(fwd[lay])),
            }
        row["ratio_find_p50"] = row["contiguous"]["find_wall_ms_p50"] / row["channels_last"]["find_wall_ms_p50"]
        row["ratio_forward_p50"] = row["contiguous"]["forward_wall_ms_p50"] / row["channels_last"]["forward_wall_ms_p50"]
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    result["load_average_end"] = list(os.getloadavg())
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
