"""Autonomous survey vs rasters, random and greedy sub-scans, on the twin (BENCHMARKS.md "Survey").

Field: a 50 nm x 50 nm (500 Å) square of graphene on the physical twin (60 keV, 30 mrad,
C30 = 1000 Å, 0.4 Å source, 30 pA, 0.002 background, counting detector, no drift, beam dynamics
off), Si dopants either **clustered** (Thomas process: 3 clusters of uneven size, sigma 12 Å) or
**uniform**; 45 Si in the 520 Å specimen, those inside the field are the ground truth.

Every method uses the same frames, taken through the ``Driver`` protocol of one twin per seed:
- an **overview**: 500 Å at 1024 px (0.49 Å/px), ``--overview-dose`` e/Å² (2000: 2 % of the
  high-resolution dose);
- **sub-scans**: 25.6 Å at 128 px (0.2 Å/px), ``--subscan-dose`` e/Å² (1e5), on the survey's
  20 x 20 candidate grid (0.6 Å overlap), each analysed by the shipped U-Net (Si class).

Methods (a dopant is found when a Si detection of a visited sub-scan lies within 1 Å of it):
- **full raster**: all 400 sub-scans (the dose reference, 100 %);
- **oracle raster**: the serpentine raster stopped as soon as 95 % are found (it knows the truth);
- **random**: sub-scans in a seeded random order, counted until 95 % are found (oracle stop);
- **greedy**: overview's brightest spot first (cells by the matched-filter maximum), oracle stop;
- **survey (ours)**: ``SurveyPolicy`` (GP on position + overview features, UCB, defaults) given
  its own dose budget of ``--budget-fraction`` (15 %) of the full raster, driving the twin live
  (overview, then each sub-scan it asks for, segmented as it comes) and **stopping by itself**
  (expected gain below ``min_expected_gain``, or the budget); also counted at the point it
  passes 95 % (its own order, oracle count);
- the same survey with its stopping switched off, replayed on the same per-cell results and
  counted until 95 % are found (the footing the baselines are counted on);
- variants on the same per-cell results (replayed): GP + qLogNEI, deep-kernel GP + UCB; the
  stopping rules ``remaining`` (share 0.03), ``remaining_beta4`` (and ``ucb_beta`` 4) and
  ``gain_replayed`` (the default rule, replayed: the footing the other two are compared on).
Also every method's recall after as many sub-scans as the survey took before it stopped.
Doses are electrons (dose x area), as fractions of the full raster; the overview counts for the
methods that use it (greedy, survey). Paired one-sided Wilcoxon signed-rank tests over seeds.

Decision time: wall time of ``decide`` on warm models (no refit), the refits and the acquisition
reported apart; torch at one thread.

Usage: ``python benchmarks/bench_survey.py --seeds 20 --out benchmarks/results/survey.json
--figure docs/survey.png`` (prints one JSON object).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.stats import wilcoxon

from stemagent.config import TwinConfig
from stemagent.policies.survey import SurveyPolicy
from stemagent.policies.survey_config import SurveyPolicyConfig
from stemagent.policies.survey_features import _field_pixels, spot_map
from stemagent.segmentation.unet_segmenter import UNetSegmenter
from stemagent.simulators.factory import twin_from_config
from stemagent.stages import Observation
from stemagent.types import ELECTRON_CHARGE_C, Atoms, Blank, Frame, ScanGeometry

FIELD_A = 500.0
SPECIMEN_A = 520.0
CURRENT_pA = 30.0
SUB_FOV_A = 25.6
SUB_PX = 128
OV_PX = 1024
MATCH_A = 1.0
TARGET = 0.95


def dwell_for(dose: float, pixel_A: float) -> float:
    return dose * ELECTRON_CHARGE_C * pixel_A**2 / (CURRENT_pA * 1e-12)


def twin_config(layout: str) -> TwinConfig:
    return TwinConfig(
        specimen="graphene", specimen_size_A=SPECIMEN_A, n_si=45, vacancy_per_nm2=0.005, si_layout=layout,
        si_n_clusters=3, si_cluster_sigma_A=12.0, energy_keV=60.0, convergence_mrad=30.0, C30_A=1000.0,
        source_fwhm_A=0.4, beam_current_pA=CURRENT_pA, background=0.002, dynamics=False, max_fov_A=600.0,
    )


def policy_config(subscan_dose: float, budget_fraction: float | None = None, n_candidates: int = 400, **kw: Any) -> SurveyPolicyConfig:
    """The policy's defaults; with ``budget_fraction`` its own dose budget is that share of the full
    raster's electrons (overview included), spread over the field's area."""
    if budget_fraction is not None:
        kw["dose_budget_field_e_per_A2"] = budget_fraction * n_candidates * subscan_dose * SUB_FOV_A**2 / FIELD_A**2
    return SurveyPolicyConfig(subscan_fov_A=SUB_FOV_A, subscan_shape_px=SUB_PX,
                              subscan_dwell_s=dwell_for(subscan_dose, SUB_FOV_A / SUB_PX), **kw)


def si_atoms(frame_index: int, det: np.ndarray) -> Atoms:
    return Atoms(det[:, :2], np.ones(len(det), dtype=np.int64), det[:, 2], frame_index, ("C", "Si", "vacancy"))


@dataclass
class Field:
    """One seed's frames and truth."""

    seed: int
    layout: str
    overview: Frame
    candidates: np.ndarray  # (n, 2)
    det: list[np.ndarray]  # per cell: (k, 3) x, y, confidence of Si detections
    truth: np.ndarray  # (m, 2) Si in the field
    hits: list[set[int]]  # per true Si: cells whose detections find it
    driver: Any
    segmenter: UNetSegmenter
    raster_s: float


def hits_of(truth: np.ndarray, det: list[np.ndarray]) -> list[set[int]]:
    pts = np.concatenate([d[:, :2] for d in det]) if any(len(d) for d in det) else np.zeros((0, 2))
    cell = np.concatenate([np.full(len(d), k) for k, d in enumerate(det)]) if len(pts) else np.zeros(0, int)
    if not len(pts):
        return [set() for _ in truth]
    tree = cKDTree(pts)
    return [set(int(cell[j]) for j in tree.query_ball_point(p, MATCH_A)) for p in truth]


def recall_curve(order: list[int], hits: list[set[int]]) -> np.ndarray:
    """Recall after each sub-scan of ``order``."""
    first = np.full(len(hits), np.inf)
    pos = {}
    for i, k in enumerate(order):
        pos.setdefault(k, i)
    for j, h in enumerate(hits):
        ks = [pos[k] for k in h if k in pos]
        if ks:
            first[j] = min(ks)
    return np.array([np.mean(first <= i) for i in range(len(order))]) if hits else np.ones(len(order))


def n_to_target(order: list[int], hits: list[set[int]]) -> int | None:
    r = recall_curve(order, hits)
    ok = np.flatnonzero(r >= TARGET - 1e-12)
    return int(ok[0]) + 1 if len(ok) else None


async def make_field(seed: int, layout: str, args: argparse.Namespace, seg: UNetSegmenter) -> Field:
    """One seed's twin, its overview and every grid sub-scan's Si detections (all through the
    ``Driver`` protocol). With ``args.cache`` set, the frames' results are also saved there."""
    drv = twin_from_config(twin_config(layout), seed=seed)
    pix = FIELD_A / OV_PX
    ov_geo = ScanGeometry(fov_A=(FIELD_A, FIELD_A), shape_px=(OV_PX, OV_PX), dwell_s=dwell_for(args.overview_dose, pix))
    overview = await drv.acquire(ov_geo)
    pol = SurveyPolicy(policy_config(args.subscan_dose), area_center_A=(0.0, 0.0), area_half_width_A=FIELD_A / 2,
                       beam_current_pA=CURRENT_pA)
    cand = pol.grid_A
    t0 = time.perf_counter()
    det: list[np.ndarray] = []
    batch: list[Frame] = []
    for k, c in enumerate(cand):
        batch.append(await drv.acquire(pol.subscan_geometry((float(c[0]), float(c[1])))))
        if len(batch) == 16 or k == len(cand) - 1:
            for atoms in seg.find_batch(batch):
                s = atoms.of_class("Si")
                det.append(np.concatenate([s.positions_A, s.confidence[:, None]], axis=1))
            batch = []
    sp = drv.ground_truth.specimen
    si = sp.positions_A[(sp.numbers == 14) & sp.present, :2]
    truth = si[np.all(np.abs(si) <= FIELD_A / 2 - 0.5, axis=1)]
    if getattr(args, "cache", None):
        os.makedirs(args.cache, exist_ok=True)
        np.savez_compressed(os.path.join(args.cache, f"{layout}_{seed}.npz"), overview=overview.image, truth=truth, candidates=cand,
                            det=np.concatenate(det), det_cell=np.concatenate([np.full(len(d), k) for k, d in enumerate(det)]))
    return Field(seed, layout, overview, cand, det, truth, hits_of(truth, det), drv, seg, time.perf_counter() - t0)


def greedy_order(f: Field) -> list[int]:
    g = f.overview.geometry
    z = spot_map(f.overview.image, g)
    zmax = np.array([z[_field_pixels(g, c, SUB_FOV_A / 2)].max() for c in f.candidates])
    return [int(k) for k in np.argsort(-zmax, kind="stable")]


def serpentine(n_side: int) -> list[int]:
    out: list[int] = []
    for j in range(n_side):
        row = list(range(j * n_side, (j + 1) * n_side))
        out += row if j % 2 == 0 else row[::-1]
    return out


def ov_obs(f: Field) -> Observation:
    o = f.overview
    return Observation(o.index, o.end_time_s, o.geometry, si_atoms(o.index, np.zeros((0, 3))), {"image": o.image})


async def run_survey(f: Field, cfg: SurveyPolicyConfig, live: bool, oracle_stop: bool = False) -> dict[str, Any]:
    """Drive the policy; ``live``: each sub-scan it asks for is acquired from the twin and segmented,
    else its per-cell result is replayed; ``oracle_stop``: end as soon as 95 % are found (the
    policy's own stopping then plays no part). Returns its order, stop reason, timings and the policy."""
    pol = SurveyPolicy(cfg, area_center_A=(0.0, 0.0), area_half_width_A=FIELD_A / 2, beam_current_pA=CURRENT_pA, seed=f.seed)
    obs = ov_obs(f)
    order: list[int] = []
    timing: list[dict[str, float]] = []
    live_det: list[np.ndarray] = []
    fi = 10_000
    while True:
        t, c = time.perf_counter(), time.thread_time()
        d = pol.decide(obs)
        tm = dict(pol.last_timing_s)
        tm["decide"] = time.perf_counter() - t
        tm["decide_cpu"] = time.thread_time() - c  # CPU time of this thread: what the load does not inflate
        tm["phase_model"] = float(d.details["phase"] == "model" or d.details["stop"])
        tm["refit"] = float(bool((d.details.get("model") or {}).get("refit")))
        timing.append(tm)
        if isinstance(d.command, Blank):
            break
        k = int(d.details["chosen"])
        order.append(k)
        if live:
            frame = await f.driver.acquire(d.command.geometry)
            atoms = f.segmenter.find(frame)
            s = atoms.of_class("Si")
            live_det.append(np.concatenate([s.positions_A, s.confidence[:, None]], axis=1))
            obs = Observation(frame.index, frame.end_time_s, frame.geometry, atoms)
        else:
            fi += 1
            obs = Observation(fi, float(fi), d.command.geometry, si_atoms(fi, f.det[k]))
        if len(order) > 2 * len(f.candidates):
            break
        if oracle_stop and recall_curve(order, f.hits)[-1] >= TARGET - 1e-12:
            break
    if live:  # recall from what the policy itself saw
        found = np.concatenate(live_det) if live_det else np.zeros((0, 3))
        rec = float(np.mean(cKDTree(found[:, :2]).query(f.truth)[0] <= MATCH_A)) if len(found) and len(f.truth) else 0.0
    else:
        rec = float(recall_curve(order, f.hits)[-1]) if order else 0.0
    return {"order": order, "n_stop": len(order), "recall_at_stop": rec, "n95": n_to_target(order, f.hits),
            "stop": d.reason, "timing": timing, "policy": pol}


def summarize_timing(rows: list[dict[str, float]]) -> dict[str, float]:
    warm = [r["decide"] for r in rows if r["phase_model"] and not r["refit"]]
    warm_cpu = [r["decide_cpu"] for r in rows if r["phase_model"] and not r["refit"] and "decide_cpu" in r]
    refit = [r.get("fit", 0.0) for r in rows if r["refit"]]
    acq = [r.get("acquisition", 0.0) for r in rows if r["phase_model"] and "acquisition" in r]
    upd = [r.get("fit", 0.0) for r in rows if r["phase_model"] and not r["refit"] and "fit" in r]
    ms = lambda v, q: round(1e3 * float(np.percentile(v, q)), 2) if v else None  # noqa: E731
    return {"warm_decide_ms_p50": ms(warm, 50), "warm_decide_ms_p95": ms(warm, 95),
            "warm_decide_cpu_ms_p50": ms(warm_cpu, 50), "warm_decide_cpu_ms_p95": ms(warm_cpu, 95), "warm_model_update_ms_p95": ms(upd, 95),
            "acquisition_ms_p50": ms(acq, 50), "acquisition_ms_p95": ms(acq, 95), "refit_ms_p50": ms(refit, 50),
            "refit_ms_p95": ms(refit, 95), "n_warm": len(warm), "n_refits": len(refit)}


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """One-sided Wilcoxon signed-rank: is ``a`` smaller than ``b``? (pairs with equal values drop out)."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    diff = x - y
    if np.all(diff == 0):
        return {"p_less": 1.0, "wins": 0, "ties": len(diff), "losses": 0}
    p = float(wilcoxon(x, y, alternative="less", zero_method="wilcox").pvalue)
    return {"p_less": round(p, 6), "wins": int(np.sum(diff < 0)), "ties": int(np.sum(diff == 0)), "losses": int(np.sum(diff > 0))}


def stats(v: list[float]) -> dict[str, float]:
    a = np.asarray(v, float)
    return {"median": round(float(np.median(a)), 4), "q25": round(float(np.percentile(a, 25)), 4),
            "q75": round(float(np.percentile(a, 75)), 4), "min": round(float(a.min()), 4), "max": round(float(a.max()), 4)}


async def one_seed(seed: int, layout: str, args: argparse.Namespace, seg: UNetSegmenter) -> tuple[dict[str, Any], Field, dict[str, Any]]:
    f = await make_field(seed, layout, args, seg)
    n = len(f.candidates)
    sub_e = args.subscan_dose * SUB_FOV_A**2
    full_e = n * sub_e
    ov_e = args.overview_dose * FIELD_A**2
    frac = lambda n_sub, ov: None if n_sub is None else round((n_sub * sub_e + (ov_e if ov else 0.0)) / full_e, 5)  # noqa: E731
    n_side = int(round(np.sqrt(n)))
    rng = np.random.default_rng(10_000 + seed)
    rnd = [n_to_target([int(k) for k in rng.permutation(n)], f.hits) for _ in range(args.random_repeats)]
    row: dict[str, Any] = {
        "seed": seed, "layout": layout, "n_si": len(f.truth), "cells_detecting_si": len({k for h in f.hits for k in h}),
        "full_raster_recall": round(float(recall_curve(list(range(n)), f.hits)[-1]), 4) if len(f.truth) else None,
        "raster_n95": n_to_target(serpentine(n_side), f.hits),
        "random_n95": float(np.median([r if r is not None else n for r in rnd])),
        "greedy_n95": n_to_target(greedy_order(f), f.hits),
        "raster_table_s": round(f.raster_s, 1),
    }
    cfg = policy_config(args.subscan_dose, args.budget_fraction, n)
    live = await run_survey(f, cfg, live=True)
    row["decision_time"] = summarize_timing(live["timing"])
    row.update(survey_n95=live["n95"], survey_n_stop=live["n_stop"], survey_recall_at_stop=round(live["recall_at_stop"], 4),
               survey_stop=live["stop"][:160])
    # the same policy with its stopping switched off, counted until 95 % are found (as the baselines are)
    free = await run_survey(f, policy_config(args.subscan_dose, None, n, stop_rule="gain", min_expected_gain=0.0), live=False, oracle_stop=True)
    row["survey_unstopped_n95"] = free["n95"]
    # every method's recall after as many sub-scans as the survey took before it stopped
    k = live["n_stop"]
    rnd_rec = [recall_curve([int(j) for j in np.random.default_rng(20_000 + seed + 1000 * r).permutation(n)], f.hits)[k - 1]
               for r in range(args.random_repeats)] if k else [0.0]
    row["recall_at_survey_subscans"] = {
        "survey": row["survey_recall_at_stop"],
        "greedy": round(float(recall_curve(greedy_order(f), f.hits)[k - 1]), 4) if k else 0.0,
        "oracle_raster_order": round(float(recall_curve(serpentine(n_side), f.hits)[k - 1]), 4) if k else 0.0,
        "random": round(float(np.median(rnd_rec)), 4),
    }
    for name, kw in (("qlognei", {"acquisition": "qlognei"}), ("deep_kernel", {"model": "deep_kernel"}),
                     ("remaining", {"stop_rule": "remaining", "stop_remaining_share": 0.03}),
                     ("remaining_beta4", {"stop_rule": "remaining", "stop_remaining_share": 0.03, "ucb_beta": 4.0}),
                     ("gain_replayed", {"stop_rule": "gain"}), *args.variant_configs.items()):
        if name in args.variants:
            r = await run_survey(f, policy_config(args.subscan_dose, args.budget_fraction, n, **kw), live=False)
            row.update({f"{name}_n95": r["n95"], f"{name}_n_stop": r["n_stop"], f"{name}_recall_at_stop": round(r["recall_at_stop"], 4)})
    row["dose_fraction"] = {
        "oracle_raster": frac(row["raster_n95"], False), "random": frac(row["random_n95"], False),
        "greedy": frac(row["greedy_n95"], True), "survey_at_95": frac(row["survey_n95"], True),
        "survey_at_stop": frac(row["survey_n_stop"], True), "overview": round(ov_e / full_e, 5),
    }
    return row, f, live


def summarize(rows: list[dict[str, Any]], timings: list[dict[str, float]], variants: list[str]) -> dict[str, Any]:
    n_cells = 400.0
    big = lambda v: n_cells if v is None else float(v)  # noqa: E731  (never reached: counted as the whole grid)
    df = [r["dose_fraction"] for r in rows]
    s: dict[str, Any] = {
        "seeds": len(rows),
        "n_si": stats([r["n_si"] for r in rows]),
        "full_raster_recall": stats([r["full_raster_recall"] for r in rows]),
        "subscans_to_95": {
            "oracle_raster": stats([big(r["raster_n95"]) for r in rows]), "random": stats([r["random_n95"] for r in rows]),
            "greedy": stats([big(r["greedy_n95"]) for r in rows]), "survey": stats([big(r["survey_n95"]) for r in rows]),
        },
        "survey_unstopped_subscans_to_95": stats([big(r["survey_unstopped_n95"]) for r in rows]),
        "recall_at_survey_subscans": {m: stats([r["recall_at_survey_subscans"][m] for r in rows])
                                      for m in ("survey", "greedy", "oracle_raster_order", "random")},
        "survey_self_stop": {
            "subscans": stats([r["survey_n_stop"] for r in rows]), "recall": stats([r["survey_recall_at_stop"] for r in rows]),
            "seeds_recall_ge_95": int(sum(r["survey_recall_at_stop"] >= TARGET for r in rows)),
        },
        # a method that never reaches 95 % is charged the whole raster
        "dose_fraction_of_full_raster": {k: stats([1.0 if d[k] is None else d[k] for d in df])
                                         for k in ("oracle_raster", "random", "greedy", "survey_at_95", "survey_at_stop", "overview")},
        "survey_stop_dose_over_oracle_raster": stats([d["survey_at_stop"] / max(d["oracle_raster"] or 1.0, 1e-9) for d in df]),
        "paired": {
            "survey_at_stop_vs_oracle_raster_dose": paired([d["survey_at_stop"] for d in df], [d["oracle_raster"] or 1.0 for d in df]),
            "survey_unstopped_n95_vs_greedy_n95": paired([big(r["survey_unstopped_n95"]) for r in rows], [big(r["greedy_n95"]) for r in rows]),
            "survey_unstopped_n95_vs_random_n95": paired([big(r["survey_unstopped_n95"]) for r in rows], [r["random_n95"] for r in rows]),
            "survey_unstopped_n95_vs_oracle_raster_n95": paired([big(r["survey_unstopped_n95"]) for r in rows], [big(r["raster_n95"]) for r in rows]),
            "survey_stop_vs_greedy_n95": paired([r["survey_n_stop"] for r in rows], [big(r["greedy_n95"]) for r in rows]),
            "survey_stop_vs_random_n95": paired([r["survey_n_stop"] for r in rows], [r["random_n95"] for r in rows]),
            # same number of sub-scans: does the survey find more? (negated so 'less' means survey better)
            "greedy_recall_vs_survey_at_its_stop": paired([r["recall_at_survey_subscans"]["greedy"] for r in rows], [r["survey_recall_at_stop"] for r in rows]),
            "random_recall_vs_survey_at_its_stop": paired([r["recall_at_survey_subscans"]["random"] for r in rows], [r["survey_recall_at_stop"] for r in rows]),
        },
        "decision_time": summarize_timing(timings),
    }
    for v in variants:
        s[f"variant_{v}"] = {"subscans_to_95": stats([big(r[f"{v}_n95"]) for r in rows]),
                             "self_stop_subscans": stats([r[f"{v}_n_stop"] for r in rows]),
                             "self_stop_recall": stats([r[f"{v}_recall_at_stop"] for r in rows]),
                             "vs_gp_ucb_n95": paired([big(r[f"{v}_n95"]) for r in rows], [big(r["survey_n95"]) for r in rows])}
    return s


def figure(path: str, f: Field, live: dict[str, Any], row: dict[str, Any], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from stemagent.policies.survey_model import posterior_mean_sd

    pol: SurveyPolicy = live["policy"]
    fig, ax = plt.subplots(1, 4, figsize=(20, 5.2))
    half = FIELD_A / 2
    ext = (-half, half, half, -half)
    img = f.overview.image.astype(float)
    img = img.reshape(OV_PX // 4, 4, OV_PX // 4, 4).mean(axis=(1, 3))
    ax[0].imshow(img, cmap="gray", extent=ext, vmax=np.percentile(img, 99.5))
    ax[0].scatter(f.truth[:, 0], f.truth[:, 1], s=6, c="red", label="Si (truth)")
    for i, k in enumerate(live["order"]):
        c = f.candidates[k]
        ax[0].add_patch(Rectangle((c[0] - SUB_FOV_A / 2, c[1] - SUB_FOV_A / 2), SUB_FOV_A, SUB_FOV_A, fill=False, ec="cyan", lw=0.8))
        ax[0].text(c[0], c[1], str(i + 1), color="yellow", fontsize=6, ha="center", va="center")
    ax[0].set_title(f"overview ({args.overview_dose:g} e/Å²), Si, sub-scans in order\n(seed {f.seed}, {row['layout']})")
    ax[0].legend(loc="lower right", fontsize=7)
    n_side = int(round(np.sqrt(len(f.candidates))))
    model = pol.surrogate.model if pol.surrogate is not None else None
    if model is not None and pol._X_all is not None:
        m, s = posterior_mean_sd(model, pol._X_all)
        mean = np.expm1(m.numpy()).reshape(n_side, n_side)
        sd = s.numpy().reshape(n_side, n_side)
        im1 = ax[1].imshow(mean, extent=ext, cmap="viridis")
        plt.colorbar(im1, ax=ax[1], fraction=0.046)
        im2 = ax[2].imshow(sd, extent=ext, cmap="magma")
        plt.colorbar(im2, ax=ax[2], fraction=0.046)
    ax[1].set_title("surrogate mean at the stop\n(expected Si per sub-scan)")
    ax[2].set_title("surrogate sd at the stop\n(log(1 + Si) units)")
    sub_e = args.subscan_dose * SUB_FOV_A**2
    full_e = len(f.candidates) * sub_e
    ov = args.overview_dose * FIELD_A**2 / full_e
    n = len(f.candidates)

    def curve(order: list[int], with_ov: bool, label: str, style: str) -> None:
        r = recall_curve(order, f.hits)
        x = (np.arange(1, len(order) + 1) * sub_e) / full_e + (ov if with_ov else 0.0)
        ax[3].plot(x, r, style, label=label)

    curve(serpentine(n_side), False, "raster (serpentine)", "k-")
    curve(greedy_order(f), True, "greedy: brightest spot first", "C1-")
    curve([int(k) for k in np.random.default_rng(10_000 + f.seed).permutation(n)], False, "random", "C2-")
    curve(live["order"], True, "survey (ours, to its own stop)", "C0-")
    ax[3].axhline(TARGET, color="gray", lw=0.8, ls="--")
    ax[3].axvline(0.15, color="gray", lw=0.8, ls=":")
    ax[3].set_xscale("log")
    ax[3].set_xlim(1e-3, 1.0)
    ax[3].set_xlabel("dose (fraction of the full high-resolution raster)")
    ax[3].set_ylabel("fraction of Si found")
    ax[3].legend(fontsize=7, loc="upper left")
    ax[3].set_title("dopants found vs dose")
    for a in ax[:3]:
        a.set_xlabel("x (Å)")
        a.set_ylabel("y (Å)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save_json(path: str, doc: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(doc, default=str))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    seg = UNetSegmenter(device="cpu", num_threads=args.threads)
    out: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                    "load_avg_start": list(os.getloadavg())},
        "setup": {"field_A": FIELD_A, "subscan_fov_A": SUB_FOV_A, "subscan_px": SUB_PX, "overview_px": OV_PX,
                  "overview_dose_e_per_A2": args.overview_dose, "subscan_dose_e_per_A2": args.subscan_dose,
                  "segmenter": "shipped U-Net (UNetSegmenter, class Si)", "match_A": MATCH_A, "target_recall": TARGET,
                  "survey_budget_fraction": args.budget_fraction, "survey_config": policy_config(args.subscan_dose, args.budget_fraction).model_dump(mode="json")},
        "layouts": {},
    }
    t0 = time.perf_counter()
    for layout in args.layouts:
        seeds = list(range(args.seed_offset, args.seed_offset + (args.seeds if layout == "clustered" else args.uniform_seeds)))
        rows, timings = [], []
        for seed in seeds:
            row, f, live = await one_seed(seed, layout, args, seg)
            rows.append(row)
            timings.extend(live["timing"])
            if args.verbose:
                print(json.dumps(row), flush=True)
            if args.out:  # what is done so far, in case the run is cut short
                save_json(args.out + ".partial", {**out, "partial_layout": layout, "partial_rows": rows, "partial_timings": timings})
            if args.figure and layout == "clustered" and seed == seeds[0]:
                figure(args.figure, f, live, row, args)
        out["layouts"][layout] = {"summary": summarize(rows, timings, args.variants), "per_seed": rows}
    out["machine"]["load_avg_end"] = list(os.getloadavg())
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--uniform-seeds", type=int, default=None, help="seeds of the uniform layout (default: --seeds)")
    ap.add_argument("--seed-offset", type=int, default=0)
    ap.add_argument("--layouts", default="clustered,uniform")
    ap.add_argument("--variant-config", action="append", default=[], metavar="NAME=JSON",
                    help="a replayed variant of your own: the survey config's fields to change, e.g. "
                         "'floor30={\"min_subscans_before_stop\": 30}' (repeatable)")
    ap.add_argument("--variants", default="qlognei,deep_kernel", help="replayed variants: qlognei, deep_kernel, remaining, remaining_beta4, gain_replayed (comma list, or '')")
    ap.add_argument("--overview-dose", type=float, default=2000.0)
    ap.add_argument("--subscan-dose", type=float, default=1e5)
    ap.add_argument("--random-repeats", type=int, default=20)
    ap.add_argument("--budget-fraction", type=float, default=0.15, help="the survey's own dose budget, share of the full raster (0 = none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--figure", default=None)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--cache", default=None, help="save each seed's overview and per-sub-scan detections here (npz)")
    args = ap.parse_args()
    args.layouts = [s for s in args.layouts.split(",") if s]
    args.variants = [s for s in args.variants.split(",") if s]
    args.variant_configs = {}
    for item in args.variant_config:
        name, _, cfg = item.partition("=")
        args.variant_configs[name] = json.loads(cfg)
        args.variants.append(name)
    args.uniform_seeds = args.uniform_seeds if args.uniform_seeds is not None else args.seeds
    args.budget_fraction = args.budget_fraction or None
    torch.set_num_threads(args.threads)
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
