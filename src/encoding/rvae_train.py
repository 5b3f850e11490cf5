"""Training the rVAE (:mod:`stemagent.encoding.rvae`) on atom-centred patches, and the patch
sampler shared by training and the pipeline stage.

Core code: it knows nothing about the twin (``stemagent.agent.app.rvae_training`` supplies twin
patches). Patches are sampled in the **sample frame**: a ``P x P`` grid at ``pixel_A`` Å/px
centred on each atom's position, axis-aligned with the sample's x and y, read from the frame by
bilinear interpolation (:func:`sample_patches`); frames are normalised first
(:func:`normalize_frame`: minus the 1% quantile, over the mean), so an angle latent is an angle in
the sample frame whatever the scan rotation and sampling.

Reproducible from ``seed``: initial weights and batch order are seeded (bit-identical on the same
machine and thread count). Writes ``<out>.pt`` (state dict), ``<out>.json`` (spec and model card)
and ``<out>.md``, and checkpoints every ``checkpoint_every`` steps under ``checkpoint_dir``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.ndimage import map_coordinates

from stemagent.encoding.rvae import RVAE, RVAESpec, save_rvae
from stemagent.errors import InputError
from stemagent.types import ScanGeometry


def frame_scale(image: np.ndarray) -> tuple[float, float]:
    """``(offset, scale)`` of :func:`normalize_frame`: the 1% quantile, and the mean above it."""
    a = np.asarray(image, dtype=np.float32)
    lo = float(np.quantile(a, 0.01))
    m = float(a.mean()) - lo
    return lo, (m if m > 1e-12 else 1.0)


def normalize_frame(image: np.ndarray, scale: tuple[float, float] | None = None) -> np.ndarray:
    """``(image - q01) / mean(image - q01)`` as float32 (the rVAE's input scale); ``scale``: another
    frame's ``(offset, scale)`` (:func:`frame_scale`), e.g. a noisy frame's for its noiseless image."""
    lo, m = scale if scale is not None else frame_scale(image)
    return ((np.asarray(image, dtype=np.float32) - np.float32(lo)) / np.float32(m)).astype(np.float32)


def sample_patches(image: np.ndarray, geometry: ScanGeometry, positions_A: np.ndarray, patch_px: int, pixel_A: float, *,
                   centres_rc: np.ndarray | None = None, rotation_rad: np.ndarray | float | None = None) -> np.ndarray:
    """Patches ``(N, P, P)`` float32 around ``positions_A`` ``(N, 2)`` on a sample-frame grid of
    ``pixel_A`` (row = +y, col = +x), bilinear, zero outside the frame. ``image`` should be
    normalised already (:func:`normalize_frame`).

    ``centres_rc`` ``(N, 2)``: where the atoms appear in the image (row, col), when that is known
    better than ``geometry.sample_to_pixel(positions_A)`` (the twin's truth, drift applied); the
    grid's axes still follow the sample frame. ``rotation_rad`` (scalar or ``(N,)``): the grid is
    turned counter-clockwise by this in the sample frame, so the patch shows the neighbourhood
    turned by minus this (an rVAE's angle latent moves by ``-rotation_rad``)."""
    pos = np.asarray(positions_A, dtype=np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(pos)):
        raise InputError("positions_A", "non-finite", "must be finite")
    if centres_rc is None:
        rc0 = geometry.sample_to_pixel(pos)
    else:
        rc0 = np.asarray(centres_rc, dtype=np.float64).reshape(-1, 2)
        if rc0.shape != pos.shape or not np.all(np.isfinite(rc0)):
            raise InputError("centres_rc", f"shape {rc0.shape}", f"must be finite and of shape {pos.shape}")
    c = (patch_px - 1) / 2.0
    off = (np.arange(patch_px) - c) * pixel_A
    gy, gx = np.meshgrid(off, off, indexing="ij")
    grid = np.stack([gx, gy], axis=-1).reshape(-1, 2)  # (P*P, 2) sample-frame offsets (x, y)
    rot = np.zeros(len(pos)) if rotation_rad is None else np.broadcast_to(np.asarray(rotation_rad, dtype=np.float64), (len(pos),))
    cs, sn = np.cos(rot)[:, None], np.sin(rot)[:, None]
    ox = cs * grid[None, :, 0] - sn * grid[None, :, 1]
    oy = sn * grid[None, :, 0] + cs * grid[None, :, 1]
    # sample_to_pixel is affine: its linear part maps the offsets
    lin = geometry.sample_to_pixel(np.stack([ox.ravel(), oy.ravel()], axis=1)) - geometry.sample_to_pixel(np.zeros((1, 2)))
    rc = rc0[:, None, :] + lin.reshape(len(pos), -1, 2)
    vals = map_coordinates(np.asarray(image, dtype=np.float32), [rc[..., 0].ravel(), rc[..., 1].ravel()], order=1, mode="constant",
                           cval=0.0)
    return vals.reshape(len(pos), patch_px, patch_px).astype(np.float32)


def synthetic_patches(n: int, rng: np.random.Generator, patch_px: int = 16, pixel_A: float = 0.2, noise: float = 0.05,
                      classes: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Toy graphene-like patches for tests: a centre atom and three neighbours at 1.42 Å, 120° apart,
    turned by a random angle. Class 0: C (unit peaks); 1: bright centre (Si); 2: one neighbour
    missing. Returns ``(patches (n, P, P), labels (n,), angles_rad (n,))``."""
    c = (patch_px - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(patch_px) - c, np.arange(patch_px) - c, indexing="ij")
    labels = rng.integers(0, classes, size=n)
    angles = rng.uniform(-np.pi, np.pi, size=n)
    bond = 1.42 / pixel_A
    sig = 0.35 / pixel_A
    out = np.empty((n, patch_px, patch_px), dtype=np.float32)
    for i in range(n):
        amp0 = 2.0 if labels[i] == 1 else 1.0
        img = amp0 * np.exp(-(xx ** 2 + yy ** 2) / (2 * sig ** 2))
        for j in range(3):
            if labels[i] == 2 and j == 0:
                continue
            t = angles[i] + j * 2 * np.pi / 3
            img += np.exp(-((xx - bond * np.cos(t)) ** 2 + (yy - bond * np.sin(t)) ** 2) / (2 * sig ** 2))
        out[i] = img + noise * rng.standard_normal(img.shape)
    return out, labels, angles


class RVAETrainConfig(BaseModel):
    """``stemagent train-rvae``: the model, the optimiser and where things go. ``data`` is read by
    the patch source (the twin's, in ``stemagent.agent.app.rvae_training``)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    patch_px: int = Field(16, ge=4, le=128)
    pixel_A: float = Field(0.2, gt=0.0, description="patch sampling, Å/px")
    latent_dim: int = Field(2, ge=1, le=64)
    fold: int = Field(3, ge=1, description="lattice symmetry of a site: angles are modulo 2 pi / fold")
    harmonics: int = Field(6, ge=1, le=16)
    rings: int = Field(7, ge=2, le=32)
    hidden: int = Field(64, ge=4)
    decoder_hidden: int = Field(64, ge=4)
    likelihood: Literal["gaussian", "bernoulli"] = "gaussian"
    noise_sigma: float = Field(0.3, gt=0.0, description="gaussian likelihood width (normalised intensity)")
    angle_prior_rad: float = Field(1.8, gt=0.0, description="sd of the angle prior")
    angle_weight: float = Field(1.0, ge=0.0, description="weight of the angle KL")
    shift_prior_px: float = Field(1.0, gt=0.0, description="sd of the translation prior, px")
    batch_size: int = Field(256, ge=1)
    steps: int = Field(3000, ge=1)
    lr: float = Field(1e-2, gt=0.0)
    num_threads: int = Field(1, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    checkpoint_dir: Path | None = Field(Path("runs/rvae-checkpoints"), description="None: no checkpoints")
    out: Path = Path("src/weights/rvae_graphene.pt")
    max_minutes: float | None = Field(None, gt=0.0, description="stop early (and still write everything) after this long")
    data: dict[str, Any] = Field(default_factory=dict, description="patch source settings (see the twin source)")

    def spec(self) -> RVAESpec:
        return RVAESpec(patch_px=self.patch_px, latent_dim=self.latent_dim, fold=self.fold, harmonics=self.harmonics, rings=self.rings,
                        hidden=self.hidden, decoder_hidden=self.decoder_hidden, likelihood=self.likelihood, noise_sigma=self.noise_sigma,
                        angle_prior_rad=self.angle_prior_rad, angle_weight=self.angle_weight, shift_prior_px=self.shift_prior_px)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn  # rich only when training runs

    return Progress(TextColumn("[bold]train-rvae"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.2f}"),
                    TextColumn("recon {task.fields[recon]:.2f}"), TextColumn("{task.fields[rate]:.1f} step/s"), TimeElapsedColumn(),
                    TimeRemainingColumn())


def fit(cfg: RVAETrainConfig, patches: np.ndarray, *, show_progress: bool = False) -> tuple[RVAE, dict[str, Any]]:
    """Train an rVAE per ``cfg`` on ``patches`` ``(N, P, P)`` in memory (no files); returns the model
    (eval mode, CPU) and the training record."""
    x = torch.as_tensor(np.asarray(patches, dtype=np.float32))
    if x.ndim != 3 or tuple(x.shape[1:]) != (cfg.patch_px, cfg.patch_px):
        raise InputError("patches.shape", tuple(x.shape), f"must be (N, {cfg.patch_px}, {cfg.patch_px}) (patch_px)")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)  # restored below: a caller's own setting is not changed
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = RVAE(cfg.spec())
    model.fit_invariant_scale(x[: min(len(x), 4096)])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    ema = float("nan")
    terms: dict[str, float] = {}
    steps_done = 0
    prog = _progress() if show_progress else None
    task = prog.add_task("train", total=cfg.steps, loss=float("nan"), recon=float("nan"), rate=0.0) if prog else None
    if prog:
        prog.start()
    try:
        model.train()
        for step in range(cfg.steps):
            idx = torch.randint(0, len(x), (min(cfg.batch_size, len(x)),), generator=gen)
            loss, terms = model.loss(x[idx], generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps_done = step + 1
            lv = float(loss.detach())
            ema = lv if math.isnan(ema) else 0.98 * ema + 0.02 * lv
            if prog is not None and task is not None:
                prog.update(task, advance=1, loss=ema, recon=terms["recon"], rate=steps_done / (time.perf_counter() - t0))
            if cfg.checkpoint_dir is not None and steps_done % cfg.checkpoint_every == 0 and steps_done < cfg.steps:
                cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": steps_done},
                           cfg.checkpoint_dir / f"rvae_step_{steps_done:06d}.pt")
            if cfg.max_minutes is not None and time.perf_counter() - t0 > 60.0 * cfg.max_minutes:
                break
    finally:
        if prog:
            prog.stop()
        torch.set_num_threads(threads_before)
    model.eval()
    record = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "steps": steps_done,
        "batch_size": cfg.batch_size,
        "patches": int(len(x)),
        "seconds": round(time.perf_counter() - t0, 1),
        "final_loss_ema": round(ema, 4),
        "final_terms": {k: round(v, 4) for k, v in terms.items()},
        "machine": f"{platform.machine()} torch {torch.__version__}, {cfg.num_threads} threads, {os.cpu_count()} cores",
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # 1-min load at start and end: timings depend on it
    }
    return model, record


def train(cfg: RVAETrainConfig, patches: np.ndarray, *, data_description: dict[str, Any] | None = None,
          show_progress: bool = True) -> dict[str, Any]:
    """Train on ``patches`` and write weights, card and checkpoints; returns the card."""
    model, record = fit(cfg, patches, show_progress=show_progress)
    card = {"name": cfg.out.stem, "parameters": int(sum(p.numel() for p in model.parameters())), "pixel_A": cfg.pixel_A,
            "input": "frame minus its 1% quantile over its mean (normalize_frame), sampled on a sample-frame grid (sample_patches)",
            "trained": record, "config": json.loads(cfg.model_dump_json()), "data": data_description or {}}
    save_rvae(model, cfg.out, card)
    write_card(cfg.out)
    return card


def write_card(weights: Path, metrics: dict[str, Any] | None = None) -> None:
    """Add ``metrics`` to ``<weights>.json`` (if given) and write the readable ``<weights>.md``."""
    head_path = weights.with_suffix(".json")
    card = json.loads(head_path.read_text(encoding="utf-8"))
    if metrics is not None:
        card["metrics"] = metrics
        head_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    tr = card["trained"]
    lines = [f"# Model card: {card['name']}", "", f"- rotationally invariant VAE, spec {card['spec']} ({card['parameters']} parameters)",
             f"- input: {card['input']}, {card['pixel_A']} Å/px", "", "## Training", "",
             f"- {tr['date']}; {tr['steps']} steps x {tr['batch_size']} patches (from {tr['patches']}); {tr['seconds']} s on {tr['machine']}"
             f" (load average {tr.get('load_average', 'not recorded')} at start and end)",
             f"- final loss (EMA) {tr['final_loss_ema']}, terms {tr['final_terms']}; seed {card['config']['seed']}",
             "", "## Data", "", "```json", json.dumps(card.get("data", {}), indent=2), "```",
             "", "## Config (recipe)", "", "```json", json.dumps(card["config"], indent=2), "```"]
    if "metrics" in card:
        lines += ["", "## Metrics (held-out twin patches)", "", "```json", json.dumps(card["metrics"], indent=2), "```"]
    weights.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
