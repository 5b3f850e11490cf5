"""Local-structure encoding: Zernike features, force-relaxed layout, motif labels, unmixing, stage
latency — ours against the published motif-learn package, side by side in the same run.

motif-learn (PyPI ``motif-learn`` 0.1.2) runs in its own virtual environment through
``benchmarks/motiflearn_worker.py`` (never in the project's environment)::

    python3 -m venv /tmp/mlearn-venv && /tmp/mlearn-venv/bin/pip install motif-learn==0.1.2
    .venv/bin/python benchmarks/bench_motifs.py --figure docs/motifs.png

Without that venv (``--motif-learn-python`` missing) the motif-learn rows are left out and the
issue's quoted figures are printed as the reference instead.

Sections (``--sections``, default all):

- ``zernike``: radial order 10, 32x32 patches (disk radius 15 px), 20,000 atom centres on a
  1024^2 image: patches per second including the patch extraction, and for the features alone
  (patches given), at 1 and 2 threads, ours and motif-learn's alternated over ``--rounds``
  rounds (median and per-round ratio); CUDA figures when a GPU is present.
- ``layout``: 5,000 Zernike feature vectors of twin atoms (MoS2 and graphene, 1e4 e/A^2,
  HAADF) laid out by our force-relaxed layout and by motif-learn's ``ForceGraph8`` (same input,
  100 iterations, 10 neighbours); quality of each map: 5-nearest-neighbour accuracy of the true
  motif in the map (leave one out) and HDBSCAN on the map scored against the truth.
- ``labels``: motif labels vs the twin's per-atom motif truth at 1e4 e/A^2 on a HAADF detector
  (``sigma_C_A2`` 0.0008, ``z_exponent`` 1.7: the 80-180 mrad calibration in the twin's config
  comments), graphene with Si and vacancies and MoS2 with S vacancies and Se substitutions,
  ``--frames`` frames each through one :class:`EncodingStage` (library across frames); atoms
  at the truth positions, and at the U-Net's detections (matched within 0.5 A); every
  clustering method, and motif-learn's published chain on the same frames.
- ``unmixing``: the ferroelectric film twin (up/down variants, and four in-plane variants), B
  sites' neighbourhoods, PCA / NMF / ICA / GMM: domain assignment against the truth.
- ``stage``: :class:`EncodingStage` latency on 512^2 frames with about 500 atoms (median of
  repeated frames after warm-up; steady state with a trained library); wall time and the
  process's CPU time (on a shared, oversubscribed machine the wall time includes waiting for a
  core).

Prints one JSON document (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stemagent.encoding import EncodingConfig, EncodingStage
from stemagent.encoding.clustering import reduce_features, score_labels
from stemagent.encoding.features import ZernikeEncoder
from stemagent.encoding.layout import force_layout
from stemagent.encoding.patches import extract_patches
from stemagent.encoding.unmixing import METHODS as UNMIX_METHODS
from stemagent.encoding.unmixing import lattice_displacements, neighbourhoods, unmix
from stemagent.encoding.zernike import ZernikeBasis, zernike_moments, zernike_moments_at
from stemagent.simulators import render_sample
from stemagent.simulators.fast_adf import ADFModel
from stemagent.simulators.motifs import frame_motifs
from stemagent.simulators.render import frame_bounds
from stemagent.simulators.scan import NO_DRIFT
from stemagent.simulators.specimens import build_specimen
from stemagent.types import Atoms, Frame, ScanGeometry

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "motiflearn_worker.py"
HAADF = {"z_exponent": 1.7, "sigma_C_A2": 0.0008}
DEFECTS = {
    "graphene": {"si_per_nm2": 0.1, "vacancy_per_nm2": 0.05},
    "mos2": {"vacancy_fraction": 0.02, "substitution_fraction": 0.03},
}
QUOTED = {"zernike_incl_extraction_per_s": 140_000, "zernike_features_per_s": 320_000, "layout_5000_s": 5.5}


# --- helpers ---------------------------------------------------------------------------------
def twin_frame(kind: str, seed: int, dose: float = 1e4, shape: int = 512, pixel_A: float = 0.1, index: int = 0,
               options: dict | None = None):
    """A HAADF twin frame with its truth, per-site motif labels and names."""
    rng = np.random.default_rng(seed)
    fov = shape * pixel_A
    geo = ScanGeometry(fov_A=(fov, fov), shape_px=(shape, shape), rotation_rad=float(rng.uniform(0, math.pi)), dwell_s=1e-6)
    adf = ADFModel(**HAADF)
    lo, hi = frame_bounds(geo, NO_DRIFT, 0.0, adf.pad_A + 4.0)
    sp = build_specimen(kind, size_A=(hi[0] - lo[0], hi[1] - lo[1]), center_A=((hi[0] + lo[0]) / 2, (hi[1] + lo[1]) / 2),
                        rng=rng, **(options if options is not None else DEFECTS.get(kind, {})))
    img, truth = render_sample(kind, geo, dose, rng, adf=adf, specimen=sp)
    labels, names = frame_motifs(sp, truth)
    frame = Frame(image=img, geometry=geo, line_times_s=geo.line_start_times_s(0.0), index=index, dose_e_per_A2=dose)
    return frame, truth, labels, names, sp


def run_worker(python: str | None, args: list[str], threads: int) -> dict | None:
    if python is None:
        return None
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               NUMBA_NUM_THREADS=str(threads))
    r = subprocess.run([python, str(WORKER), *args], capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"motif-learn worker failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def median(v: list[float]) -> float:
    return float(statistics.median(v)) if v else float("nan")


# --- sections --------------------------------------------------------------------------------
def bench_zernike(ml_python: str | None, rounds: int, thread_counts: list[int], tmp: Path) -> dict:
    rng = np.random.default_rng(1)
    img = rng.poisson(20.0, size=(1024, 1024)).astype(np.float32)
    n, p, r = 20_000, 32, 15.0
    centres_rc = rng.uniform(p / 2 + 1, 1024 - p / 2 - 2, size=(n, 2))
    np.savez(tmp / "zernike.npz", image=img, centres_xy=centres_rc[:, ::-1], patch_px=p, n_max=10)
    basis = ZernikeBasis(10, p, r)
    out: dict[str, Any] = {"patches": n, "n_max": 10, "patch_px": p, "radius_px": r, "image": [1024, 1024]}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for threads in thread_counts:
        torch.set_num_threads(threads)
        ours_incl: list[float] = []
        ours_feat: list[float] = []
        ml_incl: list[float] = []
        ml_feat: list[float] = []
        t_img = torch.as_tensor(img)
        t_c = torch.as_tensor(centres_rc, dtype=torch.float32)
        patches, offsets = extract_patches(t_img, t_c, p)
        zernike_moments_at(t_img, t_c[:2000], basis)  # warm-up
        for _ in range(rounds):
            t0 = time.perf_counter()
            zernike_moments_at(t_img, t_c, basis)
            t1 = time.perf_counter()
            zernike_moments(patches, basis, offsets)
            t2 = time.perf_counter()
            ours_incl.append(n / (t1 - t0))
            ours_feat.append(n / (t2 - t1))
            ml = run_worker(ml_python, ["zernike", str(tmp / "zernike.npz"), "1"], threads)
            if ml is not None:
                ml_incl += ml["incl_extraction_per_s"]
                ml_feat += ml["features_per_s"]
        row: dict[str, Any] = {
            "ours_incl_extraction_per_s": median(ours_incl), "ours_features_per_s": median(ours_feat),
            "ours_incl_rounds": [round(v) for v in ours_incl], "ours_features_rounds": [round(v) for v in ours_feat],
        }
        if ml_incl:
            row.update(
                motiflearn_incl_extraction_per_s=median(ml_incl), motiflearn_features_per_s=median(ml_feat),
                motiflearn_incl_rounds=[round(v) for v in ml_incl], motiflearn_features_rounds=[round(v) for v in ml_feat],
                ratio_incl_extraction=median([a / b for a, b in zip(ours_incl, ml_incl)]),
                ratio_features=median([a / b for a, b in zip(ours_feat, ml_feat)]),
            )
        else:
            row.update(reference="issue's quoted motif-learn figures (2 threads)", quoted=QUOTED,
                       ratio_incl_extraction_vs_quoted=median(ours_incl) / QUOTED["zernike_incl_extraction_per_s"],
                       ratio_features_vs_quoted=median(ours_feat) / QUOTED["zernike_features_per_s"])
        out[f"threads_{threads}"] = row
    if "cuda" in devices:
        t_img = torch.as_tensor(img, device="cuda")
        t_c = torch.as_tensor(centres_rc, dtype=torch.float32, device="cuda")
        patches, offsets = extract_patches(t_img, t_c, p)
        zernike_moments_at(t_img, t_c, basis)
        torch.cuda.synchronize()
        gi, gf = [], []
        for _ in range(max(3, rounds)):
            t0 = time.perf_counter()
            zernike_moments_at(t_img, t_c, basis, chunk=8192)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            zernike_moments(patches, basis, offsets, chunk=8192)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            gi.append(n / (t1 - t0))
            gf.append(n / (t2 - t1))
        out["cuda"] = {"device": torch.cuda.get_device_name(0), "incl_extraction_per_s": median(gi), "features_per_s": median(gf)}
    return out


def motif_dataset(kinds: tuple[str, ...], frames: int, seed0: int, encoder: ZernikeEncoder):
    """Per frame: encoded features (normalised magnitudes), truth labels and names."""
    data = []
    for kind in kinds:
        for i in range(frames):
            frame, truth, labels, names, _ = twin_frame(kind, seed0 + i, index=i)
            g = frame.geometry
            f = encoder.encode(frame.image, truth.pixels_rc, g.pixel_size_A[0], encoder.radius_for(truth.positions_A), g.rotation_rad)
            data.append((kind, f.magnitudes[f.inside], labels[f.inside], names))
    return data


def knn_accuracy(y: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1).fit(y)
    _, idx = nn.kneighbors(y)
    votes = labels[idx[:, 1:]]
    pred = np.array([np.bincount(v, minlength=labels.max() + 1).argmax() for v in votes])
    return float(np.mean(pred == labels))


def layout_quality(y: np.ndarray, truth: np.ndarray) -> dict:
    from sklearn.cluster import HDBSCAN
    from sklearn.metrics import adjusted_rand_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        lab = HDBSCAN(min_cluster_size=10, min_samples=5).fit_predict(y)
    lab = np.where(lab < 0, lab.max() + 1, lab)
    s = score_labels(lab, truth)
    return {"knn5_accuracy": knn_accuracy(y, truth), "hdbscan_clusters": int(lab.max() + 1),
            "hdbscan_accuracy_many_to_one": s.accuracy, "hdbscan_balanced": s.balanced,
            "hdbscan_ari": float(adjusted_rand_score(truth, lab))}


def bench_layout(ml_python: str | None, thread_counts: list[int], tmp: Path) -> dict:
    enc = ZernikeEncoder()
    data = motif_dataset(("mos2",), 6, 500, enc) + motif_dataset(("graphene",), 3, 600, enc)
    xs, ys = [], []
    for kind, x, y, _names in data:  # disjoint label ranges for the two specimens
        xs.append(x)
        ys.append(y + (0 if kind == "mos2" else 10))
    x = np.concatenate(xs)[:5000]
    truth = np.concatenate(ys)[:5000]
    _, truth = np.unique(truth, return_inverse=True)
    z = reduce_features(x, 8)
    np.savez(tmp / "layout.npz", x=z)
    out: dict[str, Any] = {"n": int(len(z)), "dims": int(z.shape[1]), "classes": int(truth.max() + 1)}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        force_layout(z[:500], seed=0)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            y = force_layout(z, seed=0)
            times.append(time.perf_counter() - t0)
        row: dict[str, Any] = {"ours_seconds": median(times), "ours_rounds": times, "ours_quality": layout_quality(y, truth)}
        ml = run_worker(ml_python, ["layout", str(tmp / "layout.npz"), str(tmp / "layout_ml.npz")], threads)
        if ml is not None:
            y_ml = np.load(tmp / "layout_ml.npz")["layout"]
            row.update(motiflearn_seconds=ml["seconds"], motiflearn_quality=layout_quality(y_ml, truth),
                       speedup=ml["seconds"] / row["ours_seconds"])
            if threads == thread_counts[-1]:
                np.savez(tmp / "layouts.npz", ours=y, ml=y_ml, truth=truth)
        else:
            row.update(reference_seconds_quoted=QUOTED["layout_5000_s"])
            if threads == thread_counts[-1]:
                np.savez(tmp / "layouts.npz", ours=y, truth=truth)
        out[f"threads_{threads}"] = row
    return out


def _score(pred: np.ndarray, truth: np.ndarray, names: tuple[str, ...]) -> dict:
    m2o = score_labels(pred, truth)
    o2o = score_labels(pred, truth, one_to_one=True)
    host = np.bincount(truth).argmax()
    return {
        "atoms": int(len(truth)),
        "clusters": int(len(np.unique(pred))),
        "accuracy": m2o.accuracy,
        "balanced_accuracy": m2o.balanced,
        "accuracy_one_to_one": o2o.accuracy,
        "balanced_one_to_one": o2o.balanced,
        "recall_per_class": {names[k]: round(v, 4) for k, v in m2o.per_class_recall.items()},
        "truth_counts": {names[k]: int(c) for k, c in enumerate(np.bincount(truth)) if c},
        "all_host_accuracy": float(np.mean(truth == host)),
    }


def _stage_labels(kind: str, frames: list, method: str, atoms_from: str, segmenter=None, recluster_every: int = 1,
                  extra: dict | None = None, encoded_out: list | None = None) -> tuple[dict, float]:
    stage = EncodingStage(EncodingConfig(clustering=method, seed=0, recluster_every=recluster_every, **(extra or {})))
    preds, truths = [], []
    seconds = 0.0
    for frame, truth, labels, _names, _ in frames:
        if atoms_from == "truth":
            pos = truth.positions_A
            lab = labels
        else:
            from stemagent.segmentation.metrics import match

            found = segmenter.find(frame)
            m = match(found.positions_A, np.zeros(len(found), dtype=int), truth.positions_A, np.zeros(len(labels), dtype=int))
            pos = found.positions_A[m.pred_idx]
            lab = labels[m.true_idx]
        atoms = Atoms(pos, np.zeros(len(pos), dtype=int), np.ones(len(pos)), frame.index)
        t0 = time.process_time()
        out = stage.process(frame, atoms)
        seconds += time.process_time() - t0
        e = out["encoded"]
        if encoded_out is not None:
            encoded_out.append(e)
        preds.append(out["motif"][e])
        truths.append(lab[e])
    res = _score(np.concatenate(preds), np.concatenate(truths), frames[0][3])
    res["library_size"] = len(stage.library)
    return res, seconds / len(frames)


# own content of a site: the ideal observer's class -> the motif it makes (the rest come from neighbours)
ORACLE_CONTENT = {
    "graphene": {"C": "host", "Si": "dopant", "vacancy": "vacancy"},
    "mos2": {"metal": "metal", "chalcogen": "chalcogen", "substituted": "dopant", "vacancy": "vacancy"},
    "ws2": {"metal": "metal", "chalcogen": "chalcogen", "substituted": "dopant", "vacancy": "vacancy"},
}
HOST_FAMILY = {"graphene": "C", "mos2": "metal", "ws2": "metal"}  # the sites whose motif also depends on neighbours


def oracle_motif_labels(image: np.ndarray, truth: Any, labels: np.ndarray, names: tuple[str, ...], kind: str) -> np.ndarray:
    """Motif labels ``(K,)`` of a twin frame's visible sites from the ideal observer
    (:func:`~stemagent.segmentation.ideal_observer.oracle_posteriors`: true PSF, Poisson
    likelihood, every other site's species known): per site the most probable motif, with
    P(vacancy-adjacent) = 1 - prod(1 - P(neighbour empty)) and P(dopant-adjacent) = (1 -
    P(vacancy-adjacent)) (1 - prod(1 - P(neighbour substituted))), neighbours within 1.2 bond
    lengths, sites independent. Edge sites keep their true label. Not a strict bound on per-atom
    agreement (the sites are decided one by one), but the reference a clustering of per-site
    evidence is to be held against."""
    from scipy.spatial import cKDTree

    from stemagent.segmentation.ideal_observer import oracle_posteriors
    from stemagent.simulators.elements import atomic_number

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_segmenter import twin_psf

    psf, spacing_px = twin_psf(truth)
    r = oracle_posteriors(image, truth, psf, spacing_px, atomic_number)
    cls = r.class_names
    content = ORACLE_CONTENT[kind]
    empty_cls = cls.index("vacancy")
    sub_cls = cls.index("Si" if kind == "graphene" else "substituted")
    p_empty, p_sub = r.posterior[:, empty_cls], r.posterior[:, sub_cls]
    pos = np.asarray(truth.positions_A)
    nn_A = ZernikeEncoder().radius_for(pos) / 1.3
    neigh = cKDTree(pos).query_ball_point(pos, 1.2 * nn_A)
    idx = {n: i for i, n in enumerate(names)}
    out = np.asarray(labels).copy()
    for k in range(len(pos)):
        if names[labels[k]] == "edge":
            continue
        own = {content[c]: float(r.posterior[k, i]) for i, c in enumerate(cls) if r.posterior[k, i] > 0}
        js = [j for j in neigh[k] if j != k]
        p_host = own.pop(content[HOST_FAMILY[kind]], 0.0)
        if p_host > 0:
            p_va = 1.0 - float(np.prod(1.0 - p_empty[js]))
            p_da = (1.0 - p_va) * (1.0 - float(np.prod(1.0 - p_sub[js])))
            own["vacancy-adjacent"] = p_host * p_va
            own["dopant-adjacent"] = p_host * p_da
            own[content[HOST_FAMILY[kind]]] = p_host * (1.0 - p_va - p_da)
        out[k] = idx[max(own, key=lambda m: own[m])]
    return out


def _motiflearn_labels(ml_python: str | None, frames: list, tmp: Path, threads: int) -> dict | None:
    if ml_python is None:
        return None
    frame0, truth0 = frames[0][0], frames[0][1]
    nn_px = ZernikeEncoder().radius_for(truth0.positions_A) / 1.3 / frame0.geometry.pixel_size_A[0]
    size = int(2 * math.ceil(1.3 * nn_px))  # the same disk as ours, on integer-centred patches
    arrays: dict[str, Any] = {"n_frames": len(frames), "patch_px": size, "n_max": 10}
    keep_all = []
    for i, (frame, truth, _labels, _names, _) in enumerate(frames):
        rc = truth.pixels_rc
        keep = np.all((rc > size / 2 + 1) & (rc < np.array(frame.image.shape) - size / 2 - 2), axis=1)
        arrays[f"image_{i}"] = frame.image
        arrays[f"centres_xy_{i}"] = rc[keep][:, ::-1]
        keep_all.append(keep)
    np.savez(tmp / "ml_motifs.npz", **arrays)
    info = run_worker(ml_python, ["motifs", str(tmp / "ml_motifs.npz"), str(tmp / "ml_motifs_out.npz")], threads)
    out = np.load(tmp / "ml_motifs_out.npz")
    # motif-learn's labels are per frame (no library): score each frame and pool the matched labels
    preds, truths = [], []
    base = 0
    for i, (_frame, _truth, labels, _names, _) in enumerate(frames):
        lab = out[f"labels_{i}"]
        preds.append(lab + base)
        base += int(lab.max()) + 1
        truths.append(labels[keep_all[i]])
    res = _score(np.concatenate(preds), np.concatenate(truths), frames[0][3])
    res["seconds_per_frame"] = median(info["seconds"]) if info else float("nan")
    res["note"] = "per-frame clusters (no library), each matched to the truth on its own frame"
    return res


SITE_ALL = ["coordination", "intensity", "neighbour_intensity"]


def _site_variants(spec: str) -> dict[str, dict]:
    """``--site-variants``: ``;``-separated block lists (``none``: Zernike only), e.g.
    ``none;coordination,intensity,neighbour_intensity``; ``blocks@w1,w2[,components[,refine[,log]]]`` sets the weights (and the number of principal components,
    the refinement rounds, 1: log intensities); ``none@...`` Zernike only with those settings."""
    out: dict[str, dict] = {}
    for item in spec.split(";"):
        item = item.strip()
        if not item:
            continue
        blocks, _, weights = item.partition("@")
        extra: dict[str, Any] = {"site_features": [] if blocks == "none" else blocks.split(",")}
        if weights and blocks == "none":
            weights = "1,1," + weights
        if weights:
            w = [float(v) for v in weights.split(",")]
            extra.update(coordination_weight=w[0], intensity_weight=w[1])
            if len(w) > 2:
                extra.update(components=int(w[2]))
            if len(w) > 3:
                extra.update(refine_iterations=int(w[3]))
            if len(w) > 4:
                extra.update(intensity_transform="log" if w[4] else "sqrt")
        out["zernike only" + (f" @{weights.removeprefix('1,1,')}" if weights else "") if blocks == "none" else f"zernike + {item}"] = extra
    return out


def bench_labels(ml_python: str | None, n_frames: int, threads: int, tmp: Path, with_segmenter: bool, doses: list[float],
                 kinds: list[str] | None = None, methods: list[str] | None = None, site_variants: str = "none",
                 extra_cells: list[tuple[str, float]] | None = None, oracle: bool = True) -> dict:
    """Every method in ``methods`` (default all) at the first dose, the default one at the others, for
    every ``site_variants`` feature set (see :func:`_site_variants`); ``extra_cells`` (kind, dose): the
    default method only; ``oracle``: the ideal observer's motif labels on the same atoms
    (:func:`oracle_motif_labels`)."""
    torch.set_num_threads(threads)
    kinds = kinds or ["graphene", "mos2"]
    methods = methods or ["robust-novelty", "layout", "gmm", "segmenter"]
    variants = _site_variants(site_variants)
    out: dict[str, Any] = {"detector": HAADF, "defects": DEFECTS, "frames": n_frames, "site_variants": variants}
    seeds = {"graphene": 1000, "mos2": 2000, "ws2": 4000, "mose2": 5000}
    cells = [(k, d, d == doses[0]) for d in doses for k in kinds] + [(k, d, False) for k, d in (extra_cells or [])]
    segmenter = None
    if with_segmenter:
        from stemagent.segmentation.unet_segmenter import UNetSegmenter

        segmenter = UNetSegmenter(device="cpu")
    for kind, dose, full in cells:
        seed0 = seeds[kind]
        frames = [twin_frame(kind, seed0 + i, dose=dose, index=i) for i in range(n_frames)]
        res: dict[str, Any] = {}
        runs = [("robust", "truth", 1)]
        if full:
            runs += [r for key, r in (("robust-novelty", ("robust", "truth", 0)), ("layout", ("layout", "truth", 1)),
                                      ("gmm", ("gmm", "truth", 1))) if key in methods]
        if segmenter is not None and (full or "segmenter-all" in methods) and ("segmenter" in methods or "segmenter-all" in methods):
            runs.append(("robust", "segmenter", 1))
        encoded: list[np.ndarray] = []
        for method, atoms_from, every in runs:
            for vname, extra in variants.items():
                r, sec = _stage_labels(kind, frames, method, atoms_from, segmenter, every, extra,
                                       encoded if atoms_from == "truth" and not encoded else None)
                r["stage_cpu_seconds_per_frame"] = sec
                where = "truth positions" if atoms_from == "truth" else "U-Net detections"
                mode = "pooled, recluster every frame" if every else "classify, recluster on novelty"
                res[f"{method} ({where}; {mode}; {vname})"] = r
                print(f"{kind} @ {dose:.0e} {method} {where} {mode} {vname}: acc {r['accuracy']:.4f} "
                      f"bal {r['balanced_accuracy']:.3f} ids {r['clusters']} {r['recall_per_class']}", flush=True)
        if oracle and kind in ORACLE_CONTENT and encoded:
            pred = [oracle_motif_labels(f[0].image, f[1], f[2], f[3], kind)[e] for f, e in zip(frames, encoded)]
            r = _score(np.concatenate(pred), np.concatenate([f[2][e] for f, e in zip(frames, encoded)]), frames[0][3])
            res["ideal observer (truth positions; per-site posteriors, neighbours independent)"] = r
            print(f"{kind} @ {dose:.0e} ideal observer: acc {r['accuracy']:.4f} bal {r['balanced_accuracy']:.3f} "
                  f"{r['recall_per_class']}", flush=True)
        ml = _motiflearn_labels(ml_python, frames, tmp, threads)
        if ml is not None:
            res["motif-learn chain (truth positions)"] = ml
        out[f"{kind} @ {dose:.0e}"] = res
    return out


def film_frame(seed: int, variants, dose: float = 1e4, fov: float = 102.4, shape: int = 512):
    rng = np.random.default_rng(seed)
    geo = ScanGeometry(fov_A=(fov, fov), shape_px=(shape, shape), rotation_rad=0.08, dwell_s=1e-6)
    sp = build_specimen("film", size_A=(fov + 16, fov + 16), rng=rng, n_cells=8, domain_width_A=25.0,
                        polarization_variants=variants)
    img, truth = render_sample("film", geo, dose, rng, adf=ADFModel(**HAADF), specimen=sp)
    return img, truth, sp, geo


def bench_unmixing(threads: int, tmp: Path) -> dict:
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"dose_e_per_A2": 1e4, "detector": HAADF}
    cases = {"up/down (180-degree walls)": None, "four in-plane variants": [(0.0, 1.0), (1.0, 0.0), (0.0, -1.0), (-1.0, 0.0)]}
    for name, variants in cases.items():
        img, truth, sp, geo = film_frame(7, variants)
        si = truth.site_index
        role = sp.site_role[si]
        variant = sp.extras["variant"][si]
        b = (role == 1) & geo.contains(truth.positions_A, 3.0)
        half = int(round(0.6 * sp.extras["lattice_A"] / geo.pixel_size_A[0]))
        x = neighbourhoods(img, truth.pixels_rc[b], half)
        res: dict[str, Any] = {"sites": int(b.sum()), "window_px": 2 * half + 1, "truth_domains": np.bincount(variant[b]).tolist()}
        for method in UNMIX_METHODS:
            t0 = time.perf_counter()
            u = unmix(x, method, seed=0)
            dt = time.perf_counter() - t0
            s1 = score_labels(u.domains, variant[b], one_to_one=True)
            sm = score_labels(u.domains, variant[b])
            res[method] = {"components": u.info["n_components"], "domains_found": int(u.domains.max() + 1),
                           "assignment_one_to_one": s1.accuracy, "assignment_many_to_one": sm.accuracy, "seconds": dt}
            if (method == "nmf" and not variants) or (method == "pca" and variants):
                np.savez(tmp / f"unmix_{'4' if variants else '2'}.npz", xy=truth.pixels_rc[b], loadings=u.loadings,
                         domains=u.domains, truth=variant[b], image=img)
        # the displacement field: B sites from the A lattice (truth positions; pixel units then Å)
        disp, _ = lattice_displacements(truth.positions_A, role, reference=0)
        db = disp[b]
        vecs = np.asarray(sp.extras["variant_vectors"])
        nearest = np.argmax(db @ vecs.T, axis=1)
        res["displacement field (nearest variant direction)"] = {"assignment": float(np.mean(nearest == variant[b])),
                                                                 "median_B_displacement_A": float(np.median(np.linalg.norm(db, axis=1)))}
        out[name] = res
    return out


def bench_stage(thread_counts: list[int], site_blocks: list[str] | None = None) -> dict:
    """Stage latency; with ``site_blocks`` also with those site features (same frames)."""
    frames = [twin_frame("mos2", 3000 + i, index=i, shape=512, pixel_A=0.1) for i in range(6)]
    out: dict[str, Any] = {"config": "recluster_every=0 (classify; recluster only on unexplained atoms)"
                                     + ("; min_frames_between=100 (the per-frame classify path)" if site_blocks else "")}
    variants = [("", [])] + ([(" + " + ",".join(site_blocks), list(site_blocks))] if site_blocks else [])
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for vname, blocks in variants:
            out[f"threads_{threads}{vname}"] = _stage_latency(frames, blocks, 100 if site_blocks else 0)
    return out


def _stage_latency(frames: list, blocks: list[str], min_frames_between: int = 0) -> dict:
    stage = EncodingStage(EncodingConfig(seed=0, recluster_every=0, site_features=blocks, min_frames_between=min_frames_between))
    times: list[float] = []
    cpu: list[float] = []
    parts: dict[str, list[float]] = {}
    reclusters = 0
    for rep in range(3):
        for frame, truth, labels, _names, _ in frames:
            atoms = Atoms(truth.positions_A, np.zeros(len(labels), dtype=int), np.ones(len(labels)), frame.index)
            t0, c0 = time.perf_counter(), time.process_time()
            stage.process(frame, atoms)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if rep > 0:  # first pass: warm-up, library built
                times.append(dt)
                cpu.append(dc)
                for k, v in stage.last_report["timings_s"].items():
                    parts.setdefault(k, []).append(v)
                reclusters += int(stage.last_report.get("reclustered", False))
    return {"atoms_per_frame": int(np.mean([len(f[2]) for f in frames])),
            "encoded_per_frame": stage.last_report["encoded"],
            "ms_median": 1e3 * median(times), "ms_p90": 1e3 * float(np.percentile(times, 90)),
            "cpu_ms_median": 1e3 * median(cpu),
            "ms_parts_median": {k: 1e3 * median(v) for k, v in parts.items()},
            "reclustered_frames": reclusters, "timed_frames": len(times)}


# --- figure ----------------------------------------------------------------------------------
def make_figure(path: Path, tmp: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(22, 11))
    cmap = plt.get_cmap("tab10")
    # (a) a twin frame coloured by motif, after the stage has seen five frames of the specimen
    stage = EncodingStage(EncodingConfig(seed=0))
    for i in range(6):
        frame, truth, labels, names, _ = twin_frame("mos2", 2000 + i, shape=256, index=i)
        out = stage.process(frame, Atoms(truth.positions_A, np.zeros(len(labels), dtype=int), np.ones(len(labels)), i))
    e = out["encoded"]
    for ax, lab_of, title in (
        (axes[0, 0], out["motif"], "MoS2, 1e4 e/Å² HAADF, 6th frame: atoms coloured by motif id"),
        (axes[0, 1], labels, "the twin's motif ground truth"),
    ):
        ax.imshow(frame.image, cmap="gray", interpolation="nearest")
        for k in np.unique(lab_of[e]):
            sel = e & (lab_of == k)
            name = f"motif {k}" if lab_of is out["motif"] else names[k]
            ax.scatter(truth.pixels_rc[sel, 1], truth.pixels_rc[sel, 0], s=18 if sel.sum() > 30 else 50, facecolors="none",
                       edgecolors=[cmap(k % 10)], linewidths=1.4, label=f"{name} ({sel.sum()})")
        if lab_of is out["motif"]:
            rare = e & out["rare_cell"]
            ax.scatter(truth.pixels_rc[rare, 1], truth.pixels_rc[rare, 0], s=5, c="white", label=f"in a rare motif-cell ({rare.sum()})")
        ax.set_title(title, fontsize=10)
        ax.legend(loc="lower left", fontsize=7, framealpha=0.8)
        ax.set_xticks([])
        ax.set_yticks([])
    # (b) the force-relaxed layouts of the same 5,000 vectors
    lay = np.load(tmp / "layouts.npz") if (tmp / "layouts.npz").exists() else None
    for ax, key, title in ((axes[0, 2], "ours", "force-relaxed layout (ours)"), (axes[0, 3], "ml", "motif-learn ForceGraph8, same input")):
        if lay is None or key not in lay:
            ax.axis("off")
            continue
        y = lay[key]
        ax.scatter(y[:, 0], y[:, 1], c=lay["truth"], cmap="tab20", s=3)
        ax.set_title(f"{title}: {len(y)} Zernike feature vectors,\ncolour = true motif (MoS2 and graphene)", fontsize=10)
    # (c) unmixing: loading maps of the ferroelectric film
    panels = [(axes[1, 0], "2", 0, "film, up/down variants: NMF loading map 1"),
              (axes[1, 1], "4", 0, "film, four in-plane variants: PCA loading map 1"),
              (axes[1, 2], "4", 1, "four variants: PCA loading map 2"),
              (axes[1, 3], "4", None, "four variants: domains from the PCA loadings")]
    for ax, tag, comp, title in panels:
        f = tmp / f"unmix_{tag}.npz"
        if not f.exists():
            ax.axis("off")
            continue
        d = np.load(f)
        ax.imshow(d["image"], cmap="gray", interpolation="nearest")
        if comp is None:
            ax.scatter(d["xy"][:, 1], d["xy"][:, 0], c=d["domains"], cmap="tab10", s=9, vmin=0, vmax=9)
        else:
            sc = ax.scatter(d["xy"][:, 1], d["xy"][:, 0], c=d["loadings"][:, comp], cmap="coolwarm", s=9)
            plt.colorbar(sc, ax=ax, fraction=0.04)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=70)


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="zernike,layout,labels,unmixing,stage")
    ap.add_argument("--motif-learn-python", default="/tmp/mlearn-venv/bin/python")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--no-segmenter", action="store_true")
    ap.add_argument("--doses", default="1e4,1e5", help="labels: every method at the first dose, the default one at the others")
    ap.add_argument("--kinds", default="graphene,mos2", help="labels: specimens at every dose")
    ap.add_argument("--methods", default="robust-novelty,layout,gmm,segmenter",
                    help="labels: the extra runs at the first dose (segmenter-all: U-Net detections at every dose)")
    ap.add_argument("--site-variants", default="none", help="labels: feature sets, ';'-separated (see _site_variants)")
    ap.add_argument("--extra-cells", default="", help="labels: kind@dose,... with the default method only, e.g. ws2@3e3")
    ap.add_argument("--stage-site-features", default="", help="stage: also time this comma-separated block list")
    ap.add_argument("--no-oracle", action="store_true", help="labels: leave out the ideal observer's motif labels")
    ap.add_argument("--figure", default=None)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "motifs.json"))
    args = ap.parse_args()
    ml = args.motif_learn_python if Path(args.motif_learn_python).exists() else None
    threads = [int(t) for t in args.threads.split(",")]
    sections = args.sections.split(",")
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "cuda": torch.cuda.is_available()},
        "motif_learn": "side by side (separate venv)" if ml else "not installed: the issue's quoted figures are the reference",
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "zernike" in sections:
            result["zernike"] = bench_zernike(ml, args.rounds, threads, tmp)
        if "layout" in sections:
            result["layout"] = bench_layout(ml, threads, tmp)
        if "labels" in sections:
            cells = [(c.split("@")[0], float(c.split("@")[1])) for c in args.extra_cells.split(",") if c]
            result["labels"] = bench_labels(ml, args.frames, threads[0], tmp, not args.no_segmenter,
                                            [float(v) for v in args.doses.split(",")], args.kinds.split(","),
                                            args.methods.split(","), args.site_variants, cells, not args.no_oracle)
        if "unmixing" in sections:
            result["unmixing"] = bench_unmixing(threads[0], tmp)
        if "stage" in sections:
            result["stage"] = bench_stage(threads, [b for b in args.stage_site_features.split(",") if b])
        if args.figure:
            make_figure(Path(args.figure), tmp)
    result["machine"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(result, indent=1, default=float)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
