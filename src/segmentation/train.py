"""Training a U-Net segmenter on frames generated on the fly.

Core code: it knows nothing about the twin. The data come from a *sample source*, a callable
``source(rng) -> TrainingSample`` (the agent wires the twin in, see
``stemagent.agent.app.segmenter_training``). Each sample is resampled to the model grid, normalised
exactly as at inference (:func:`~stemagent.segmentation.unet_segmenter.normalize_images`) and
paired with a class map drawn from the ground truth: a disk of ``mask_radius_A`` per site,
background elsewhere.

Reproducible from ``seed``: the data stream, the initial weights and the batch order are
seeded (bit-identical on the same machine and thread count). Writes ``<out>.pt`` (state dict),
``<out>.json`` and ``<out>.md`` (the model card), and checkpoints every
``checkpoint_every`` steps under ``checkpoint_dir``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.nn import functional as F

from stemagent.segmentation.resample import resize, scale_rc
from stemagent.segmentation.unet import build_model
from stemagent.segmentation.unet_segmenter import CLASS_NAMES, normalize_images


@dataclass
class TrainingSample:
    """One training image and its truth: ``image`` ``(H, W)`` float32, ``pixel_A`` Å/px,
    ``rc`` ``(K, 2)`` (row, col) image pixels of every site, ``labels`` ``(K,)`` class index
    into the model's class names, ``meta`` what was drawn (for the card)."""

    image: np.ndarray
    pixel_A: float
    rc: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any]


SampleSource = Callable[[np.random.Generator], TrainingSample]


class DataConfig(BaseModel):
    """The distribution training frames are drawn from (interpreted by the sample source)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    specimens: dict[str, float] = Field(default_factory=lambda: {"graphene": 0.5, "mos2": 0.2, "ws2": 0.2, "mose2": 0.1})
    dose_e_per_A2: tuple[float, float] = (5e2, 2e6)  # log-uniform
    pixel_A: tuple[float, float] = (0.05, 0.2)  # log-uniform
    defocus_A: float = 15.0  # rms of C10 (normal), unless defocus_range_A is set
    defocus_range_A: float | None = None  # C10 uniform in +-this, Å (overrides defocus_A)
    astigmatism_A: float = 10.0  # C12 uniform up to this
    c30_A: tuple[float, float] = (0.0, 0.0)  # C30 (spherical aberration) uniform in this range, Å
    # ADF detector mix: "legacy" = the power law the first weights were trained on (n = 1.8,
    # sigma_C 0.0025, MAADF-like), "standard-haadf" = stemagent.simulators.adf_detector.standard_haadf
    # for the specimen's voltage, calibrated against multislice; "maadf" = 40-200 mrad, calibrated.
    detectors: dict[str, float] = Field(default_factory=lambda: {"legacy": 1.0})
    # beam energy per specimen for the calibrated detectors, keV (missing: 60)
    energy_keV: dict[str, float] = Field(default_factory=dict)
    convergence_mrad: tuple[float, float] = (22.0, 34.0)
    source_fwhm_A: tuple[float, float] = (0.0, 0.5)
    drift_A_per_frame: float = 1.5  # rms drift over one frame, per axis
    dwell_s: tuple[float, float] = (1e-6, 8e-6)
    jitter_A: tuple[float, float] = (0.0, 0.08)
    gain: tuple[float, float] = (0.5, 4.0)
    offset: tuple[float, float] = (0.0, 20.0)
    read_noise: tuple[float, float] = (0.0, 1.0)
    si_per_nm2: tuple[float, float] = (0.1, 0.8)
    vacancy_per_nm2: tuple[float, float] = (0.1, 0.6)
    tmd_vacancy_fraction: tuple[float, float] = (0.02, 0.12)
    tmd_substitution_fraction: tuple[float, float] = (0.02, 0.12)


class TrainConfig(BaseModel):
    """``stemagent train-segmenter --config`` file (YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0)
    arch: str = "dilated-unet"
    arch_kwargs: dict[str, Any] = Field(default_factory=lambda: {"widths": [16, 32, 48], "dilations": [1, 2, 4, 8]})
    class_names: tuple[str, ...] = CLASS_NAMES
    model_pixel_A: float = Field(0.2, gt=0.0)
    crop_A: float = Field(25.6, gt=2.0, description="side of a training crop, Å")
    batch_size: int = Field(8, ge=1)
    steps: int = Field(2000, ge=1)
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    mask_radius_A: float = Field(0.3, gt=0.0)
    class_weights: tuple[float, ...] | None = None  # background first; default 1 / 2 / 4 (rare)
    num_threads: int = Field(2, ge=1)
    checkpoint_every: int = Field(250, ge=1)
    checkpoint_dir: Path = Path("runs/segmenter-checkpoints")
    out: Path = Path("src/weights/unet_segmenter.pt")
    max_minutes: float | None = Field(None, gt=0.0, description="stop early (and still write everything) after this long")
    init_from: Path | None = Field(None, description="start from these weights (a state dict of the same architecture)")
    data: DataConfig = Field(default_factory=DataConfig)


RARE = ("Si", "vacancy", "substituted", "column-vacancy")


def _class_weights(cfg: TrainConfig) -> torch.Tensor:
    if cfg.class_weights is not None:
        if len(cfg.class_weights) != len(cfg.class_names) + 1:
            raise ValueError(f"class_weights={cfg.class_weights}: needs {len(cfg.class_names) + 1} values (background first)")
        return torch.tensor(cfg.class_weights, dtype=torch.float32)
    return torch.tensor([1.0] + [4.0 if c in RARE else 2.0 for c in cfg.class_names], dtype=torch.float32)


def sample_to_tensors(s: TrainingSample, size: int, mask_radius_px: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-grid input ``(1, size, size)`` and class map ``(size, size)`` (0 = background)."""
    img = torch.as_tensor(np.asarray(s.image, dtype=np.float32))[None, None]
    h, w = img.shape[-2:]
    x = normalize_images(resize(img, (size, size)))[0]
    target = torch.zeros(size, size, dtype=torch.long)
    if len(s.rc):
        rc = scale_rc(torch.as_tensor(np.asarray(s.rc, dtype=np.float64)), (h, w), (size, size))
        lab = torch.as_tensor(np.asarray(s.labels, dtype=np.int64)) + 1
        rad = int(math.ceil(mask_radius_px))
        offs = torch.arange(-rad, rad + 1)
        base = torch.round(rc).long()
        n = len(base)
        rr = (base[:, 0, None, None] + offs[None, :, None]).expand(n, len(offs), len(offs))
        cc = (base[:, 1, None, None] + offs[None, None, :]).expand(n, len(offs), len(offs))
        d2 = (rr - rc[:, 0, None, None]) ** 2 + (cc - rc[:, 1, None, None]) ** 2
        ok = (d2 <= mask_radius_px**2) & (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
        lab_b = lab[:, None, None].expand_as(rr)
        target[rr[ok], cc[ok]] = lab_b[ok]
    return x, target


def make_batch(source: SampleSource, rng: np.random.Generator, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, list[TrainingSample]]:
    size = int(round(cfg.crop_A / cfg.model_pixel_A))
    size -= size % 8
    xs, ys, samples = [], [], []
    for _ in range(cfg.batch_size):
        s = source(rng)
        x, y = sample_to_tensors(s, size, cfg.mask_radius_A / cfg.model_pixel_A)
        xs.append(x)
        ys.append(y)
        samples.append(s)
    return torch.stack(xs), torch.stack(ys), samples


def _progress():  # type: ignore[no-untyped-def]
    # rich is optional at import time for library users
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train-segmenter"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.2f} step/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def train(
    cfg: TrainConfig,
    source: SampleSource,
    *,
    data_description: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train per ``cfg`` on samples from ``source``; write weights, card and checkpoints.

    Returns the model card (also written as ``<out>.json`` and ``<out>.md``).
    """
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_model(cfg.arch, len(cfg.class_names), **cfg.arch_kwargs)
    if cfg.init_from is not None:
        model.load_state_dict(torch.load(cfg.init_from, map_location="cpu", weights_only=True))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    weights = _class_weights(cfg)
    cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    losses: list[float] = []
    ema = float("nan")
    steps_done = 0
    data_s = 0.0
    prog = _progress() if show_progress else None
    task = prog.add_task("train", total=cfg.steps, loss=float("nan"), rate=0.0) if prog else None
    if prog:
        prog.start()
    try:
        model.train()
        for step in range(cfg.steps):
            td = time.perf_counter()
            x, y, _ = make_batch(source, rng, cfg)
            data_s += time.perf_counter() - td
            logits = model(x)
            loss = F.cross_entropy(logits, y, weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps_done = step + 1
            lv = float(loss.detach())
            losses.append(lv)
            ema = lv if math.isnan(ema) else 0.98 * ema + 0.02 * lv
            if prog is not None and task is not None:
                prog.update(task, advance=1, loss=ema, rate=steps_done / (time.perf_counter() - t0))
            if steps_done % cfg.checkpoint_every == 0:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": steps_done}, cfg.checkpoint_dir / f"step_{steps_done:06d}.pt")
            if cfg.max_minutes is not None and time.perf_counter() - t0 > 60.0 * cfg.max_minutes:
                break
    finally:
        if prog:
            prog.stop()
    train_s = time.perf_counter() - t0
    model.eval()
    torch.save(model.state_dict(), cfg.out)
    card: dict[str, Any] = {
        "name": cfg.out.stem,
        "arch": cfg.arch,
        "arch_kwargs": cfg.arch_kwargs,
        "class_names": list(cfg.class_names),
        "model_pixel_A": cfg.model_pixel_A,
        "input": "raw frame resampled to model_pixel_A, minus its 1% quantile, divided by its mean",
        "output": "logits (background + classes) per model-grid pixel",
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "trained": {
            "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "steps": steps_done,
            "batch_size": cfg.batch_size,
            "samples_seen": steps_done * cfg.batch_size,
            "seconds": round(train_s, 1),
            "data_seconds": round(data_s, 1),
            "final_loss_ema": round(ema, 5),
            "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, {cfg.num_threads} threads".strip(),
        },
        "config": json.loads(cfg.model_dump_json()),
        "data": data_description or {},
    }
    if cfg.init_from is not None:
        prev = cfg.init_from.with_suffix(".json")
        card["initialised_from"] = {"weights": str(cfg.init_from)}
        if prev.is_file():
            before = json.loads(prev.read_text(encoding="utf-8"))
            card["initialised_from"].update({"trained": before.get("trained"), "config": before.get("config"), "initialised_from": before.get("initialised_from")})
    write_card(card, cfg.out)
    return card


def _phase_ranges(cfg: dict[str, Any], steps: Any) -> str:
    d = DataConfig(**cfg.get("data", {}))
    c10 = f"C10 uniform ±{d.defocus_range_A:g} Å" if d.defocus_range_A is not None else f"C10 normal rms {d.defocus_A:g} Å"
    c30 = f"C30 uniform {d.c30_A[0]:g} to {d.c30_A[1]:g} Å" if d.c30_A != (0.0, 0.0) else "C30 0"
    det = ", ".join(f"{k} {v:g}" for k, v in d.detectors.items())
    energy = ", ".join(f"{k} {v:g}" for k, v in d.energy_keV.items()) or "60 keV"
    spec = ", ".join(f"{k} {v:g}" for k, v in d.specimens.items())
    return (f"seed {cfg.get('seed')}, {steps} steps: specimens {{{spec}}}; dose {d.dose_e_per_A2[0]:g}-{d.dose_e_per_A2[1]:g} e/Å² "
            f"(log-uniform); pixel {d.pixel_A[0]:g}-{d.pixel_A[1]:g} Å; ADF detector {{{det}}} (legacy: power law n 1.8, "
            f"sigma_C 0.0025 at 60 keV; standard-haadf: 80-200 mrad < 70 keV, 70-200 mrad above, multislice-calibrated) at "
            f"{energy}; {c10}, C12 0-{d.astigmatism_A:g} Å, {c30}; convergence {d.convergence_mrad[0]:g}-{d.convergence_mrad[1]:g} mrad")


def training_ranges(card: dict[str, Any]) -> list[str]:
    """One line per training phase (this one, then each ``initialised_from``): specimens, dose,
    detector and aberration ranges the weights have seen."""
    out = [f"- {_phase_ranges(card.get('config', {}), card.get('trained', {}).get('steps', '?'))}"]
    prev = card.get("initialised_from")
    while isinstance(prev, dict) and prev.get("config"):
        out.append(f"- (`{prev.get('weights', '?')}`) {_phase_ranges(prev['config'], (prev.get('trained') or {}).get('steps', '?'))}")
        prev = prev.get("initialised_from")
    return out


def write_card(card: dict[str, Any], weights: Path) -> None:
    """Write ``card`` as ``<weights>.json`` and a readable ``<weights>.md``."""
    weights.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    lines = [f"# Model card: {card['name']}", ""]
    lines += [f"- architecture: `{card['arch']}` {card['arch_kwargs']} ({card['parameters']} parameters)"]
    lines += [f"- classes: {', '.join(card['class_names'])} (+ background)", f"- model sampling: {card['model_pixel_A']} Å/px"]
    lines += [f"- input: {card['input']}", f"- output: {card['output']}"]
    tr = card["trained"]
    lines += ["", "## Training", ""]
    lines += [f"- date: {tr['date']}; {tr['steps']} steps x {tr['batch_size']} = {tr['samples_seen']} generated frames; {tr['seconds']} s on {tr['machine']}"]
    lines += [f"- final loss (EMA): {tr['final_loss_ema']}; seed {card['config']['seed']}"]
    if "initialised_from" in card:
        prev = card["initialised_from"].get("trained") or {}
        lines += [f"- continued from `{card['initialised_from']['weights']}` ({prev.get('steps', '?')} steps, {prev.get('seconds', '?')} s, {prev.get('date', '?')}); its config is in the JSON card"]
    lines += ["", "## Training ranges (every phase, latest first)", ""]
    lines += training_ranges(card)
    lines += ["", "## Data", "", "```json", json.dumps(card.get("data", {}), indent=2), "```"]
    lines += ["", "## Config", "", "```json", json.dumps(card["config"], indent=2), "```"]
    if "metrics" in card:
        lines += ["", "## Metrics (held-out generated frames)", "", "```json", json.dumps(card["metrics"], indent=2), "```"]
    weights.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
