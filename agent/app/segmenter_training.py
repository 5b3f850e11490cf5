"""Wiring the digital twin into segmenter training and scoring (used by ``stemagent train-segmenter``).

Core's :mod:`stemagent.segmentation.train` takes any sample source; this module supplies one
that draws fresh twin frames (:func:`stemagent.simulators.render_sample`, the twin's training-data API) over wide
ranges of dose, optics, drift, sampling, detector and specimen, and maps each specimen's
labels onto the model's unified classes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from stemagent.config import load_model
from stemagent.errors import ConfigError
from stemagent.segmentation.metrics import match
from stemagent.segmentation.train import DataConfig, TrainConfig, TrainingSample, train, write_card
from stemagent.segmentation.unet_segmenter import UNetSegmenter
from stemagent.simulators import DetectorModel, DriftModel, render_sample
from stemagent.simulators.adf_detector import LEGACY_MAADF, calibrated_adf, standard_haadf
from stemagent.types import Frame, ScanGeometry

#: specimen family -> offset of its labels in the unified class list
#: (graphene: C, Si, vacancy -> 0..2; TMDs: metal, chalcogen, substituted, vacancy -> 3..6)
LABEL_OFFSET = {"graphene": 0, "mos2": 3, "ws2": 3, "mose2": 3}
#: ADF detectors training frames can be drawn from (DataConfig.detectors)
TRAINING_DETECTORS = ("legacy", "standard-haadf", "maadf")
#: the usual beam energy of each specimen (keV): graphene below its knock-on threshold, TMDs at 80
HAADF_ENERGY_KEV = {"graphene": 60.0, "mos2": 80.0, "ws2": 80.0, "mose2": 80.0}


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _uniform(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(r[0], r[1]))


def twin_frame(
    kind: str,
    shape_px: int,
    pixel_A: float,
    dose: float,
    rng: np.random.Generator,
    *,
    data: DataConfig | None = None,
    clean: bool = False,
    specimen_options: dict[str, Any] | None = None,
    detector: str = "legacy",
    aberrations: dict[str, float] | None = None,
) -> tuple[np.ndarray, Any]:
    """One twin frame ``(image, truth)``. ``clean``: perfect optics (unless ``aberrations``), no
    drift/jitter, counting detector; ``detector`` (clean frames): "legacy" (the power law at
    60 keV the benchmarks were first run on) or "standard-haadf" (the calibrated standard ring
    at the specimen's usual voltage, :data:`HAADF_ENERGY_KEV`)."""
    d = data or DataConfig()
    rot = float(rng.uniform(0, 2 * math.pi))
    if clean:
        dwell = 2e-6
        geom = ScanGeometry(fov_A=(shape_px * pixel_A,) * 2, shape_px=(shape_px, shape_px), rotation_rad=rot, dwell_s=dwell)
        kw: dict[str, Any] = {}
        if detector == "standard-haadf":
            energy = HAADF_ENERGY_KEV[kind]
            kw = {"energy_keV": energy, "adf": calibrated_adf(standard_haadf(energy), energy)}
        elif detector != "legacy":
            raise ValueError(f"detector={detector!r}: one of 'legacy', 'standard-haadf'")
        return render_sample(kind, geom, dose, rng, specimen_options=specimen_options, aberrations=aberrations, **kw)
    dwell = _loguniform(rng, *d.dwell_s)
    geom = ScanGeometry(fov_A=(shape_px * pixel_A,) * 2, shape_px=(shape_px, shape_px), rotation_rad=rot, dwell_s=dwell)
    v = rng.normal(0.0, d.drift_A_per_frame, size=2) / geom.frame_time_s
    drift = DriftModel(velocity_A_per_s=(float(v[0]), float(v[1])), seed=int(rng.integers(2**31)))
    ab = {
        "C10_A": float(rng.normal(0.0, d.defocus_A)) if d.defocus_range_A is None else _uniform(rng, (-d.defocus_range_A, d.defocus_range_A)),
        "C12_A": _uniform(rng, (0.0, d.astigmatism_A)),
        "phi12_rad": _uniform(rng, (0.0, math.pi)),
    }
    if d.c30_A != (0.0, 0.0):
        ab["C30_A"] = _uniform(rng, d.c30_A)
    det = DetectorModel(gain=_loguniform(rng, *d.gain), offset=_uniform(rng, d.offset), read_noise=_uniform(rng, d.read_noise))
    conv = _uniform(rng, d.convergence_mrad)
    adf_kw = training_adf(kind, rng, d, conv)
    return render_sample(
        kind,
        geom,
        dose,
        rng,
        aberrations=ab,
        convergence_mrad=conv,
        **adf_kw,
        source_fwhm_A=_uniform(rng, d.source_fwhm_A),
        detector=det,
        drift=drift,
        jitter_A=_uniform(rng, d.jitter_A),
        specimen_options=specimen_options,
    )


def training_adf(kind: str, rng: np.random.Generator, d: DataConfig, convergence_mrad: float) -> dict[str, Any]:
    """Keyword arguments of ``render_sample`` for the ADF detector drawn from ``d.detectors``
    (nothing for "legacy": the power law the first weights were trained on, at 60 keV)."""
    names = sorted(d.detectors)
    if names == ["legacy"]:
        return {}
    p = np.asarray([d.detectors[n] for n in names], dtype=np.float64)
    name = names[int(rng.choice(len(names), p=p / p.sum()))]
    if name == "legacy":
        return {}
    energy = float(d.energy_keV.get(kind, 60.0))
    if name == "standard-haadf":
        ring = standard_haadf(energy)
    elif name == "maadf":
        ring = LEGACY_MAADF
    else:
        raise ConfigError("<train config>", "data.detectors", name, f"is not a training detector (one of {list(TRAINING_DETECTORS)})")
    # calibrated at the nearest 2 mrad of convergence (cached tables; the cross-sections vary slowly with it)
    return {"energy_keV": energy, "adf": calibrated_adf(ring, energy, 2.0 * round(convergence_mrad / 2.0))}


def defect_options(kind: str, rng: np.random.Generator, d: DataConfig) -> dict[str, Any]:
    """Defect densities enriched over nature's so rare classes are seen often enough."""
    if kind == "graphene":
        return {"si_per_nm2": _uniform(rng, d.si_per_nm2), "vacancy_per_nm2": _uniform(rng, d.vacancy_per_nm2)}
    return {"vacancy_fraction": _uniform(rng, d.tmd_vacancy_fraction), "substitution_fraction": _uniform(rng, d.tmd_substitution_fraction)}


class TwinSource:
    """Sample source for :func:`~stemagent.segmentation.train.train`: one fresh twin crop per call."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.d = cfg.data
        kinds = list(self.d.specimens)
        for k in kinds:
            if k not in LABEL_OFFSET:
                raise ConfigError("<train config>", "data.specimens", k, f"is not a trainable specimen (one of {sorted(LABEL_OFFSET)})")
        p = np.asarray([self.d.specimens[k] for k in kinds], dtype=np.float64)
        self.kinds = kinds
        self.p = p / p.sum()

    def __call__(self, rng: np.random.Generator) -> TrainingSample:
        d = self.d
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.p))]
        px = _loguniform(rng, *d.pixel_A)
        shape = int(round(self.cfg.crop_A / px))
        dose = _loguniform(rng, *d.dose_e_per_A2)
        image, truth = twin_frame(kind, shape, px, dose, rng, data=d, specimen_options=defect_options(kind, rng, d))
        return TrainingSample(
            image=image,
            pixel_A=px,
            rc=truth.pixels_rc,
            labels=truth.labels + LABEL_OFFSET[kind],
            meta={"kind": kind, "pixel_A": px, "dose": dose},
        )


def evaluate(segmenter: Any, seed: int, n_per_cell: int = 2, doses: tuple[float, ...] = (1e3, 1e4, 1e5), kinds: tuple[str, ...] = ("graphene", "mos2"), shape_px: int = 256, border_A: float = 1.0) -> dict[str, Any]:
    """Per-class F1 (radius 0.5 Å) of ``segmenter`` on clean held-out twin frames (0.1 Å/px)."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"frames_per_cell": n_per_cell, "shape_px": shape_px, "pixel_A": 0.1, "match_radius_A": 0.5, "f1": {}}
    d = DataConfig()
    for kind in kinds:
        for dose in doses:
            total = None
            for _ in range(n_per_cell):
                image, truth = twin_frame(kind, shape_px, 0.1, dose, rng, clean=True, specimen_options=defect_options(kind, rng, d))
                frame = Frame(image=image, geometry=truth.geometry, line_times_s=truth.geometry.line_start_times_s(0.0), index=0, dose_e_per_A2=dose)
                atoms = segmenter.find(frame)
                keep_t = truth.geometry.contains(truth.positions_A, border_A)
                keep_p = truth.geometry.contains(atoms.positions_A, border_A)
                m = match(atoms.positions_A, atoms.classes, truth.positions_A, truth.labels + LABEL_OFFSET[kind], count_pred=keep_p, count_true=keep_t)
                total = m if total is None else total.add(m)
            assert total is not None
            names = segmenter.class_names
            out["f1"][f"{kind}@{dose:g}"] = {names[k]: round(total.f1(k), 4) for k in sorted(set(total.tp) | set(total.fn)) if total.tp.get(k, 0) + total.fn.get(k, 0) > 0}
    return out


def load_train_config(path: str | Path) -> TrainConfig:
    p = Path(path)
    cfg = load_model(p, TrainConfig)
    for k in cfg.data.specimens:
        if k not in LABEL_OFFSET:
            raise ConfigError(str(p), "data.specimens", k, f"is not a trainable specimen (one of {sorted(LABEL_OFFSET)})")
    for k in cfg.data.detectors:
        if k not in TRAINING_DETECTORS:
            raise ConfigError(str(p), "data.detectors", k, f"is not a training detector (one of {list(TRAINING_DETECTORS)})")
    return cfg


def run_training(cfg: TrainConfig, *, show_progress: bool = True, evaluate_frames: int = 2) -> dict[str, Any]:
    """Train on the twin, then score the result on held-out frames and add that to the model card."""
    source = TwinSource(cfg)
    description = {
        "source": "stemagent.simulators.render_sample (fresh random specimen per sample)",
        "crop_A": cfg.crop_A,
        "distribution": cfg.data.model_dump(mode="json"),
        "labels": {k: f"specimen labels + {v}" for k, v in LABEL_OFFSET.items()},
        "masks": f"disk of radius {cfg.mask_radius_A} Å at every visible site (pixels_rc), background elsewhere",
    }
    card = train(cfg, source, data_description=description, show_progress=show_progress)
    if evaluate_frames > 0:
        seg = UNetSegmenter(cfg.out, device="cpu")
        card["metrics"] = evaluate(seg, seed=cfg.seed + 1, n_per_cell=evaluate_frames)
        write_card(card, cfg.out)
    return card
