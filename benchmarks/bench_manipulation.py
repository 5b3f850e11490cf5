"""Benchmark: move a Si dopant 5 sites through graphene on the twin, BO policy vs greedy vs random.

Every run: a twin (graphene, one Si placed at the sheet's centre, a seed-drawn target 5 bonds
away), a survey scan (20 Å, 1e4 e/Å²) segmented by the shipped U-Net, then the ordinary agent run
(``stemagent run`` with ``policy.kind: manipulation``: park -> steps in the signal -> small
confirmation scan -> U-Net -> outcome -> model update -> re-plan), every command through the
safety gate. The three policies run on the same twin seeds in the same process.

Conditions: ``physical`` (the twin's default probe-overlap hop rate), ``random`` (a random rate
function per seed: Gaussian bumps in bond-frame offset space, :mod:`stemagent.simulators.hop_rates`)
and ``empirical`` (the stylised empirical map). Ground truth: every swap and knock-on event of the
twin, so success (Si on the target and no damage), hops to the intended site, to other sites closer to the target and away from it (wrong direction), damage
and the park-signal detection precision and recall are measured against it.

    .venv/bin/python benchmarks/bench_manipulation.py --seeds 20                # the BENCHMARKS.md run
    .venv/bin/python benchmarks/bench_manipulation.py --tune-greedy --seeds 10  # greedy's offset and dwell
    .venv/bin/python benchmarks/bench_manipulation.py --seeds 10 --seed-offset 100 --strategies bo \
        --policy '{"model": {"level_sd": 0.75}}' --out variant.json          # a prior variant on tuning seeds

Paired comparison (the default since 2026-12-02; ``--unpaired`` for the older runs): the twin's
beam-induced events come from per-channel clocks (``TwinConfig.common_random_numbers``,
:class:`stemagent.simulators.dynamics.ChannelClocks`): the ``n``-th hop of the Si from site ``a``
into site ``b`` (and every knock-on at a site) happens when the hazard the beam has put on that
channel passes a unit-exponential threshold drawn from ``(seed, kind, a, b, n)``. Within a seed the
three policies therefore face the same threshold for every bond and attempt: a policy that puts
the same dose on the same bond gets the same hop, and a confirmation scan or an extra park no
longer reshuffles every later draw (as it did with one random stream for everything). Shot noise
and scan jitter stay on the twin's own stream (they differ between policies, as they must: the
policies read different signals). The summary gives, per condition, the per-seed ratios of bo
over greedy (dose and beam-on time), their median and a Wilcoxon signed-rank test of the paired
log doses, next to the ratio of medians.

Prints one JSON document (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import shortest_path
from scipy.spatial import cKDTree
from scipy.stats import wilcoxon

from stemagent.agent.app.factory import build_agent
from stemagent.clock import VirtualClock
from stemagent.config import RunConfig, TwinConfig, config_from_dict
from stemagent.policies.manipulation import ManipulationConfig, ManipulationPolicy
from stemagent.policies.manipulation.config import BaselineConfig, StopConfig
from stemagent.simulators.factory import specimen_from_config, twin_from_config
from stemagent.runlog import RunLog

HOPS = 5
FAR_A = 0.3  # a park farther than this from the aimed-at carbon explores (diagnostics)
MAX_PARKS = 3000  # per run; the dose budgets are left open so every policy can finish
SURVEY_FOV_A = 24.0


PAIRED = [True]  # --unpaired sets it False: the twin's events from its one random stream, as before 2026-12-02


def twin_config(condition: str) -> TwinConfig:
    return TwinConfig(
        common_random_numbers=PAIRED[0],
        specimen="graphene", specimen_size_A=60.0, n_si=1, vacancy_per_nm2=0.0,
        C12_A=5.0, C30_A=1000.0, source_fwhm_A=0.4, beam_current_pA=20.0,
        swap_rate_model=condition, swap_site_sigma=0.3, c_knock_on_barn=2e-5,
        drift_velocity_A_per_s=(0.003, -0.002), drift_random_walk_A_per_sqrt_s=0.003,
        park_sample_interval_s=1e-3,
    )


def build_case(condition: str, seed: int):
    """The twin with its Si moved to the site nearest the centre, and a target 5 bonds away."""
    cfg = twin_config(condition)
    sp = specimen_from_config(cfg, np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[0]))
    si = int(np.flatnonzero(sp.numbers == 14)[0])
    centre = int(np.argmin(np.linalg.norm(sp.positions_A[:, :2], axis=1)))
    for a, b in ((si, 6), (centre, 14)):
        sp.numbers[a] = b
        sp.positions_A[a, 2] = 0.9 if b == 14 else 0.0
    clock = VirtualClock()
    twin = twin_from_config(cfg, clock=clock, seed=seed, specimen=sp)
    sites = sp.sites_A
    pairs = cKDTree(sites).query_pairs(1.6, output_type="ndarray")
    adj = csr_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(sites), len(sites)))
    s0 = int(sp.site_of_atom[centre])
    dist = shortest_path(adj, directed=False, unweighted=True, indices=s0)
    target = int(np.random.default_rng([seed, 5]).choice(np.flatnonzero(dist == HOPS)))
    return cfg, clock, twin, s0, target


def hops_to_target(twin, target: int) -> tuple[np.ndarray, cKDTree]:  # type: ignore[no-untyped-def]
    """Bonds from every site to the target site (ground-truth lattice), and a tree to find a site by position."""
    sites = twin.specimen.sites_A
    tree = cKDTree(sites)
    pairs = tree.query_pairs(1.6, output_type="ndarray")
    adj = csr_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(sites), len(sites)))
    return shortest_path(adj, directed=False, unweighted=True, indices=target), tree


POLICY_OVERRIDES: dict[str, dict[str, Any]] = {}  # --policy: sections of ManipulationConfig to change (prior tuning)


def policy_config(strategy: str, target_A, dopant_A, baseline: BaselineConfig) -> ManipulationConfig:
    doc = ManipulationConfig(strategy=strategy, target_A=tuple(target_A), dopant_A=tuple(dopant_A), baseline=baseline,
                             stop=StopConfig(max_parks=MAX_PARKS)).model_dump()
    for section, values in POLICY_OVERRIDES.items():
        doc[section].update(values)
    return ManipulationConfig(**doc)


def run_config(condition: str, strategy: str, survey_center_A: tuple[float, float], target_A: Any, dopant_A: Any,
               baseline: BaselineConfig, seed: int) -> RunConfig:
    """The ordinary run configuration of one benchmark run (``policy.kind: manipulation``)."""
    return config_from_dict({
        "name": f"bench-manip-{condition}-{strategy}-{seed}", "seed": seed, "max_frames": 100000,
        "driver": twin_config(condition).model_dump(mode="json"),
        "scan": {"center_A": list(survey_center_A), "fov_A": SURVEY_FOV_A, "shape_px": 120, "dwell_s": 1e-5},
        "pipeline": {"segmenter": {"kind": "unet", "device": "cpu", "num_threads": 1}},
        "policy": policy_config(strategy, target_A, dopant_A, baseline).model_dump(mode="json"),
        "safety": {"area_center_A": list(survey_center_A), "area_half_width_A": 20.0, "max_fov_A": 40.0, "max_park_s": 10.0,
                   "dose_budget_e_per_A2": 1e14, "max_commands_per_s": 1e6},
        "log": {"directory": "runs", "fsync": False},
    }, source="<bench_manipulation>")


class Timed:
    """Wall and CPU (this thread) time of each of the policy's calls, and per park whether the
    change-point test found a step and where the policy aimed the dopant; installed on the policy
    instance the agent built (the pipeline calls the instance's methods)."""

    def __init__(self, policy: ManipulationPolicy) -> None:
        self.wall_s: list[float] = []
        self.cpu_s: list[float] = []
        self.detected: list[bool] = []
        self.intended_A: list[np.ndarray] = []
        self.offset_A: list[float] = []  # beam to the aimed-at carbon, per park (where the dose goes)
        decide, observe = policy.decide, policy.observe_park

        def timed_decide(obs: Any) -> Any:
            return self._time(decide, obs)

        def timed_observe(obs: Any) -> Any:
            p = policy.pending_park
            self.intended_A.append(p.positions_A[p.intended_node].copy() if p is not None else np.full(2, np.nan))
            self.offset_A.append(float(np.linalg.norm(np.asarray(p.position_A) - p.positions_A[p.intended_node]))
                                 if p is not None else float("nan"))
            before = policy.stats.parks_with_steps
            out = self._time(observe, obs)
            self.detected.append(policy.stats.parks_with_steps > before)
            return out

        policy.decide = timed_decide  # type: ignore[method-assign]
        policy.observe_park = timed_observe  # type: ignore[method-assign]

    def _time(self, fn: Any, obs: Any) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn(obs)
        self.wall_s.append(time.perf_counter() - t0)
        self.cpu_s.append(time.thread_time() - c0)
        return out


async def one_run(condition: str, seed: int, strategy: str, baseline: BaselineConfig, log_dir: Path) -> dict[str, Any]:
    """One experiment through the ordinary agent run (``build_agent`` + ``Agent.run``, the pipeline
    U-Net -> manipulation policy, every command through the safety gate), then the ground truth of
    every park read against the twin's events."""
    _, clock, twin, s0, target = build_case(condition, seed)
    sp = twin.specimen
    start_A, target_A = sp.sites_A[s0].copy(), sp.sites_A[target].copy()
    centre = (float((start_A[0] + target_A[0]) / 2), float((start_A[1] + target_A[1]) / 2))
    cfg = run_config(condition, strategy, centre, target_A, start_A, baseline, seed)
    gt = twin.ground_truth
    si_atom = int(np.flatnonzero(sp.numbers == 14)[0])
    to_target, site_tree = hops_to_target(twin, target)

    t0 = time.perf_counter()
    c0 = time.process_time()
    agent = await build_agent(cfg, run_dir=log_dir / f"{condition}-{strategy}-{seed}", driver=twin, clock=clock)
    policy = agent.policy
    assert isinstance(policy, ManipulationPolicy)
    timed = Timed(policy)
    summary = await agent.run()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0

    log = RunLog.open(summary.log_path)
    parks = []
    for k, doc in enumerate(log.event_data("parks")):
        t_a, t_b = doc["start_time_s"], doc["start_time_s"] + doc["dwell_s"] + 1e-9
        kinds = []
        first_event_s = None
        for e in gt.events:
            if not t_a <= e.time_s < t_b:
                continue
            first_event_s = e.time_s if first_event_s is None else min(first_event_s, e.time_s)
            if e.kind == "swap" and si_atom in e.atoms:
                j = e.atoms.index(si_atom)
                old = int(site_tree.query(e.positions_before_A[j])[1])
                new = int(site_tree.query(e.positions_after_A[j])[1])
                aimed = k < len(timed.intended_A) and np.linalg.norm(np.asarray(e.positions_after_A[j]) - timed.intended_A[k]) < 0.6
                kinds.append("intended" if aimed and to_target[new] < to_target[old] else
                             "toward" if to_target[new] < to_target[old] else "away")
            else:
                kinds.append(e.kind)
        off = timed.offset_A[k] if k < len(timed.offset_A) else float("nan")
        parks.append({"start": t_a, "events": kinds, "dwell_s": doc["dwell_s"], "offset_A": off,
                      "after_event_s": 0.0 if first_event_s is None else t_b - first_event_s})
    knock = sum(1 for e in gt.events if e.kind == "knock_on")
    final_site = int(sp.site_of_atom[si_atom])
    st = policy.stats.to_dict()
    return {
        "condition": condition, "seed": seed, "strategy": strategy,
        "success": bool(final_site == target and knock == 0),
        "reached": bool(final_site == target),
        "stop_reason": policy.stop_reason or summary.reason,
        "exit_status": summary.exit_status, "beam_blanked_at_end": summary.beam_blanked_at_end,
        "dose_e_per_A2": st["dose_e_per_A2"],
        "beam_s": st["park_s"] + st["scan_s"],
        "parks": int(st["parks"]), "confirm_scans": int(st["confirm_scans"]),
        # where the beam time went: parks within 0.3 Å of the aimed-at carbon, farther, and after a park's first event
        "park_s_on_carbon": float(sum(p["dwell_s"] for p in parks if p["offset_A"] <= FAR_A)),
        "park_s_far": float(sum(p["dwell_s"] for p in parks if not p["offset_A"] <= FAR_A)),
        "park_s_after_event": float(sum(p["after_event_s"] for p in parks)),
        "intended_hops": sum(p["events"].count("intended") for p in parks),
        "toward_hops": sum(p["events"].count("toward") for p in parks),
        "away_hops": sum(p["events"].count("away") for p in parks),
        "damage_events": knock,
        "parks_truth": [len(p["events"]) > 0 for p in parks],
        "parks_stepped": timed.detected[: len(parks)],
        "parks_detected": [k in policy.moved_parks for k in range(len(parks))],
        "decision_ms": [1e3 * t for t in timed.wall_s],
        "decision_cpu_ms": [1e3 * t for t in timed.cpu_s],
        "loop_latency_ms_p95": summary.latency_ms_p95,
        "wall_s": wall, "cpu_s": cpu,
        "swap_rate": gt.swap_rate.get("model", "physical"),
        "fallback_at_park": policy.fallback_at_park,
        "ambiguous_parks": int(st["ambiguous_parks"]), "ambiguous_moves": int(st["ambiguous_moves"]),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    keys = sorted({(r["condition"], r["strategy"]) for r in runs})
    for cond, strat in keys:
        rs = [r for r in runs if r["condition"] == cond and r["strategy"] == strat]
        dose = np.array([r["dose_e_per_A2"] for r in rs])
        beam = np.array([r["beam_s"] for r in rs])
        dms = np.concatenate([r["decision_ms"] for r in rs]) if rs else np.zeros(1)
        cms = np.concatenate([r["decision_cpu_ms"] for r in rs]) if rs else np.zeros(1)
        out[f"{cond}/{strat}"] = {
            "runs": len(rs),
            "success_rate": float(np.mean([r["success"] for r in rs])),
            "dose_median_e_per_A2": float(np.median(dose)),
            "dose_iqr_e_per_A2": [float(np.percentile(dose, 25)), float(np.percentile(dose, 75))],
            "beam_median_s": float(np.median(beam)),
            "beam_iqr_s": [float(np.percentile(beam, 25)), float(np.percentile(beam, 75))],
            "parks_median": float(np.median([r["parks"] for r in rs])),
            "intended_hops": int(sum(r["intended_hops"] for r in rs)),
            "toward_hops": int(sum(r["toward_hops"] for r in rs)),
            "away_hops": int(sum(r["away_hops"] for r in rs)),
            "damage_events": int(sum(r["damage_events"] for r in rs)),
            "decision_ms_p50": float(np.percentile(dms, 50)),
            "decision_ms_p95": float(np.percentile(dms, 95)),
            "decision_cpu_ms_p50": float(np.percentile(cms, 50)),
            "decision_cpu_ms_p95": float(np.percentile(cms, 95)),
            "detection": detection(rs, "parks_detected"),
            "detection_signal_only": detection(rs, "parks_stepped"),
            "ambiguous_parks": int(sum(r["ambiguous_parks"] for r in rs)),
            "stop_reasons": sorted({r["stop_reason"] for r in rs if not r["success"]}),
            "cpu_s_per_run": float(np.mean([r["cpu_s"] for r in rs])),
        }
        if all("park_s_far" in r for r in rs):  # runs since 2026-12-02: where the beam time went
            for key in ("park_s_on_carbon", "park_s_far", "park_s_after_event"):
                out[f"{cond}/{strat}"][f"{key}_median"] = float(np.median([r[key] for r in rs]))
    for cond in sorted({k[0] for k in keys}):
        b, g = out.get(f"{cond}/bo"), out.get(f"{cond}/greedy")
        if b and g:
            out[f"{cond}/ratio_bo_over_greedy"] = {
                "dose_median": b["dose_median_e_per_A2"] / g["dose_median_e_per_A2"],
                "beam_median": b["beam_median_s"] / g["beam_median_s"],
            }
        if b and g:
            out[f"{cond}/paired_bo_over_greedy"] = paired(runs, cond, "bo", "greedy")
    out["detection_all"] = detection(runs, "parks_detected")
    out["detection_all_signal_only"] = detection(runs, "parks_stepped")
    return out


def paired(runs: list[dict[str, Any]], cond: str, a: str, b: str) -> dict[str, Any]:
    """Per-seed ratios of ``a`` over ``b`` (dose, beam-on time) on the seeds both ran, their median and
    quartiles, and a two-sided Wilcoxon signed-rank test of the paired log ratios (H0: median ratio 1)."""
    by = {(r["seed"], r["strategy"]): r for r in runs if r["condition"] == cond}
    seeds = sorted(s for s, st in by if st == a and (s, b) in by)
    out: dict[str, Any] = {"seeds": len(seeds)}
    for key, name in (("dose_e_per_A2", "dose"), ("beam_s", "beam")):
        lr = np.log([by[(s, a)][key] / by[(s, b)][key] for s in seeds])
        ties = int(np.sum(np.abs(lr) < 1e-12))
        p = float(wilcoxon(lr).pvalue) if len(lr) - ties > 0 else 1.0
        out[name] = {"ratio_median": float(np.exp(np.median(lr))),
                     "ratio_iqr": [float(np.exp(np.percentile(lr, 25))), float(np.exp(np.percentile(lr, 75)))],
                     "geomean": float(np.exp(np.mean(lr))), "a_wins": int(np.sum(lr < -1e-12)), "ties": ties,
                     "wilcoxon_p": p, "per_seed": {int(s): float(np.exp(v)) for s, v in zip(seeds, lr)}}
    return out


def detection(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Per-park precision and recall of "something moved" against the twin's events. ``parks_detected``:
    a step in the park signal, or an ambiguous signal whose confirmation scan showed a move;
    ``parks_stepped``: a step in the park signal alone."""
    truth = np.concatenate([np.asarray(r["parks_truth"], bool) for r in runs])
    det = np.concatenate([np.asarray(r[key], bool) for r in runs])
    tp, fp, fn = int((truth & det).sum()), int((~truth & det).sum()), int((truth & ~det).sum())
    return {"parks": int(len(truth)), "tp": tp, "fp": fp, "fn": fn,
            "precision": tp / max(1, tp + fp), "recall": tp / max(1, tp + fn)}


ARRAYS = ("decision_ms", "decision_cpu_ms", "parks_truth", "parks_detected", "parks_stepped")


def slim(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs without their per-park arrays (the summary has what they give), to keep the result file small."""
    return [{k: v for k, v in r.items() if k not in ARRAYS} for r in runs]


def figure(runs: list[dict[str, Any]], path: Path) -> None:
    """Dose to the goal per run (log scale), one panel per condition, one column of points per policy."""
    import matplotlib  # only for --figure: the benchmark runs without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["physical", "random", "empirical"]
    conds = sorted({r["condition"] for r in runs}, key=lambda c: order.index(c) if c in order else len(order))
    strategies = ["bo", "greedy", "random"]
    fig, axes = plt.subplots(1, len(conds), figsize=(4.2 * len(conds), 3.6), sharey=True)
    for ax, cond in zip(np.atleast_1d(axes), conds):
        for i, strat in enumerate(strategies):
            dose = np.array([r["dose_e_per_A2"] for r in runs if r["condition"] == cond and r["strategy"] == strat])
            if not len(dose):
                continue
            x = i + np.random.default_rng(i).uniform(-0.15, 0.15, len(dose))
            ax.scatter(x, dose, s=12, alpha=0.7)
            ax.hlines(np.median(dose), i - 0.3, i + 0.3, color="k")
        ax.set_xticks(range(len(strategies)), strategies)
        ax.set_yscale("log")
        ax.set_title(f"{cond} hop rates (n={sum(1 for r in runs if r['condition'] == cond) // len(strategies)})")
    np.atleast_1d(axes)[0].set_ylabel("dose to move the Si 5 sites, e/Å²")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--seed-offset", type=int, default=0)
    ap.add_argument("--conditions", default="physical,random")
    ap.add_argument("--strategies", default="bo,greedy,random")
    ap.add_argument("--greedy-offset-A", type=float, default=None, help="default: the tuned value below")
    ap.add_argument("--greedy-dwell-s", type=float, default=None)
    ap.add_argument("--tune-greedy", action="store_true", help="grid over greedy offset x dwell on the physical twin")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/manipulation.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--policy", type=json.loads, default={},
                    help='JSON: ManipulationConfig sections to change, e.g. \'{"model": {"level_sd": 0.75}}\' (prior tuning)')
    ap.add_argument("--log-dir", type=Path, default=None, help="keep the run logs here (default: a temporary folder, removed)")
    ap.add_argument("--unpaired", action="store_true",
                    help="draw the twin's events from its one random stream (the runs before 2026-12-02), not per-channel clocks")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, help="summarise the runs of these result files together")
    ap.add_argument("--figure", type=Path, default=None, help="with --merge: a PNG of the dose per run, policy and condition")
    args = ap.parse_args()
    if args.merge:
        docs = [json.loads(f.read_text()) for f in args.merge]
        runs = [r for d in docs for r in d["runs"]]
        doc = {"summary": summarise(runs), "greedy": docs[0]["greedy"], "seeds": sorted({r["seed"] for r in runs}),
               "machine": [d["machine"] for d in docs], "merged_from": [str(f) for f in args.merge], "runs": slim(runs)}
        args.out.write_text(json.dumps(doc, indent=1, default=float))
        print(json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=1, default=float))
        if args.figure:
            figure(runs, args.figure)
        return
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-manip-")) if args.log_dir is None else args.log_dir
    POLICY_OVERRIDES.update(args.policy)
    PAIRED[0] = not args.unpaired
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    t_start = time.time()
    load_start = os.getloadavg()
    if args.tune_greedy:
        grid = []
        for off in (0.0, 0.15, 0.3):
            for dwell in (0.5, 1.0, 2.0, 4.0):
                base = BaselineConfig(offset_along_A=off, dwell_s=dwell)
                rs = [asyncio.run(one_run("physical", s, "greedy", base, log_dir)) for s in seeds]
                cost = [r["beam_s"] + 0.1 * r["parks"] for r in rs]
                grid.append({"offset_along_A": off, "dwell_s": dwell, "median_dose": float(np.median([r["dose_e_per_A2"] for r in rs])),
                             "median_cost_s": float(np.median(cost)), "success": float(np.mean([r["success"] for r in rs]))})
                print(json.dumps(grid[-1]), flush=True)
        best = min(grid, key=lambda g: g["median_cost_s"])
        doc = {"tune_greedy": grid, "best": best, "seeds": seeds}
    else:
        base = BaselineConfig(offset_along_A=GREEDY_OFFSET_A if args.greedy_offset_A is None else args.greedy_offset_A,
                              dwell_s=GREEDY_DWELL_S if args.greedy_dwell_s is None else args.greedy_dwell_s)
        runs = []
        for cond in args.conditions.split(","):
            for seed in seeds:
                for strat in args.strategies.split(","):
                    r = asyncio.run(one_run(cond, seed, strat, base, log_dir))
                    runs.append(r)
                    print(json.dumps({k: r[k] for k in ("condition", "seed", "strategy", "success", "stop_reason", "dose_e_per_A2",
                                                         "beam_s", "parks", "intended_hops", "toward_hops", "away_hops", "damage_events",
                                                         "wall_s")}), flush=True)
        doc = {"summary": summarise(runs), "greedy": base.model_dump(), "policy_overrides": args.policy, "seeds": seeds,
               "paired": PAIRED[0],
               "runs": runs}
    doc["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                      "load_avg_at_end": os.getloadavg(), "wall_min": (time.time() - t_start) / 60.0,
                      "date": time.strftime("%Y-%m-%d")}
    doc["machine"]["load_avg_at_start"] = load_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=float))
    print(json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=1, default=float))
    if args.log_dir is None:
        shutil.rmtree(log_dir, ignore_errors=True)


GREEDY_OFFSET_A = 0.0  # tuned: benchmarks/bench_manipulation.py --tune-greedy (see BENCHMARKS.md)
GREEDY_DWELL_S = 2.0

if __name__ == "__main__":
    main()
