"""Build the parts of a run from its validated configuration.

The one place that maps config ``kind`` values to classes; it may import drivers and
simulators (core never does). The U-Net segmenter and the manipulation policy are imported when
a config asks for them: torch takes seconds to import, which ``stemagent validate`` and a LoG run
need not pay.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np

import stemagent
from stemagent.agent.control import ControlMessage
from stemagent.agent.loop import Agent, TelemetrySink
from stemagent.agent.safety import SafetyGate
from stemagent.clock import Clock, SystemClock, VirtualClock
from stemagent.codec import encode_capabilities
from stemagent.boundaries.trace import BoundaryStage
from stemagent.config import RunConfig, config_from_dict
from stemagent.drift.config import DriftConfig
from stemagent.encoding.config import EncodingConfig
from stemagent.errors import ConfigError, InputError
from stemagent.pipeline import BoundaryTraceStage, EncodingAdapter, Pipeline, PolicyStage, RVAEAdapter, SegmentStage, Stage
from stemagent.driver import Driver
from stemagent.drivers.replay import open_replay
from stemagent.drivers.zmq_driver import ZmqDriver
from stemagent.policies.scanning import RandomPolicy, RasterPolicy
from stemagent.policies.survey_features import candidate_grid
from stemagent.runlog import RunLogWriter
from stemagent.segmentation.classical import LoGFinder
from stemagent.simulators.factory import twin_from_config
from stemagent.simulators.minimal import MinimalTwinDriver
from stemagent.stages import Policy, Segmenter
from stemagent.types import Capabilities, ScanGeometry, ScanRegion

log = logging.getLogger("stemagent.agent.app.factory")


def build_clock(cfg: RunConfig) -> Clock:
    """Simulated drivers in ``fast`` pace share a virtual clock with the agent; all else runs on real time."""
    pace = getattr(cfg.driver, "pace", "realtime")
    return VirtualClock() if pace == "fast" else SystemClock()


def build_driver(cfg: RunConfig, clock: Clock) -> Driver:
    d = cfg.driver
    if d.kind == "minimal-twin":
        return MinimalTwinDriver(d, seed=cfg.seed, clock=clock)
    if d.kind == "twin":
        return twin_from_config(d, clock=clock, seed=cfg.seed)
    if d.kind == "replay":
        return open_replay(d.path, pace=d.pace, clock=clock, pixel_size_A=d.pixel_size_A, beam_current_pA=d.beam_current_pA, dwell_s=d.dwell_s)
    if d.kind == "zmq":
        return ZmqDriver.from_config(d, seed=cfg.seed, clock=clock)
    raise ValueError(f"driver.kind={d.kind!r}: no driver is registered for this kind")


def build_segmenter(cfg: RunConfig) -> Segmenter:
    s = cfg.pipeline.segmenter
    if s.kind == "log":
        return LoGFinder(sigma_A=s.sigma_A, threshold=s.threshold, min_separation_A=s.min_separation_A, refine=s.refine)
    if s.kind == "unet":
        from stemagent.segmentation.unet_segmenter import UNetSegmenter  # heavy: torch, imported only when asked for

        segmenter = UNetSegmenter(
            s.weights,
            device=s.device,
            threshold=s.threshold,
            min_separation_A=s.min_separation_A,
            refine=s.refine,
            refine_pixel_A=s.refine_pixel_A,
            probe_sigma_A=s.probe_sigma_A,
            specimen=s.specimen,
            ood_fallback=s.ood_fallback,
            min_evidence_nats=s.min_evidence_nats,
            num_threads=s.num_threads,
        )
        segmenter.use_channels_last(s.channels_last)
        return segmenter
    raise ValueError(f"pipeline.segmenter.kind={s.kind!r}: no segmenter is registered for this kind")


def build_policy(cfg: RunConfig, rng: np.random.Generator, caps: Capabilities | None = None) -> Policy:
    """The run's policy; the device's capabilities (beam current, probe) set the dose a survey plans with."""
    p = cfg.policy
    area = (cfg.safety.area_center_A, cfg.safety.area_half_width_A)
    # the gate checks commands in beam coordinates, after the drift stage converted them: fields
    # planned right up to the edge would be refused once the specimen has drifted
    margin_A = cfg.pipeline.drift.area_margin_A if cfg.pipeline.drift is not None and cfg.pipeline.drift.enabled else 0.0
    if p.kind in ("raster", "random") and margin_A > 0:
        area = (area[0], max(area[1] - margin_A, max(cfg.scan.fov_A) / 2.0))
    if p.kind == "raster":
        return RasterPolicy(cfg.scan, area[0], area[1], overlap=p.overlap)
    if p.kind == "random":
        return RandomPolicy(cfg.scan, area[0], area[1], rng)
    if p.kind == "manipulation":
        from stemagent.policies.manipulation.policy import ManipulationPolicy  # heavy: torch and gpytorch, imported only when asked for

        return ManipulationPolicy(p, seed=cfg.seed)
    if p.kind == "survey":
        from stemagent.policies.survey import SurveyPolicy  # heavy: botorch and torch, imported only when asked for

        s = cfg.safety
        current = caps.beam_current_pA if caps is not None else float(getattr(cfg.driver, "beam_current_pA", 20.0))
        fwhm = s.probe_fwhm_A if caps is None or caps.probe_fwhm_A is None else min(s.probe_fwhm_A, caps.probe_fwhm_A)  # as the gate
        return SurveyPolicy(p, area_center_A=area[0], area_half_width_A=area[1], beam_current_pA=current,
                            local_dose_budget_e_per_A2=s.dose_budget_e_per_A2, probe_fwhm_A=fwhm, dose_cell_A=s.dose_cell_A,
                            flyback_blanked=s.flyback_blanked, seed=cfg.seed)
    raise ValueError(f"policy.kind={p.kind!r}: no policy is registered for this kind")


def bridge_backend(driver_section: dict[str, Any], seed: int) -> Driver:
    """The backend ``stemagent bridge`` serves for a ``driver`` section of its config."""
    run_cfg = config_from_dict({"driver": driver_section, "seed": seed}, source="<bridge config>")
    return build_driver(run_cfg, build_clock(run_cfg))


def build_encoding(cfg: RunConfig) -> EncodingAdapter:
    """The encoding stage of ``pipeline.encoding`` (torch: imported when a config asks for it)."""
    from stemagent.encoding.stage import EncodingStage  # heavy: torch, imported only when asked for

    enc = cfg.pipeline.encoding
    assert enc is not None
    settings = enc.model_dump(exclude={"log_symmetry"})
    return EncodingAdapter(EncodingStage(EncodingConfig(**settings)), log_symmetry=enc.log_symmetry)


def build_rvae(cfg: RunConfig) -> RVAEAdapter:
    """The rVAE stage of ``pipeline.rvae`` (torch: imported when a config asks for it)."""
    from stemagent.encoding.rvae_stage import RVAEStage  # heavy: torch, imported only when asked for

    conf = cfg.pipeline.rvae
    assert conf is not None
    return RVAEAdapter(RVAEStage(conf), log_digits=conf.log_digits)


def stage_names(cfg: RunConfig) -> list[str]:
    """The names of the run's stages, in order, before they are built."""
    return ["segment", *(["drift"] if cfg.pipeline.drift is not None else []),
            *(["boundaries"] if cfg.pipeline.boundaries is not None else []),
            *(["encoding"] if cfg.pipeline.encoding is not None else []),
            *(["rvae"] if cfg.pipeline.rvae is not None else []), "policy"]


def check_stage_options(cfg: RunConfig, source: str = "<config>") -> None:
    """Stage options (``pipeline.stages``) may only name the run's stages: a one-line ConfigError otherwise."""
    names = stage_names(cfg)
    unknown = sorted(set(cfg.pipeline.stages) - set(names))
    if unknown:
        raise ConfigError(source, f"pipeline.stages.{unknown[0]}", unknown[0], f"names no stage of this run (its stages: {names})")
    check_policy_options(cfg, source)


def build_drift_stage(config: DriftConfig) -> Stage:
    """The ``drift`` stage: a :class:`~stemagent.drift.stage.DriftStage` in the loop (refits in its own thread)."""
    from stemagent.drift.loop_stage import DriftLoopStage  # heavy: torch and gpytorch, imported only when asked for
    from stemagent.drift.stage import DriftStage  # heavy: see above

    return DriftLoopStage(DriftStage(config))


#: the gate's rule for a refused sub-scan -> the survey field that sets it
_SUBSCAN_FIELD = {"fov": "subscan_fov_A", "area": "subscan_fov_A", "pixels": "subscan_shape_px", "dwell": "subscan_dwell_s",
                  "dose": "subscan_dwell_s"}


def check_policy_options(cfg: RunConfig, source: str = "<config>") -> None:
    """A survey whose sub-scans the safety gate would refuse, or that fit no candidate grid in the
    allowed area, is a one-line ConfigError naming the policy field (checked before anything runs)."""
    p = cfg.policy
    if p.kind != "survey":
        return
    try:
        candidate_grid(cfg.safety.area_center_A, cfg.safety.area_half_width_A, p.subscan_fov_A, p.overlap)
    except InputError as exc:
        raise ConfigError(source, f"policy.{exc.field}", exc.value,
                          f"{exc.problem} (the allowed square: safety.area_half_width_A)") from None
    current = getattr(cfg.driver, "beam_current_pA", None)
    gate = SafetyGate(cfg.safety, beam_current_pA=float(current or 0.0))
    geometry = ScanGeometry(center_A=cfg.safety.area_center_A, fov_A=(p.subscan_fov_A, p.subscan_fov_A),
                            shape_px=(p.subscan_shape_px, p.subscan_shape_px), dwell_s=p.subscan_dwell_s)
    verdict = gate.check(ScanRegion(geometry), 0.0)
    if not verdict.allowed:
        field = _SUBSCAN_FIELD.get(verdict.rule, "subscan_fov_A")
        raise ConfigError(source, f"policy.{field}", getattr(p, field),
                          f"the safety gate would refuse every sub-scan ({verdict.rule}): {verdict.detail}")


def check_segmenter_classes(cfg: RunConfig, segmenter: Segmenter, source: str = "<config>") -> None:
    """A survey counting classes the segmenter never reports would never find anything: a ConfigError."""
    p = cfg.policy
    names = getattr(segmenter, "class_names", None)
    if p.kind != "survey" or p.objective.kind != "class_count" or names is None:
        return
    missing = [c for c in p.objective.classes if c not in names]
    if missing:
        raise ConfigError(source, "policy.objective.classes", list(p.objective.classes),
                          f"{missing} are not classes of the segmenter (it reports {list(names)})")


def build_pipeline(cfg: RunConfig, rng: np.random.Generator, caps: Capabilities | None = None) -> Pipeline:
    """The run's stages in order (``segment -> [drift] -> [boundaries] -> [encoding] -> [rvae] -> policy``), switched by ``pipeline.stages``."""
    check_stage_options(cfg)
    segmenter = build_segmenter(cfg)
    check_segmenter_classes(cfg, segmenter)
    stages: list[Stage] = [SegmentStage(segmenter)]
    if cfg.pipeline.drift is not None:
        stages.append(build_drift_stage(cfg.pipeline.drift))
    if cfg.pipeline.boundaries is not None:
        stages.append(BoundaryTraceStage(BoundaryStage(cfg.pipeline.boundaries)))
    if cfg.pipeline.encoding is not None:
        stages.append(build_encoding(cfg))
    if cfg.pipeline.rvae is not None:
        stages.append(build_rvae(cfg))
    stages.append(PolicyStage(build_policy(cfg, rng, caps)))
    return Pipeline(stages, dict(cfg.pipeline.stages))


def new_run_id() -> str:
    """A run's id: UTC time and a random suffix; unique across agents sharing a config name."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def new_run_dir(cfg: RunConfig, base: Path | None = None, run_id: str | None = None) -> Path:
    return Path(base or cfg.log.directory) / f"{cfg.name}-{run_id or new_run_id()}"


def run_metadata(cfg: RunConfig, caps: Capabilities, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    md = {
        "run_name": cfg.name,
        "seed": cfg.seed,
        "stemagent_version": stemagent.__version__,
        "driver_kind": cfg.driver.kind,
        "beam_current_pA": caps.beam_current_pA,
        "capabilities": encode_capabilities(caps),
        "config": cfg.model_dump(mode="json"),  # secrets (SecretStr) are dumped masked
    }
    try:
        md["pipeline"] = Pipeline.plan(stage_names(cfg), dict(cfg.pipeline.stages))
    except KeyError:  # a stage option names no stage: build_pipeline says so
        pass
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
    schedule: list[tuple[int, ControlMessage]] | None = None,
    pause_on_dose_report: bool = True,
) -> Agent:
    """Assemble an :class:`Agent` for ``cfg``. The driver's capabilities set the beam current and
    probe size for dose.

    A start that fails part-way undoes itself: the driver is closed, and a run log already
    opened is closed with ``exit_status: fail`` and the reason; the error is raised again.
    """
    clock = clock or build_clock(cfg)
    driver = driver or build_driver(cfg, clock)
    writer: RunLogWriter | None = None
    try:
        await asyncio.wait_for(driver.connect(), timeout=cfg.safety.watchdog_s)
        caps = await asyncio.wait_for(driver.capabilities(), timeout=cfg.safety.watchdog_s)
        writer = RunLogWriter(run_dir or new_run_dir(cfg), run_metadata(cfg, caps, extra_metadata), fsync=cfg.log.fsync)
        pipeline = build_pipeline(cfg, np.random.default_rng(cfg.seed), caps)
        return Agent(
            driver=driver,
            pipeline=pipeline,
            gate=SafetyGate(cfg.safety, beam_current_pA=caps.beam_current_pA, capabilities=caps),
            writer=writer,
            clock=clock,
            initial_scan=cfg.scan.geometry(),
            max_frames=cfg.max_frames,
            telemetry=telemetry,
            retry_s=cfg.agent.retry_s,
            retry_backoff=cfg.agent.retry_backoff,
            retry_max_s=cfg.agent.retry_max_s,
            max_fault_retries=cfg.agent.max_fault_retries,
            max_reconnect_attempts=cfg.agent.max_reconnect_attempts,
            max_consecutive_refusals=cfg.agent.max_consecutive_refusals,
            auto_resume_after_fault=cfg.agent.auto_resume_after_fault,
            schedule=schedule,
            pause_on_dose_report=pause_on_dose_report,
            overlap=cfg.agent.overlap,
            stream_burst_frames=cfg.agent.stream_burst_frames,
            freeze_gc=cfg.agent.freeze_gc,
        )
    except BaseException as exc:
        why = f"the run could not start: {exc}" if str(exc) else f"the run could not start: {type(exc).__name__}"
        if writer is not None:
            try:
                writer.close("fail", why)
            except Exception as close_exc:  # noqa: BLE001 - the original error matters more
                log.error("closing the run log of a failed start failed: %r", close_exc)
        try:
            await asyncio.wait_for(driver.close(), timeout=cfg.safety.watchdog_s)
        except Exception as close_exc:  # noqa: BLE001
            log.error("closing the driver of a failed start failed: %r", close_exc)
        raise
