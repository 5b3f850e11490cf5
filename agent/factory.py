"""Build the parts of a run from its validated configuration.

The one place that maps config ``kind`` values to classes; it may import drivers and
simulators (core never does).
"""

from __future__ import annotations

import datetime as _dt
import uuid
from pathlib import Path
from typing import Any

import numpy as np

import stemagent
from stemagent.agent.loop import Agent, TelemetrySink
from stemagent.agent.safety import SafetyGate
from stemagent.clock import Clock, SystemClock, VirtualClock
from stemagent.config import RunConfig
from stemagent.driver import Driver
from stemagent.runlog import RunLogWriter
from stemagent.stages import Policy, Segmenter


def build_clock(cfg: RunConfig) -> Clock:
    """Simulated drivers in ``fast`` pace share a virtual clock with the agent; all else runs on real time."""
    pace = getattr(cfg.driver, "pace", "realtime")
    return VirtualClock() if pace == "fast" else SystemClock()


def build_driver(cfg: RunConfig, clock: Clock) -> Driver:
    d = cfg.driver
    if d.kind == "minimal-twin":
        from stemagent.simulators.minimal import MinimalTwinDriver

        return MinimalTwinDriver(d, seed=cfg.seed, clock=clock)
    if d.kind == "twin":
        from stemagent.simulators.factory import twin_from_config

        return twin_from_config(d, clock=clock, seed=cfg.seed)
    if d.kind == "replay":
        from stemagent.drivers.replay import open_replay

        return open_replay(d.path, pace=d.pace, clock=clock)
    if d.kind == "zmq":
        from stemagent.drivers.zmq_driver import ZmqDriver

        return ZmqDriver.from_config(d, seed=cfg.seed, clock=clock)
    raise ValueError(f"driver.kind={d.kind!r}: no driver is registered for this kind")


def build_segmenter(cfg: RunConfig) -> Segmenter:
    s = cfg.pipeline.segmenter
    if s.kind == "log":
        from stemagent.segmentation.classical import LoGFinder

        return LoGFinder(sigma_A=s.sigma_A, threshold=s.threshold, min_separation_A=s.min_separation_A, refine=s.refine)
    if s.kind == "unet":
        from stemagent.segmentation.unet_segmenter import UNetSegmenter

        return UNetSegmenter(
            s.weights,
            device=s.device,
            threshold=s.threshold,
            min_separation_A=s.min_separation_A,
            refine=s.refine,
            refine_pixel_A=s.refine_pixel_A,
            probe_sigma_A=s.probe_sigma_A,
            num_threads=s.num_threads,
        )
    raise ValueError(f"pipeline.segmenter.kind={s.kind!r}: no segmenter is registered for this kind")


def build_policy(cfg: RunConfig, rng: np.random.Generator, beam_current_pA: float | None = None) -> Policy:
    p = cfg.policy
    area = (cfg.safety.area_center_A, cfg.safety.area_half_width_A)
    if p.kind == "raster":
        from stemagent.policies.scanning import RasterPolicy

        return RasterPolicy(cfg.scan, area[0], area[1], overlap=p.overlap)
    if p.kind == "random":
        from stemagent.policies.scanning import RandomPolicy

        return RandomPolicy(cfg.scan, area[0], area[1], rng)
    if p.kind == "survey":
        from stemagent.policies.survey import SurveyPolicy

        current = beam_current_pA if beam_current_pA is not None else getattr(cfg.driver, "beam_current_pA", 20.0)
        return SurveyPolicy(p, area_center_A=area[0], area_half_width_A=area[1], beam_current_pA=current,
                            local_dose_budget_e_per_A2=cfg.safety.max_total_dose_e_per_A2, seed=cfg.seed)
    raise ValueError(f"policy.kind={p.kind!r}: no policy is registered for this kind")


def new_run_dir(cfg: RunConfig, base: Path | None = None) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(base or cfg.log.directory) / f"{cfg.name}-{stamp}-{uuid.uuid4().hex[:6]}"


def run_metadata(cfg: RunConfig, beam_current_pA: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    md = {
        "run_name": cfg.name,
        "seed": cfg.seed,
        "stemagent_version": stemagent.__version__,
        "driver_kind": cfg.driver.kind,
        "beam_current_pA": beam_current_pA,
        "config": cfg.model_dump(mode="json"),
    }
    md.update(extra or {})
    return md


async def build_agent(
    cfg: RunConfig,
    *,
    run_dir: Path | None = None,
    driver: Driver | None = None,
    clock: Clock | None = None,
    telemetry: TelemetrySink | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> Agent:
    """Assemble an :class:`Agent` for ``cfg``. The driver's capabilities set the beam current for dose."""
    clock = clock or build_clock(cfg)
    driver = driver or build_driver(cfg, clock)
    rng = np.random.default_rng(cfg.seed)
    await driver.connect()
    caps = await driver.capabilities()
    writer = RunLogWriter(run_dir or new_run_dir(cfg), run_metadata(cfg, caps.beam_current_pA, extra_metadata), fsync=cfg.log.fsync)
    return Agent(
        driver=driver,
        segmenter=build_segmenter(cfg),
        policy=build_policy(cfg, rng, caps.beam_current_pA),
        gate=SafetyGate(cfg.safety, beam_current_pA=caps.beam_current_pA),
        writer=writer,
        clock=clock,
        initial_scan=cfg.scan.geometry(),
        max_frames=cfg.max_frames,
        telemetry=telemetry,
        retry_s=cfg.agent.retry_s,
        max_consecutive_refusals=cfg.agent.max_consecutive_refusals,
        auto_resume_after_fault=cfg.agent.auto_resume_after_fault,
    )
