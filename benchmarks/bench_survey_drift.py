"""The survey demo with the drift stage on: the stage's drift estimate against the twin's truth.

Runs ``configs/twin-survey.yaml`` (seeded) through the ordinary agent with ``pipeline.drift``
on, optionally with a drifting twin (``--drift VX VY``, Å/s, plus ``--random-walk``), then
scores every frame the stage used: its estimated drift over the frame's time grid against the
truth ``driver.ground_truth.drift_at(t)``, shifted to the stage's gauge (the truth at the
mid-time of the frame that became the current reference, since the stage's sample frame is
that frame's scan frame). ``--set FIELD=VALUE`` sets DriftConfig fields (JSON values), e.g.
``--set reference_dose_ratio=null`` for the stage before the dose rule. Prints one JSON document.

    .venv/bin/python benchmarks/bench_survey_drift.py --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from stemagent.agent.app.factory import build_agent, new_run_dir, new_run_id
from stemagent.config import config_from_dict, load_config
from stemagent.runlog import RunLog
from stemagent.simulators.scoring import score_run

ROOT = Path(__file__).resolve().parent.parent


class _SubScansOnly:
    """The twin's truth without the overview (frame 0): scores the sub-scans alone."""

    def __init__(self, truth: Any) -> None:
        self._truth = truth

    def frame_truth(self, index: int) -> Any:
        return None if index == 0 else self._truth.frame_truth(index)


async def run(cfg: Any, log_dir: Path) -> tuple[Any, Any]:
    agent = await build_agent(cfg, run_dir=new_run_dir(cfg, log_dir, new_run_id()))
    summary = await agent.run()
    return agent, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "twin-survey.yaml"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--drift", type=float, nargs=2, default=(0.0, 0.0), metavar=("VX", "VY"))
    p.add_argument("--random-walk", type=float, default=0.0)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    data = load_config(Path(args.config)).model_dump(mode="json")
    data["seed"] = args.seed
    data["pipeline"]["drift"] = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    data["driver"].update(drift_velocity_A_per_s=list(args.drift), drift_random_walk_A_per_sqrt_s=args.random_walk)
    cfg = config_from_dict(data, source="bench_survey_drift")
    t0, c0 = time.time(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        agent, summary = asyncio.run(run(cfg, Path(tmp)))
        log = RunLog.open(summary.log_path)
        docs = log.event_data("drift")
        truth = agent.driver.ground_truth
        score = score_run(log, truth)
        sub_score = score_run(log, _SubScansOnly(truth))
        rows = []
        ref_mid: dict[int, float] = {}
        for d in docs:
            t = np.asarray(d["times_s"], dtype=np.float64)
            if len(t) == 0:
                continue
            rid = int(d["reference_id"])
            ref_mid.setdefault(rid, float(0.5 * (t[0] + t[-1])))
            if d["status"] not in ("reference", "tracking", "new_field"):
                continue
            true = truth.drift_at(t) - truth.drift_at(np.array([ref_mid[rid]]))
            err = np.asarray(d["displacement_A"]) - true
            rows.append({"frame": int(d["frame_index"]), "status": d["status"], "reference_id": rid,
                         "estimate_mean_A": np.mean(d["displacement_A"], axis=0).tolist(),
                         "truth_mean_A": np.mean(true, axis=0).tolist(),
                         "error_rms_A": float(np.sqrt(np.mean(np.sum(err**2, axis=1)))),
                         "error_max_A": float(np.max(np.hypot(err[:, 0], err[:, 1]))),
                         "band95_A": d["band95_A"]})
    sub = [r for r in rows if r["frame"] > 0]
    errs = np.array([r["error_rms_A"] for r in sub]) if sub else np.zeros(0)
    out = {
        "benchmark": "survey_drift", "args": vars(args), "load_average": os.getloadavg(),
        "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
        "frames": summary.frames, "reason": summary.reason,
        "subscan_error_rms_A": float(np.sqrt(np.mean(errs**2))) if len(errs) else None,
        "subscan_error_max_A": float(max(r["error_max_A"] for r in sub)) if sub else None,
        "statuses": [r["status"] for r in rows],
        "atoms_vs_truth": {k: score[k] for k in ("frames_scored", "f1", "rmse_A")},
        "subscan_atoms_vs_truth": {k: sub_score[k] for k in ("frames_scored", "f1", "rmse_A")},
        "per_frame": rows,
    }
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
