"""Drift correction on the drifting twin: beam placement, calibration, distortion, cost.

Per seed: a MoS2 monolayer on the twin (about 600 columns in the field), 100 frames of
512 x 512 at 0.1 Å/px, 1 µs dwell (0.26 s per frame, back to back), 20 pA, 0.02 Å line jitter;
drift 0.5 Å/s in a seeded direction + wobble (0.3 Å, periods around 30 s) + random walk
0.02 Å/sqrt(s); no beam-induced dynamics. Atoms are found by the classical LoG finder
(``--finder log``, default: the fastest finder in the tree; it reports position uncertainties
about 2x too small, which the GP's learned extra noise absorbs) or the shipped U-Net
(``--finder unet``, calibrated uncertainties, ~4x slower).

After each frame (from the 6th on) a command acts ``--latency`` s after the frame's end (and
at 0.5 s and 2 s, reported too). Targets are the atoms found in that frame whose true column is
known (ground truth); each method sends the beam where it believes the atom is:

- ``gp``: the drift stage: the atom's refined sample-frame position + the forecast;
- ``none``: no correction: the atom's position as found in the last frame;
- ``xcorr``: phase cross-correlation of consecutive frames (scikit-image, 1/20 px) with linear
  extrapolation of the cumulative shift from the frame's mid-time (last 2 frames, as consoles
  do; ``xcorr_lsq4``: least-squares line through the last 4);
- ``kalman``: a constant-velocity Kalman filter on the same per-frame shifts.

The placement error is where the beam lands on the specimen (ground truth) minus the true
column position. Also: the GP's 95% band coverage of the true drift (in the stage's frame:
truth shifted by the stage's gauge, the mean offset of its refined positions from the truth)
and of the placement error (band from the forecast and the refined position's uncertainty);
the intra-frame distortion residual (corrected positions within a frame vs truth, frame mean
removed); per-frame update, forecast and hyperparameter-refit times.

Prints one JSON document (per-seed values, medians and spreads).

    .venv/bin/python benchmarks/bench_drift.py --seeds 20 --frames 100 --figure docs/drift_gp.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
import warnings
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from stemagent.clock import VirtualClock
from stemagent.drift import DriftConfig, DriftStage
from stemagent.segmentation.classical import LoGFinder
from stemagent.simulators import DriftModel, TwinDriver, build_specimen
from stemagent.types import ScanGeometry

GEOMETRY = ScanGeometry(center_A=(0.0, 0.0), fov_A=(51.2, 51.2), shape_px=(512, 512), dwell_s=1e-6)
WARMUP = 5
HORIZONS_S = (0.5, 2.0)


def _finder(kind: str) -> Any:
    if kind == "unet":
        from stemagent.segmentation.unet_segmenter import UNetSegmenter

        return UNetSegmenter(device="cpu")
    return LoGFinder(sigma_A=0.45)


class XCorr:
    """Frame-to-frame phase cross-correlation: cumulative shift (Å) at each frame's mid-time."""

    def __init__(self) -> None:
        from skimage.registration import phase_cross_correlation

        self._pcc = phase_cross_correlation
        self.prev: np.ndarray | None = None
        self.t: list[float] = []
        self.s: list[np.ndarray] = []
        self.ms: list[float] = []

    def update(self, frame: Any) -> None:
        img = np.asarray(frame.image, dtype=np.float32)
        t_mid = 0.5 * (frame.start_time_s + frame.end_time_s)
        if self.prev is None:
            self.t.append(t_mid)
            self.s.append(np.zeros(2))
        else:
            t0 = time.perf_counter()
            shift, _, _ = self._pcc(self.prev, img, upsample_factor=20, normalization=None)
            self.ms.append(1e3 * (time.perf_counter() - t0))
            px, py = frame.geometry.pixel_size_A
            # the content moved by -shift pixels (row, col) -> in (x, y) Å
            self.t.append(t_mid)
            self.s.append(self.s[-1] + np.array([-shift[1] * px, -shift[0] * py]))
        self.prev = img

    def velocity(self, n: int) -> np.ndarray:
        if len(self.t) < 2:
            return np.zeros(2)
        t = np.asarray(self.t[-n:])
        s = np.asarray(self.s[-n:])
        if len(t) == 2:
            return (s[1] - s[0]) / (t[1] - t[0])
        A = np.stack([t - t.mean(), np.ones_like(t)], axis=1)
        coef, *_ = np.linalg.lstsq(A, s, rcond=None)
        return coef[0]


class Kalman:
    """Constant-velocity Kalman filter per axis on the cumulative xcorr shifts."""

    def __init__(self, accel_A_per_s2: float = 0.05, rw_A_per_sqrt_s: float = 0.02, meas_A: float = 0.01) -> None:
        self.q_a, self.q_rw, self.r = accel_A_per_s2**2, rw_A_per_sqrt_s**2, meas_A**2
        self.x: np.ndarray | None = None  # (2 axes, [pos, vel])
        self.P = np.zeros((2, 2, 2))
        self.t = 0.0

    def update(self, t: float, z: np.ndarray) -> None:
        if self.x is None:
            self.x = np.stack([z, np.zeros(2)], axis=1)
            self.P = np.tile(np.diag([self.r, 1.0]), (2, 1, 1))
            self.t = t
            return
        dt = t - self.t
        F = np.array([[1.0, dt], [0.0, 1.0]])
        Q = self.q_a * np.array([[dt**4 / 4, dt**3 / 2], [dt**3 / 2, dt**2]]) + self.q_rw * np.array([[dt, 0.0], [0.0, 0.0]])
        for ax in range(2):
            x = F @ self.x[ax]
            P = F @ self.P[ax] @ F.T + Q
            k = P[:, 0] / (P[0, 0] + self.r)
            self.x[ax] = x + k * (z[ax] - x[0])
            self.P[ax] = P - np.outer(k, P[0])
        self.t = t

    def velocity(self) -> np.ndarray:
        return np.zeros(2) if self.x is None else self.x[:, 1].copy()


def rms(a: np.ndarray) -> float:
    a = np.asarray(a)
    return float(np.sqrt(np.mean(np.sum(a.reshape(len(a), -1) ** 2, axis=1)))) if len(a) else float("nan")


async def run_seed(seed: int, n_frames: int, finder_kind: str, latency_s: float, config: DriftConfig,
                   record: bool = False) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    specimen = build_specimen("mos2", size_A=(110.0, 110.0), center_A=(0.0, 0.0), rng=rng)
    angle = rng.uniform(0, 2 * np.pi)
    drift = DriftModel(velocity_A_per_s=(0.5 * np.cos(angle), 0.5 * np.sin(angle)), wobble_amplitude_A=0.3,
                       wobble_period_s=30.0, random_walk_A_per_sqrt_s=0.02, seed=seed)
    clock = VirtualClock()
    twin = TwinDriver(specimen, clock=clock, rng=seed, drift=drift, dynamics=False, jitter_A=0.02, beam_current_pA=20.0)
    await twin.connect()
    finder = _finder(finder_kind)
    stage = DriftStage(config)
    xc = XCorr()
    kf = Kalman()
    truth_d = twin.ground_truth.drift_at
    horizons = (latency_s,) + HORIZONS_S
    err: dict[str, dict[float, list[np.ndarray]]] = {m: {h: [] for h in horizons} for m in ("gp", "none", "xcorr", "xcorr_lsq4", "kalman")}
    z_fc: list[np.ndarray] = []
    z_place: list[np.ndarray] = []
    z_h: dict[float, list[np.ndarray]] = {}  # standardised forecast errors per horizon (calibration diagnosis)
    distortion = {"gp": [], "none": []}
    model_distortion = {"gp": [], "none": []}
    upd_ms, fit_ms, fc_ms, n_tracked, find_ms = [], [], [], [], []
    inflation: list[list[float]] = []  # the stage's band calibration factors (x, y) after each frame
    refit_flags: list[bool] = []
    upd_cpu_ms: list[float] = []  # CPU time of the process: what the update costs, whatever else runs
    refit_cpu_ms: list[float] = []
    upd_thread_ms: list[float] = []  # CPU time of the calling thread only (other threads' spinning excluded)
    fc_cpu_ms: list[float] = []
    rec: dict[str, list] = {"t": [], "d_true": [], "d_gp": [], "sd_gp": [], "gauge": [], "t_x": [], "s_x": [], "fc_gp": [],
                            "d_true_x": [], "t_mid": [], "s_mid": []}
    for k in range(n_frames):
        frame = await twin.acquire(GEOMETRY)
        t0 = time.perf_counter()
        atoms = finder.find(frame)
        find_ms.append(1e3 * (time.perf_counter() - t0))
        c0, h0 = time.process_time(), time.thread_time()
        est = stage.update(frame, atoms)
        (refit_cpu_ms if est.refit else upd_cpu_ms).append(1e3 * (time.process_time() - c0))
        if not est.refit:
            upd_thread_ms.append(1e3 * (time.thread_time() - h0))
        upd_ms.append(est.update_ms)
        refit_flags.append(est.refit)
        if est.refit:
            fit_ms.append(est.fit_ms)
        n_tracked.append(est.n_matched)
        inflation.append(list(est.band_inflation))
        xc.update(frame)
        kf.update(xc.t[-1], xc.s[-1])
        truth = twin.ground_truth.frame_truth(frame.index)
        seen_at = frame.geometry.pixel_to_sample(truth.pixels_rc)
        occupied = truth.species != ""
        dist, j = cKDTree(seen_at[occupied]).query(atoms.positions_A)
        known = (dist < 0.3) & (est.track_ids >= 0)
        X = truth.positions_A[occupied][j[known]]
        y = atoms.positions_A[known]
        t_at = est.atoms.times_s[known]
        gauge = np.mean(est.refined_positions_A[known] - X, axis=0)
        # intra-frame distortion: positions within the frame vs truth, frame mean removed
        r_gp = est.measured_positions_A[known] - X
        r_none = y - X
        distortion["gp"].append(r_gp - r_gp.mean(axis=0))
        distortion["none"].append(r_none - r_none.mean(axis=0))
        d_true_at = truth_d(t_at)
        d_gp_at = y - est.measured_positions_A[known]  # the stage's drift at each atom's time
        m_gp = d_gp_at - d_true_at
        model_distortion["gp"].append(m_gp - m_gp.mean(axis=0))
        model_distortion["none"].append(d_true_at - d_true_at.mean(axis=0))
        if record and k > 0:
            grid = est.times_s
            rec["t"].extend(grid.tolist())
            rec["d_true"].extend((truth_d(grid) - gauge).tolist())
            rec["d_gp"].extend(est.displacement_A.tolist())
            rec["sd_gp"].extend(est.std_A.tolist())
            rec["gauge"].append(gauge.tolist())
        if k < WARMUP:
            continue
        t_mid = 0.5 * (frame.start_time_s + frame.end_time_s)
        ref = est.refined_positions_A[known]
        ref_ids = est.track_ids[known]
        _, ref_sd = stage.reference_positions_A(ref_ids)
        for h in horizons:
            te = frame.end_time_s + h
            t1, c1 = time.perf_counter(), time.process_time()
            mu, sd = stage.forecast(te)
            if h == latency_s:
                fc_ms.append(1e3 * (time.perf_counter() - t1))
                fc_cpu_ms.append(1e3 * (time.process_time() - c1))
            d_te = truth_d(np.array([te]))  # (1, 2)
            land = {
                "gp": ref + mu[0],
                "none": y,
                "xcorr": y + xc.velocity(2) * (te - t_mid),
                "xcorr_lsq4": y + xc.velocity(4) * (te - t_mid),
                "kalman": y + kf.velocity() * (te - t_mid),
            }
            for m, b in land.items():
                err[m][h].append(b - d_te - X)
            z_h.setdefault(h, []).append((mu[0] - (d_te[0] - gauge)) / sd[0])
            if h == latency_s:
                z_fc.append((mu[0] - (d_te[0] - gauge)) / sd[0])
                place_sd = np.sqrt(sd[0][None, :] ** 2 + ref_sd[:, None] ** 2)
                z_place.append((ref + mu[0] - d_te - X) / place_sd)
        if record:
            te = frame.end_time_s + latency_s
            rec["t_x"].append(te)
            rec["s_x"].append((xc.s[-1] + xc.velocity(2) * (te - t_mid)).tolist())
            rec["fc_gp"].append(stage.forecast(te)[0][0].tolist())
            rec["d_true_x"].append((truth_d(np.array([te]))[0] - gauge).tolist())
            rec["t_mid"].append(t_mid)
            rec["s_mid"].append(xc.s[-1].tolist())
    await twin.close()

    def per_frame_rms(lst: list[np.ndarray]) -> float:
        return float(np.sqrt(np.mean([np.mean(np.sum(e**2, axis=1)) for e in lst])))

    zf = np.array(z_fc)
    zp = np.concatenate(z_place)
    out: dict[str, Any] = {
        "seed": seed,
        "placement_rms_A": {m: {str(h): per_frame_rms(v) for h, v in hs.items()} for m, hs in err.items()},
        "forecast_band95_coverage": float(np.mean(np.abs(zf) < 1.959964)),
        "placement_band95_coverage": float(np.mean(np.abs(zp) < 1.959964)),
        "forecast_band95_coverage_by_horizon": {str(h): float(np.mean(np.abs(np.array(z)) < 1.959964)) for h, z in z_h.items()},
        "forecast_z_mean": np.mean(zf, axis=0).tolist(),
        "forecast_z_std": np.std(zf, axis=0).tolist(),
        "distortion_rms_A": {m: per_frame_rms(v) for m, v in distortion.items()},
        "distortion_model_rms_A": {m: per_frame_rms(v) for m, v in model_distortion.items()},
        "update_ms_median": float(np.median(upd_ms[WARMUP:])),
        "update_ms_p90": float(np.percentile(upd_ms[WARMUP:], 90)),
        "update_without_refit_ms_median": float(np.median([u for u, r in zip(upd_ms[WARMUP:], refit_flags[WARMUP:]) if not r])),
        "refit_ms_median": float(np.median(fit_ms)) if fit_ms else float("nan"),
        "update_cpu_ms_median": float(np.median(upd_cpu_ms[WARMUP:])),
        "update_thread_cpu_ms_median": float(np.median(upd_thread_ms[WARMUP:])),
        "refit_frame_cpu_ms_median": float(np.median(refit_cpu_ms)) if refit_cpu_ms else float("nan"),
        "refit_cpu_ms_per_frame": float(np.sum(refit_cpu_ms) / n_frames),
        "forecast_cpu_ms_median": float(np.median(fc_cpu_ms)),
        "refits": len(fit_ms),
        "forecast_ms_median": float(np.median(fc_ms)),
        "find_ms_median": float(np.median(find_ms)),
        "xcorr_ms_median": float(np.median(xc.ms)),
        "tracked_atoms_median": float(np.median(n_tracked[WARMUP:])),
        "band_inflation_median": np.median(np.asarray(inflation[WARMUP:]), axis=0).tolist(),
        "hyperparameters": stage.gp.hyperparameters(),
    }
    if record:
        out["record"] = rec
    return out


def summarise(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "p25": float(np.percentile(a, 25)), "p75": float(np.percentile(a, 75)),
            "min": float(a.min()), "max": float(a.max())}


def figure(rec: dict[str, list], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(rec["t"])
    order = np.argsort(t, kind="stable")
    t = t[order]
    dt = np.asarray(rec["d_true"])[order]
    dg = np.asarray(rec["d_gp"])[order]
    sd = np.asarray(rec["sd_gp"])[order]
    tx = np.asarray(rec["t_x"])
    truth_x = np.asarray(rec["d_true_x"])
    fc = np.asarray(rec["fc_gp"])
    sx = np.asarray(rec["s_x"])
    t_mid = np.asarray(rec["t_mid"])
    s_mid = np.asarray(rec["s_mid"])
    # the cross-correlation baseline knows the drift only up to a constant: align it on the truth
    truth_mid = np.stack([np.interp(t_mid, t, dt[:, a]) for a in range(2)], axis=1)
    off = np.median(s_mid - truth_mid, axis=0)
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex="col", gridspec_kw={"width_ratios": [3, 2]})
    for a, name in enumerate(("x", "y")):
        left = axes[a, 0]
        left.plot(t, dt[:, a], color="k", lw=1.2, label="true drift (in the stage's sample frame)")
        left.plot(t, dg[:, a], color="tab:blue", lw=0.8, label="GP estimate, per frame")
        left.plot(t_mid, s_mid[:, a] - off[a], ".", ms=3, color="tab:red", label="phase cross-correlation, cumulative")
        left.set_ylabel(f"d_{name} (Å)")
        right = axes[a, 1]
        z = t > t.max() - 5.0
        right.fill_between(t[z], (dg - 1.96 * sd)[z, a] - dt[z, a], (dg + 1.96 * sd)[z, a] - dt[z, a],
                           color="tab:blue", alpha=0.25, lw=0, label="GP estimate - truth, 95% band")
        right.plot(t[z], dg[z, a] - dt[z, a], color="tab:blue", lw=0.8)
        zx = tx > t.max() - 5.0
        # chained shifts wander (their errors add up frame after frame); what a forecast needs is
        # the recent increments, so here the baseline is aligned on the truth over these 5 s only
        zm = t_mid > t.max() - 5.0
        off_here = np.median(s_mid[zm, a] - truth_mid[zm, a])
        right.plot(tx[zx], fc[zx, a] - truth_x[zx, a], "o", ms=3.5, color="tab:blue", label="GP forecast - truth")
        right.plot(tx[zx], sx[zx, a] - off_here - truth_x[zx, a], "s", ms=3.5, color="tab:red",
                   label="xcorr + linear forecast - truth")
        right.axhline(0, color="k", lw=0.5)
        right.set_ylabel(f"error {name} (Å)")
    axes[0, 0].legend(loc="best", fontsize=8)
    axes[0, 1].legend(loc="best", fontsize=7)
    axes[1, 0].set_xlabel("acquisition time (s)")
    axes[1, 1].set_xlabel("acquisition time (s)")
    fig.suptitle("Twin drift (seed 0): truth, GP and chained cross-correlation; right: the last 5 s, errors "
                 "(forecasts 0.1 s after each frame; xcorr aligned over these 5 s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1 (to split a run over processes)")
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--finder", choices=("log", "unet"), default="log")
    p.add_argument("--latency", type=float, default=0.1, help="time from a frame's end to the command, s")
    p.add_argument("--figure", default=None, help="write the figure of seed 0 here (PNG)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="DriftConfig fields (JSON values)")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    t0 = time.time()
    config = DriftConfig(**{k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)})
    runs = [asyncio.run(run_seed(s, args.frames, args.finder, args.latency, config, record=(s == 0 and args.figure is not None)))
            for s in range(args.first_seed, args.first_seed + args.seeds)]
    if args.figure:
        figure(runs[0].pop("record"), args.figure)
    lat = str(args.latency)
    methods = list(runs[0]["placement_rms_A"])
    summary: dict[str, Any] = {
        "placement_rms_A": {m: {h: summarise([r["placement_rms_A"][m][h] for r in runs]) for h in runs[0]["placement_rms_A"][m]}
                            for m in methods},
        "ratio_xcorr_over_gp": summarise([r["placement_rms_A"]["xcorr"][lat] / r["placement_rms_A"]["gp"][lat] for r in runs]),
        "ratio_best_baseline_over_gp": summarise([min(r["placement_rms_A"][m][lat] for m in ("xcorr", "xcorr_lsq4", "kalman"))
                                                  / r["placement_rms_A"]["gp"][lat] for r in runs]),
        "forecast_band95_coverage": summarise([r["forecast_band95_coverage"] for r in runs]),
        "placement_band95_coverage": summarise([r["placement_band95_coverage"] for r in runs]),
        "distortion_rms_A": {m: summarise([r["distortion_rms_A"][m] for r in runs]) for m in ("gp", "none")},
        "distortion_model_rms_A": {m: summarise([r["distortion_model_rms_A"][m] for r in runs]) for m in ("gp", "none")},
    }
    for key in ("update_ms_median", "update_ms_p90", "update_without_refit_ms_median", "update_cpu_ms_median", "update_thread_cpu_ms_median",
                "refit_frame_cpu_ms_median", "refit_cpu_ms_per_frame", "forecast_cpu_ms_median", "refit_ms_median", "forecast_ms_median", "find_ms_median",
                "xcorr_ms_median", "tracked_atoms_median"):
        summary[key] = summarise([r[key] for r in runs])
    result = {
        "benchmark": "drift",
        "args": vars(args),
        "config": config.model_dump(mode="json"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "wall_s": time.time() - t0,
        "summary": summary,
        "per_seed": runs,
    }
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
