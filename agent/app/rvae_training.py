"""Wiring the digital twin into rVAE training (``stemagent train-rvae``).

Core's :mod:`stemagent.encoding.rvae_train` trains on any patches; this module makes them from
twin *sequences*: graphene with Si dopants and vacancies under the beam (``scan_now`` frame after
frame, beam-induced Si-C swaps and knock-on vacancies enabled, cross-sections raised so a few
frames see events), each sequence at one dose of ``data.doses_e_per_A2`` and every frame at a
random scan rotation and field centre. Every visible atom whose patch lies inside the frame gives
a patch at its true position (``truth.pixels_rc``: drift and jitter as rendered), on a sample-frame
grid turned by a random angle (``patch_rotation``), so the model sees every orientation.

Held-out sequences (their own seeds) give the model card's metrics: reconstruction error against
the mean-patch baseline, rotation error (a patch and the same atom sampled on a grid turned by a
known angle), and a k-NN balanced accuracy of the neighbourhood class (C, Si, C next to a
vacancy, Si next to a vacancy) from the content latents alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.spatial import cKDTree

from stemagent.clock import VirtualClock
from stemagent.config import load_model, validate_model
from stemagent.dose import dose_e_per_A2
from stemagent.encoding.rvae import RVAE, load_rvae, wrap_angle
from stemagent.encoding.rvae_train import RVAETrainConfig, frame_scale, normalize_frame, sample_patches, train, write_card
from stemagent.simulators.dynamics import CrossSections
from stemagent.simulators.optics import ProbeOptics
from stemagent.simulators.scan import DetectorModel
from stemagent.simulators.specimens import build_specimen
from stemagent.simulators.twin import TwinDriver
from stemagent.types import ScanGeometry

#: neighbourhood classes of a patch (twin truth; never seen by training)
CLASS_NAMES = ("C", "Si", "C next to vacancy", "Si next to vacancy")


class TwinPatchData(BaseModel):
    """``data`` of a ``train-rvae`` config: the twin sequences patches come from."""

    model_config = ConfigDict(extra="forbid")

    sequences: int = Field(6, ge=1, description="training sequences (a fresh specimen each)")
    held_out_sequences: int = Field(1, ge=1, description="sequences with their own seeds, for the model card's metrics")
    frames_per_sequence: int = Field(6, ge=1)
    frame_px: int = Field(128, ge=32, le=1024, description="frame side, pixels")
    frame_pixel_A: float = Field(0.2, gt=0.02, le=1.0, description="frame sampling, Å/px")
    specimen_size_A: float = Field(50.0, gt=10.0)
    n_si: int = Field(10, ge=0, description="Si dopants per specimen")
    vacancy_per_nm2: float = Field(0.03, ge=0.0)
    doses_e_per_A2: list[float] = Field(default_factory=lambda: [2e3, 1e4, 5e4], min_length=1, description="one per sequence, cycled")
    energy_keV: float = Field(60.0, gt=0.0)
    beam_current_pA: float = Field(30.0, gt=0.0)
    si_swap_barn: float = Field(20.0, ge=0.0, description="raised over the physical 0.1 b so a few frames see Si hops")
    c_knock_on_barn: float = Field(0.01, ge=0.0, description="raised over the physical 1e-5 b so vacancies form")
    jitter_A: float = Field(0.03, ge=0.0)
    patch_rotation: bool = Field(True, description="turn each patch's sampling grid by a random angle")
    max_c_patches_per_frame: int = Field(300, ge=1, description="plain C patches kept per frame (defect patches are all kept)")
    si_vacancy_fraction: float = Field(0.0, ge=0.0, le=1.0, description="Si dopants that lose one C neighbour before the sequence "
                                       "starts (the specimen builder keeps dopants and vacancies apart, so 'Si next to a vacancy' "
                                       "needs this or a knock-on)")


@dataclass
class PatchSet:
    """Patches ``(N, P, P)``, their classes ``(N,)`` (into :data:`CLASS_NAMES`) and grid rotations ``(N,)``;
    held-out sets also have ``upright`` ``(N, P, P)``: the same atoms on an unturned grid, and ``clean``
    ``(N, P, P)``: the patches of the noiseless image (the twin's expected image, same scale)."""

    patches: np.ndarray
    classes: np.ndarray
    rotation_rad: np.ndarray
    upright: np.ndarray | None
    clean: np.ndarray | None
    events: dict[str, int]
    frames: int


class _DataSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: TwinPatchData


def data_config(cfg: RVAETrainConfig, source: str = "<train-rvae config>") -> TwinPatchData:
    """``cfg.data`` validated (a one-line ConfigError naming ``data.<field>`` and the value otherwise)."""
    return validate_model(_DataSection, {"data": cfg.data}, source=source).data


def neighbourhood_classes(positions_A: np.ndarray, labels: np.ndarray, vacancy_label: int = 2, si_label: int = 1,
                          near_A: float = 1.7) -> np.ndarray:
    """Class of each site ``(K,)`` (see :data:`CLASS_NAMES`; -1 for a vacancy site itself)."""
    out = np.where(labels == si_label, 1, 0).astype(np.int64)
    vac = labels == vacancy_label
    if vac.any():
        d, _ = cKDTree(positions_A[vac]).query(positions_A, k=1)
        out[d < near_A] += 2
    out[vac] = -1
    return out


def remove_si_neighbours(specimen: Any, fraction: float, rng: np.random.Generator, bond_A: float = 1.7) -> int:
    """Remove one C neighbour (within ``bond_A``) of each Si dopant with probability ``fraction``
    (in place); returns how many were removed."""
    xy = specimen.positions_A[:, :2]
    tree = cKDTree(xy)
    removed = 0
    for s in np.flatnonzero((specimen.numbers == 14) & specimen.present):
        if rng.random() >= fraction:
            continue
        near = [j for j in tree.query_ball_point(xy[s], bond_A) if j != s and specimen.numbers[j] == 6 and specimen.present[j]]
        if near:
            specimen.present[near[int(rng.integers(len(near)))]] = False
            removed += 1
    return removed


def twin_patches(cfg: RVAETrainConfig, d: TwinPatchData, seed: int, sequences: int, *, upright: bool = False) -> PatchSet:
    """Patches from ``sequences`` twin sequences seeded from ``seed`` (see the module docstring)."""
    ss = np.random.SeedSequence(seed)
    out: list[np.ndarray] = []
    ups: list[np.ndarray] = []
    cleans: list[np.ndarray] = []
    classes: list[np.ndarray] = []
    rots: list[np.ndarray] = []
    events: dict[str, int] = {}
    frames = 0
    fov = d.frame_px * d.frame_pixel_A
    half_patch_A = (cfg.patch_px / 2.0 + 1.0) * cfg.pixel_A * math.sqrt(2.0)
    for i, child in enumerate(ss.spawn(sequences)):
        rng = np.random.default_rng(child)
        dose = d.doses_e_per_A2[i % len(d.doses_e_per_A2)]
        spec = build_specimen("graphene", size_A=(d.specimen_size_A,) * 2, center_A=(0.0, 0.0), rng=rng, n_si=d.n_si,
                              vacancy_per_nm2=d.vacancy_per_nm2)
        if d.si_vacancy_fraction > 0:
            remove_si_neighbours(spec, d.si_vacancy_fraction, rng)
        xs = CrossSections(si_swap_barn=d.si_swap_barn, si_swap_ref_keV=d.energy_keV, c_knock_on_barn=d.c_knock_on_barn,
                           c_knock_on_ref_keV=d.energy_keV)
        clock = VirtualClock()
        twin = TwinDriver(spec, clock=clock, rng=rng, optics=ProbeOptics(energy_keV=d.energy_keV), detector=DetectorModel(),
                          jitter_A=d.jitter_A, beam_current_pA=d.beam_current_pA, cross_sections=xs, dynamics=True, offload=False)
        # the dwell that gives this dose per frame
        dwell = dose / dose_e_per_A2(d.beam_current_pA, 1.0, d.frame_pixel_A ** 2)
        t = 0.0
        room = max(0.0, d.specimen_size_A / 2 - fov / 2 - 2.0)
        for _ in range(d.frames_per_sequence):
            centre = rng.uniform(-room, room, size=2) if room > 0 else np.zeros(2)
            geom = ScanGeometry(center_A=(float(centre[0]), float(centre[1])), fov_A=(fov, fov), shape_px=(d.frame_px, d.frame_px),
                                rotation_rad=float(rng.uniform(0, 2 * math.pi)), dwell_s=float(dwell))
            frame = twin.scan_now(geom, t)
            t = frame.end_time_s + 0.01
            truth = twin.ground_truth.frame_truth(frame.index)
            assert truth is not None
            frames += 1
            scale = frame_scale(frame.image)
            image = normalize_frame(frame.image, scale)
            cls = neighbourhood_classes(truth.positions_A, truth.labels)
            rc = truth.pixels_rc
            margin = half_patch_A / d.frame_pixel_A
            inside = np.all((rc >= margin) & (rc <= d.frame_px - 1 - margin), axis=1) & (cls >= 0)
            idx = np.flatnonzero(inside)
            plain = idx[cls[idx] == 0]
            if len(plain) > d.max_c_patches_per_frame:
                keep = np.sort(np.concatenate([idx[cls[idx] != 0], rng.choice(plain, d.max_c_patches_per_frame, replace=False)]))
                idx = keep
            rot = rng.uniform(-math.pi, math.pi, size=len(idx)) if d.patch_rotation else np.zeros(len(idx))
            out.append(sample_patches(image, geom, truth.positions_A[idx], cfg.patch_px, cfg.pixel_A, centres_rc=rc[idx], rotation_rad=rot))
            if upright:
                ups.append(sample_patches(image, geom, truth.positions_A[idx], cfg.patch_px, cfg.pixel_A, centres_rc=rc[idx]))
                expected = normalize_frame(truth.expected_image, scale)
                cleans.append(sample_patches(expected, geom, truth.positions_A[idx], cfg.patch_px, cfg.pixel_A, centres_rc=rc[idx],
                                             rotation_rad=rot))
            classes.append(cls[idx])
            rots.append(rot)
        for e in twin.ground_truth.events:
            events[e.kind] = events.get(e.kind, 0) + 1
    p = cfg.patch_px
    return PatchSet(np.concatenate(out) if out else np.zeros((0, p, p), np.float32), np.concatenate(classes) if classes else np.zeros(0, np.int64),
                    np.concatenate(rots) if rots else np.zeros(0), np.concatenate(ups) if ups else None,
                    np.concatenate(cleans) if cleans else None, events, frames)


def knn_balanced_accuracy(z: np.ndarray, classes: np.ndarray, k: int = 5, folds: int = 5, seed: int = 0) -> float | None:
    """Cross-validated k-NN balanced accuracy of ``classes`` from ``z`` (classes with >= ``folds`` members; None if < 2 such)."""
    # scikit-learn only for the model card's metric: imported when it is computed
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    ids, counts = np.unique(classes, return_counts=True)
    ok = np.isin(classes, ids[counts >= folds])
    if len(np.unique(classes[ok])) < 2:
        return None
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(KNeighborsClassifier(n_neighbors=k), z[ok], classes[ok], cv=cv, scoring="balanced_accuracy")
    return float(np.mean(scores))


def evaluate(model: RVAE, held: PatchSet) -> dict[str, Any]:
    """The model card's metrics on held-out patches (see the module docstring)."""
    x = held.patches
    t0 = time.perf_counter()
    with torch.no_grad():
        lat = model.encode(x)
        rec = model.decode(lat).numpy()
        up = model.encode(held.upright) if held.upright is not None else None
    encode_s = time.perf_counter() - t0
    mse = float(((rec - x) ** 2).mean())
    base = float(((x - x.mean(0)) ** 2).mean())
    out: dict[str, Any] = {"held_out_patches": int(len(x)), "frames": held.frames, "events": held.events,
                           "class_counts": {CLASS_NAMES[int(c)]: int((held.classes == c).sum()) for c in np.unique(held.classes)},
                           "reconstruction_mse": round(mse, 5), "mean_patch_mse": round(base, 5),
                           "reconstruction_ratio": round(mse / base, 4)}
    if held.clean is not None:
        # against the noiseless patches: how much of the structure (not the shot noise) the model keeps
        c = held.clean
        cm = float(((rec - c) ** 2).mean())
        cb = float(((c - c.mean(0)) ** 2).mean())
        out.update(clean_reconstruction_mse=round(cm, 5), clean_mean_patch_mse=round(cb, 5), clean_reconstruction_ratio=round(cm / cb, 4))
    if up is not None:
        # the grid turned by +r shows the neighbourhood turned by -r: the angle latent moves by -r
        diff = wrap_angle(lat.angle_rad.numpy() - up.angle_rad.numpy() + held.rotation_rad, model.spec.fold)
        out["rotation_error_deg_rms"] = round(float(np.degrees(np.sqrt(np.mean(diff ** 2)))), 3)
        out["rotation_error_deg_median"] = round(float(np.degrees(np.median(np.abs(diff)))), 3)
        zz = lat.z.numpy() - up.z.numpy()
        out["content_shift_over_spread"] = round(float(np.abs(zz).mean() / max(float(up.z.numpy().std(0).mean()), 1e-9)), 4)
    acc = knn_balanced_accuracy(lat.z.numpy(), held.classes)
    out["knn_balanced_accuracy"] = None if acc is None else round(acc, 4)
    out["encode_decode_s"] = round(encode_s, 3)
    return out


def load_rvae_train_config(path: str | Path) -> RVAETrainConfig:
    """The YAML config, with its ``data`` section checked too (one-line ConfigErrors)."""
    cfg = load_model(path, RVAETrainConfig)
    data_config(cfg, source=str(path))
    return cfg


def run_training(cfg: RVAETrainConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Make twin patches, train, write weights and card, score on held-out sequences and add that to the card."""
    d = data_config(cfg)
    t0 = time.perf_counter()
    train_set = twin_patches(cfg, d, cfg.seed, d.sequences)
    data_s = time.perf_counter() - t0
    description = {"source": "stemagent.simulators.twin.TwinDriver.scan_now sequences (agent/app/rvae_training.py)",
                   "settings": d.model_dump(mode="json"), "patches": int(len(train_set.patches)), "frames": train_set.frames,
                   "events": train_set.events, "data_seconds": round(data_s, 1),
                   "class_counts": {CLASS_NAMES[int(c)]: int((train_set.classes == c).sum()) for c in np.unique(train_set.classes)}}
    card = train(cfg, train_set.patches, data_description=description, show_progress=show_progress)
    held = twin_patches(cfg, d, cfg.seed + 10_000, d.held_out_sequences, upright=True)
    model = load_rvae(cfg.out, device="cpu", patch_px=cfg.patch_px)
    metrics = evaluate(model, held)
    write_card(cfg.out, metrics)
    card["metrics"] = metrics
    return card
