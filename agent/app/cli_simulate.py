"""``stemagent simulate``: frames plus ground truth from the digital twin, for training and benchmarks.

Writes one ``.npz`` file (no pickled objects): ``images`` ``(n, rows, cols)`` float32,
``line_times_s`` ``(n, rows)``, ``centers_A`` ``(n, 2)``, ``doses_e_per_A2`` ``(n,)``, per frame
``frame{i}/truth_*`` arrays (see :meth:`stemagent.simulators.render.FrameTruth.to_arrays`),
``events_json`` (every beam-induced event with its time) and ``config_json``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import typer

from stemagent.clock import VirtualClock
from stemagent.config import load_config
from stemagent.errors import ConfigError, InputError
from stemagent.simulators.factory import twin_from_config
from stemagent.types import ScanGeometry


def _check_writable(out: Path) -> None:
    """Fail before simulating, not after, when ``out`` cannot be written."""
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "ab"):
            pass
    except OSError as exc:
        raise InputError("--out", str(out), f"cannot be written ({exc.strerror or exc})") from None
    if not existed:
        out.unlink()


def simulate(
    config: Path = typer.Option(..., "--config", "-c", help="a run configuration whose driver.kind is 'twin'"),
    out: Path = typer.Option(Path("twin_frames.npz"), "--out", "-o", help="output .npz file"),
    n_frames: int = typer.Option(4, "--n-frames", "-n", min=1, max=100000, help="frames to simulate"),
    random_centers: bool = typer.Option(False, "--random-centers", help="move the field to a random place each frame"),
) -> None:
    """Simulate frames with the digital twin and write them with their ground truth."""
    cfg = load_config(config)
    if cfg.driver.kind != "twin":
        raise ConfigError(str(config), "driver.kind", cfg.driver.kind, "simulate needs a 'twin' driver")
    _check_writable(out)
    clock = VirtualClock()
    driver = twin_from_config(cfg.driver, clock=clock, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    base = cfg.scan.geometry()
    half_room = max(0.0, (cfg.driver.specimen_size_A - max(base.fov_A)) / 2.0 - 5.0)

    async def go() -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        images, times, centers, doses = [], [], [], []
        await driver.connect()
        for i in range(n_frames):
            c = base.center_A
            if random_centers:
                c = tuple(rng.uniform(-half_room, half_room, size=2).tolist())
            geo = ScanGeometry(center_A=c, fov_A=base.fov_A, shape_px=base.shape_px, rotation_rad=base.rotation_rad,
                               dwell_s=base.dwell_s, flyback_s=base.flyback_s)
            frame = await driver.acquire(geo)
            truth = driver.ground_truth.frame_truth(frame.index)
            assert truth is not None
            images.append(frame.image)
            times.append(frame.line_times_s)
            centers.append(c)
            doses.append(frame.dose_e_per_A2)
            for k, v in truth.to_arrays().items():
                arrays[f"frame{i}/{k}"] = v
        await driver.close()
        arrays["images"] = np.stack(images)
        arrays["line_times_s"] = np.stack(times)
        arrays["centers_A"] = np.asarray(centers, dtype=np.float64)
        arrays["doses_e_per_A2"] = np.asarray(doses)
        return arrays

    arrays = asyncio.run(go())
    arrays["events_json"] = np.asarray(json.dumps([e.to_dict() for e in driver.ground_truth.events]))
    arrays["config_json"] = np.asarray(json.dumps(cfg.model_dump(mode="json")))
    np.savez_compressed(out, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
    typer.echo(json.dumps({"out": str(out), "frames": n_frames, "events": len(driver.ground_truth.events)}))
