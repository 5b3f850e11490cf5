"""Run configuration: pydantic models with ``extra="forbid"``, loaded from YAML.

A run config has one section per concern. Each driver, segmenter and policy has its own
model, selected by its ``kind`` field (a discriminated union), so a typo in a kind or a field
is an error that names the field and the value. :func:`load_config` turns every problem into a
one-line :class:`~stemagent.errors.ConfigError` naming the file, the field and the value.

Core only describes configurations; building objects from them is done in
``stemagent.agent.app.factory`` (which may import simulators and drivers).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from stemagent.boundaries.config import BoundaryChainConfig, BoundaryTraceConfig
from stemagent.drift.config import DriftConfig
from stemagent.encoding.config import PipelineEncodingConfig, PipelineRVAEConfig
from stemagent.codec import Coordinate, GeometryDoc, Length
from stemagent.errors import ConfigError
from stemagent.policies.manipulation.config import ManipulationConfig
from stemagent.policies.survey_config import SurveyPolicyConfig
from stemagent.types import ScanGeometry


class _Model(BaseModel):
    # no NaN or infinity anywhere in a configuration: every limit and setting is a finite number
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- scan ----------------------------------------------------------------------------------


def square(v: Any) -> Any:
    """A pair written as one number means a square: ``fov_A: 25.6`` is ``fov_A: [25.6, 25.6]``."""
    return (v, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


ScanSide = Annotated[int, Field(ge=8, le=8192)]


class ScanConfig(GeometryDoc):
    """The survey scan the agent starts with (and the default for policies that scan): a
    :class:`~stemagent.codec.GeometryDoc` (the scan geometry's one codec) with defaults. ``fov_A``
    ``(x, y)`` and ``shape_px`` ``(rows, cols)`` may be written as one number for a square."""

    center_A: tuple[Coordinate, Coordinate] = (0.0, 0.0)
    fov_A: tuple[Length, Length] = Field((51.2, 51.2), description="field of view (x, y), Å; one number: a square")
    shape_px: tuple[ScanSide, ScanSide] = Field((256, 256), description="pixels (rows, cols); one number: a square")
    rotation_rad: float = Field(0.0, ge=-4 * math.pi, le=4 * math.pi)
    dwell_s: float = Field(2e-6, gt=0, le=1.0)
    flyback_s: float = Field(0.0, ge=0, le=1.0)

    _square = field_validator("fov_A", "shape_px", mode="before")(square)

    def geometry(self, center_A: tuple[float, float] | None = None) -> ScanGeometry:
        """The scan's geometry, optionally centred elsewhere."""
        g = self.to_geometry()
        return g if center_A is None else dataclasses.replace(g, center_A=(float(center_A[0]), float(center_A[1])))


# --- drivers -------------------------------------------------------------------------------


class MinimalTwinConfig(_Model):
    """The foundation's minimal in-process twin: a hexagonal lattice with Poisson noise."""

    kind: Literal["minimal-twin"] = "minimal-twin"
    lattice_A: float = Field(2.46, gt=0.5, le=20.0, description="lattice constant, Å")
    specimen_size_A: float = Field(400.0, gt=0)
    atom_sigma_A: float = Field(0.45, gt=0.05, le=5.0, description="image width of one atom, Å")
    beam_current_pA: float = Field(20.0, gt=0)
    background: float = Field(0.05, ge=0)
    pace: Literal["realtime", "fast"] = "fast"


class ReplayDriverConfig(_Model):
    """Play back a run log (or, later, a file from other software) as a driver."""

    kind: Literal["replay"] = "replay"
    path: Path
    pace: Literal["recorded", "fast"] = "fast"
    pixel_size_A: float | None = Field(None, gt=0, le=1e4, description="for files without a pixel calibration, Å")
    beam_current_pA: float | None = Field(None, gt=0, le=1e6, description="for files that record no beam current, pA (dose unknown without it)")
    dwell_s: float | None = Field(None, gt=0, le=10.0, description="for files that record no dwell time, s (dose unknown without it)")


class ZmqDriverConfig(_Model):
    """A microscope behind ``stemagent bridge``, reached over ZeroMQ (drivers/PROTOCOL.md)."""

    kind: Literal["zmq"] = "zmq"
    control_endpoint: str = Field("tcp://127.0.0.1:5555", pattern=r"^(tcp|ipc|inproc)://\S+$", description="bridge ROUTER")
    frames_endpoint: str = Field("tcp://127.0.0.1:5556", pattern=r"^(tcp|ipc|inproc)://\S+$", description="bridge PUB")
    request_timeout_s: float = Field(5.0, gt=0, le=600, description="reply deadline beyond a command's own duration, s")
    connect_timeout_s: float = Field(10.0, gt=0, le=600)
    heartbeat_interval_s: float = Field(0.5, gt=0, le=60)
    heartbeat_timeout_s: float = Field(2.0, gt=0, le=600, description="a heartbeat unanswered this long means the bridge is lost")
    reconnect_min_s: float = Field(0.1, gt=0, le=60, description="first reconnect backoff (jittered, doubling)")
    reconnect_max_s: float = Field(5.0, gt=0, le=600)
    frame_queue: int = Field(2, ge=1, le=64, description="frames held for a slow consumer; the oldest is dropped")
    frames_hwm: int = Field(4, ge=1, le=1000, description="ZeroMQ receive high-water mark of the frame socket")
    max_frame_mb: float = Field(256.0, gt=0, le=8192, description="largest frame accepted, MB")


class TwinConfig(_Model):
    """The physical digital twin (stemagent.simulators): specimen, optics, scan/detector physics,
    drift and beam-induced dynamics. Lengths Å, times s, energies keV, angles mrad."""

    kind: Literal["twin"] = "twin"
    specimen: Literal["graphene", "mos2", "ws2", "mose2", "srtio3", "film", "boundary_film"] = "graphene"
    specimen_size_A: float = Field(200.0, gt=1.0, le=5000.0, description="side of the square specimen, Å")
    # specimen composition (each applies to the specimens that have it)
    si_per_nm2: float = Field(0.02, ge=0, le=5, description="graphene: Si dopants per nm²")
    n_si: int | None = Field(None, ge=0, le=10000, description="graphene: exact number of Si (overrides si_per_nm2)")
    vacancy_per_nm2: float = Field(0.01, ge=0, le=5, description="graphene: vacancies per nm²")
    si_layout: Literal["uniform", "clustered"] = Field("uniform", description="graphene: Si scattered uniformly, or in a seeded Thomas cluster process")
    si_n_clusters: int | None = Field(None, ge=1, le=1000, description="graphene, clustered: number of clusters (None: Poisson with si_clusters_per_nm2)")
    si_clusters_per_nm2: float = Field(0.0012, gt=0, le=1, description="graphene, clustered: cluster centres per nm² when si_n_clusters is None")
    si_cluster_sigma_A: float = Field(12.0, gt=0, le=1000, description="graphene, clustered: Gaussian spread of a cluster per axis, Å")
    si_background_fraction: float = Field(0.0, ge=0, le=1, description="graphene, clustered: share of the Si scattered uniformly")
    chalcogen_vacancy_fraction: float = Field(0.02, ge=0, le=1, description="TMD: missing chalcogen atoms")
    substitution_fraction: float = Field(0.03, ge=0, le=1, description="TMD: chalcogens replaced by the substituent")
    substituent: Literal["Se", "S", "Te"] = "Se"
    n_cells: int = Field(8, ge=1, le=100, description="perovskites: thickness in unit cells")
    domain_width_A: float = Field(30.0, gt=1.0, description="film: domain wall spacing, Å")
    displacement_A: float = Field(0.3, ge=0, le=2.0, description="film: B-site polar displacement, Å; boundary_film: A-site displacement along a boundary")
    boundary_chain: BoundaryChainConfig = Field(default_factory=BoundaryChainConfig, description="boundary_film: the 2-motif chain's reduced parameters")
    boundary_tile_cells: int = Field(15, ge=5, le=1000, description="boundary_film: one boundary per tile of this many A sites")
    # optics
    energy_keV: float = Field(60.0, gt=1.0, le=1000.0)
    convergence_mrad: float = Field(30.0, gt=0.1, le=200.0, description="probe semi-angle, mrad")
    C10_A: float = Field(0.0, description="defocus, Å")
    C12_A: float = Field(0.0, description="two-fold astigmatism, Å")
    phi12_rad: float = 0.0
    C30_A: float = Field(0.0, description="spherical aberration, Å")
    C50_A: float = Field(0.0, description="fifth-order spherical aberration, Å")
    source_fwhm_A: float = Field(0.0, ge=0, le=10.0, description="effective source size (Gaussian FWHM), Å")
    # image formation and detector
    adf_detector: Literal["standard-haadf", "power-law"] | tuple[float, float] = Field(
        "power-law",
        description="ADF detector: 'standard-haadf' (80-200 mrad below 70 keV, 70-200 mrad from 70 keV up), "
        "[inner_mrad, outer_mrad] (any ring), both with per-element cross-sections calibrated against the "
        "multislice mode; or 'power-law' (z_exponent and sigma_C_A2 below, the older MAADF-like twin). "
        "Setting z_exponent or sigma_C_A2 without adf_detector selects 'power-law'.")
    z_exponent: float = Field(1.8, gt=0.5, le=2.5, description="ADF contrast ~ Z^n (adf_detector: power-law)")
    sigma_C_A2: float = Field(0.0025, gt=0, le=1.0, description="ADF cross-section of one C atom, Å² (adf_detector: power-law; 60 keV multislice: ~0.003 for 40-200 mrad, ~0.0008 for 80-180 mrad)")
    background: float = Field(0.0, ge=0, le=1.0, description="fraction of the beam reaching the ADF everywhere")
    beam_current_pA: float = Field(20.0, gt=0, le=1e5)
    detector_gain: float = Field(1.0, gt=0)
    detector_offset: float = 0.0
    read_noise: float = Field(0.0, ge=0)
    detector_efficiency: float = Field(1.0, gt=0, le=1.0)
    # scan and drift
    jitter_A: float = Field(0.0, ge=0, le=10.0, description="rms scan-line jitter along the fast axis, Å")
    drift_velocity_A_per_s: tuple[float, float] = (0.0, 0.0)
    drift_wobble_A: float = Field(0.0, ge=0, description="amplitude of the slowly varying drift, Å")
    drift_wobble_period_s: float = Field(60.0, gt=0)
    drift_random_walk_A_per_sqrt_s: float = Field(0.0, ge=0)
    # beam-induced dynamics
    dynamics: bool = True
    si_swap_barn: float = Field(0.1, ge=0, description="Si-C swap cross-section at si_swap_ref_keV, barn")
    si_swap_ref_keV: float = Field(60.0, gt=0)
    c_knock_on_barn: float = Field(1e-5, ge=0, description="C knock-on cross-section at 60 keV, barn")
    chalcogen_sputter_barn: float = Field(0.3, ge=0, description="chalcogen sputtering at 80 keV, barn")
    threshold_width_eV: float = Field(1.0, gt=0, description="thermal width of displacement thresholds, eV")
    swap_rate_model: Literal["physical", "empirical", "random"] = Field(
        "physical", description="Si-C swap rate vs beam offset: the probe-overlap physics, a stylised empirical map, or a random function per seed")
    swap_site_sigma: float = Field(0.0, ge=0, le=2.0, description="site-to-site variation of the swap rate (log-normal sigma)")
    common_random_numbers: bool = Field(
        False, description="draw beam-induced events from per-channel clocks seeded by (seed, sites, firing) instead of the "
        "twin's one stream, so policies compared on the same seed face the same hop and knock-on draws (simulators/dynamics.py)")
    park_sample_interval_s: float = Field(1e-3, gt=0, le=1.0, description="ADF sampling while parked, s")
    max_fov_A: float = Field(512.0, gt=0)
    pace: Literal["realtime", "fast"] = "fast"

    @field_validator("adf_detector")
    @classmethod
    def _ring(cls, v: Any) -> Any:
        if isinstance(v, tuple):
            inner, outer = float(v[0]), float(v[1])
            if not (math.isfinite(inner) and math.isfinite(outer) and 0.0 <= inner < outer <= 1000.0):
                raise ValueError(f"adf_detector={list(v)}: needs [inner_mrad, outer_mrad] with 0 <= inner < outer <= 1000 mrad")
        return v

    @model_validator(mode="after")
    def _legacy_power_law(self) -> "TwinConfig":
        # older configs tune the power law; keep them meaning what they meant
        if "adf_detector" not in self.model_fields_set and {"z_exponent", "sigma_C_A2"} & self.model_fields_set:
            object.__setattr__(self, "adf_detector", "power-law")
        return self


DriverConfig = Annotated[Union[MinimalTwinConfig, ReplayDriverConfig, ZmqDriverConfig, TwinConfig], Field(discriminator="kind")]


# --- pipeline ------------------------------------------------------------------------------


class LoGSegmenterConfig(_Model):
    """Classical atom finder: Laplacian of Gaussian, local maxima, sub-pixel refinement."""

    kind: Literal["log"] = "log"
    sigma_A: float = Field(0.45, gt=0.01, le=10.0, description="expected atom width (Gaussian sigma), Å")
    threshold: float = Field(0.1, ge=0.0, le=1.0, description="minimum LoG response relative to the frame's 99.5th percentile")
    min_separation_A: float = Field(1.0, gt=0.0, description="minimum distance between atoms, Å")
    refine: Literal["none", "centroid", "gaussian"] = "gaussian"


class UNetSegmenterConfig(_Model):
    """U-Net atom finder (``stemagent.segmentation.unet_segmenter``): classes, sub-pixel fit, uncertainty."""

    kind: Literal["unet"] = "unet"
    weights: Path | None = Field(None, description="state dict (.pt) with its .json model card; None = the shipped weights")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': CUDA when available, else CPU")
    threshold: float = Field(0.3, gt=0.0, lt=1.0, description="minimum atom probability of a peak")
    min_separation_A: float = Field(0.6, gt=0.0, description="non-maximum suppression radius, Å")
    refine: bool = Field(True, description="Poisson ML Gaussian fit on the raw frame")
    refine_pixel_A: float = Field(0.2, gt=0.0, description="frames finer than this are binned for the fit, Å/px")
    probe_sigma_A: float = Field(0.35, gt=0.01, le=5.0, description="starting Gaussian width of a column image, Å")
    specimen: Literal["graphene", "tmd", "perovskite", "auto"] = Field(
        "auto", description="specimen prior: classes restricted to the specimen's; 'auto' chooses per frame and logs what it chose")
    ood_fallback: Literal["warn", "log"] = Field(
        "warn", description="a frame unlike the trained specimens: 'warn' logs it, 'log' also takes the LoG finder's atoms")
    min_evidence_nats: float = Field(5.3, ge=0.0, le=100.0, description="least log-likelihood ratio against the host class for a defect label")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    channels_last: bool = Field(True, description="run the network in channels-last layout (oneDNN's fast CPU path, ~1.8x here); false: the contiguous NCHW layout")


SegmenterConfig = Annotated[Union[LoGSegmenterConfig, UNetSegmenterConfig], Field(discriminator="kind")]


class StageOptions(_Model):
    """How the agent runs one pipeline stage (``pipeline.stages.<name>``)."""

    enabled: bool = Field(True, description="off: the stage is left out of the pipeline")
    on_error: Literal["skip", "stop"] = Field(
        "skip", description="a stage that raises: 'skip' logs it and goes on without its output for that frame; 'stop' ends the run")


class PipelineConfig(_Model):
    """The analysis stages (``segment -> [drift] -> [boundaries] -> [encoding] -> [rvae] -> policy``; drift and encoding join as they
    land) and how each runs (``stages.<name>``: ``enabled``, ``on_error``)."""

    segmenter: SegmenterConfig = Field(default_factory=LoGSegmenterConfig)
    boundaries: BoundaryTraceConfig | None = Field(None, description="domain-boundary traces of every frame (None: no such stage)")
    drift: DriftConfig | None = Field(None, description="drift stage after segment: atoms to the sample frame, commands to "
                                      "beam coordinates at their execution time (None: no such stage; the twin configs set it; "
                                      "'stages: {drift: {enabled: false}}' turns it off)")
    stages: dict[str, StageOptions] = Field(default_factory=dict, description="per stage name: enabled, on_error")
    encoding: PipelineEncodingConfig | None = Field(None, description="motif labels of every atom (Zernike features, motif "
                                                                      "library, motif-cells; None: no such stage)")
    rvae: PipelineRVAEConfig | None = Field(None, description="per-atom rVAE latents (angle, shift, content z) after encoding, "
                                                              "in the observation and the log's latents stream (None: no such stage)")


# --- policy --------------------------------------------------------------------------------


class RasterPolicyConfig(_Model):
    """Visit a grid of fields of view across the allowed area, one after another."""

    kind: Literal["raster"] = "raster"
    overlap: float = Field(0.1, ge=0.0, lt=0.9, description="fractional overlap of neighbouring fields")


class RandomPolicyConfig(_Model):
    """Scan fields of view at uniformly random centres within the allowed area (seeded)."""

    kind: Literal["random"] = "random"


PolicyConfig = Annotated[Union[RasterPolicyConfig, RandomPolicyConfig, ManipulationConfig, SurveyPolicyConfig], Field(discriminator="kind")]


# --- safety --------------------------------------------------------------------------------


class SafetyConfig(_Model):
    """Hard limits enforced by the agent's safety gate on every command (``agent/safety.py``).

    Dose follows the model of :mod:`stemagent.dose`: the probe is a Gaussian of ``probe_fwhm_A``
    (the device's own, if it reports a narrower one), and the dose map keeps, on cells of
    ``dose_cell_A``, an upper bound of the dose any point has received."""

    area_center_A: tuple[float, float] = (0.0, 0.0)
    area_half_width_A: float = Field(150.0, gt=0, description="beam positions must stay within this square, Å")
    max_fov_A: float = Field(256.0, gt=0)
    max_shape_px: int = Field(2048, ge=8)
    min_dwell_s: float = Field(1e-7, gt=0)
    max_dwell_s: float = Field(1e-3, gt=0, description="per-pixel dwell limit for scans, s")
    max_park_s: float = Field(10.0, gt=0, description="longest single park, s")
    dose_budget_e_per_A2: float = Field(1e9, gt=0, description="most dose any one place may receive in the run, e/Å²")
    dose_cell_A: float = Field(1.0, gt=0, le=100.0, description="cell of the dose map, Å (coarser for very large areas)")
    probe_fwhm_A: float = Field(0.8, gt=0, le=50.0, description="full width at half maximum of the probe's intensity, Å")
    flyback_blanked: bool = Field(False, description="the instrument blanks the beam during line flyback")
    dose_tolerance: float = Field(0.1, ge=0, le=10.0, description="a frame or park may report this fraction more dose than predicted before the run pauses")
    max_commands_per_s: float = Field(50.0, gt=0)
    watchdog_s: float = Field(30.0, gt=0, description="blank and pause if no frame or reply arrives for this long")

    @model_validator(mode="after")
    def _dwell_order(self) -> "SafetyConfig":
        if self.min_dwell_s > self.max_dwell_s:
            raise ValueError(f"min_dwell_s={self.min_dwell_s} exceeds max_dwell_s={self.max_dwell_s}")
        return self


# --- log and telemetry ---------------------------------------------------------------------


class LogConfig(_Model):
    directory: Path = Path("runs")
    fsync: bool = Field(True, description="fsync the document file after every frame (crash safety)")


class TelemetryConfig(_Model):
    """MQTT telemetry and control. With no ``host`` the agent runs with telemetry off."""

    host: str | None = None
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = Field(None, description="never printed or logged: shown as '**********'")
    tls: bool = False
    tls_ca_file: Path | None = None
    topic_prefix: str = Field("stemagent", max_length=200, description="topics are <prefix>/<run name>/<run id>/<kind>")

    @field_validator("topic_prefix")
    @classmethod
    def _topic_levels(cls, v: str) -> str:
        if not re.fullmatch(r"[^/+#\x00\s]+(/[^/+#\x00\s]+)*", v):
            raise ValueError("must be MQTT topic levels joined by '/', with no wildcard ('+', '#'), no empty level and no spaces")
        return v


# --- agent ---------------------------------------------------------------------------------


class AgentConfig(_Model):
    """How the agent behaves around faults and refusals, and whether it overlaps acquisition with analysis."""

    retry_s: float = Field(0.5, gt=0, le=60.0, description="the first wait before trying a lost device again, s (it grows "
                                                        "by retry_backoff with every further attempt)")
    retry_backoff: float = Field(2.0, ge=1.0, le=10.0, description="each wait between reconnect attempts is this many "
                                                                 "times the one before")
    retry_max_s: float = Field(30.0, gt=0, le=3600.0, description="the longest wait between reconnect attempts, s")
    max_fault_retries: int = Field(3, ge=0, le=1000, description="recoveries after a fault with no command completed since "
                                                                "the last one (a park that always faults); the next fault "
                                                                "ends the run as failed")
    max_reconnect_attempts: int = Field(20, ge=1, le=100_000, description="reconnect attempts in a row a lost device gets "
                                                                        "before the run ends as failed")
    auto_resume_after_fault: bool = Field(True, description="resume by itself when a lost device answers again")
    max_consecutive_refusals: int = Field(20, ge=1, description="stop after this many commands in a row refused")
    overlap: bool = Field(False, description="when the policy asks for the field it just scanned, stream it: frame n+1 is "
                                             "acquired while frame n is analysed (the newest frame wins; drops are logged)")
    stream_burst_frames: int = Field(4, ge=1, le=64, description="frames per stream request; each burst passes the safety "
                                                                 "gate before it starts and the beam is blanked after it")
    freeze_gc: bool = Field(True, description="at the start of a run, collect once and move every object alive then (models, "
                                              "weights, buffers) out of Python's cyclic collector (gc.freeze), so its full "
                                              "collections during the run scan only what the run creates: they stalled one "
                                              "frame in ~15 by ~200 ms with every stage on; undone when the run ends")


# --- run -----------------------------------------------------------------------------------


class RunConfig(_Model):
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    seed: int = Field(0, ge=0)
    max_frames: int = Field(10, ge=1, description="stop after this many frames")
    driver: DriverConfig = Field(default_factory=MinimalTwinConfig)
    scan: ScanConfig = Field(default_factory=ScanConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    policy: PolicyConfig = Field(default_factory=RasterPolicyConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)


def _describe(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            # pydantic puts the discriminator's tag value in the location of union members
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _lookup(data: Any, loc: tuple[Any, ...]) -> Any:
    cur = data
    for p in loc:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and p < len(cur):
            cur = cur[p]
        else:
            continue  # a union tag in the location: skip it
    return cur


M = TypeVar("M", bound=BaseModel)

#: field names whose values are never shown in an error message
SECRET_FIELDS = frozenset({"password", "secret", "token"})


def validate_model(model: type[M], data: Any, source: str = "<dict>") -> M:
    """Validate a mapping as ``model``; the first problem becomes a one-line :class:`ConfigError`
    naming ``source``, the field (as written in the file) and the value."""
    if not isinstance(data, dict):
        raise ConfigError(source, "<top level>", type(data).__name__, "must be a mapping of sections")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err.get("loc", ()))
        # drop union tags pydantic inserts (they are not keys in the file)
        clean = tuple(p for i, p in enumerate(loc) if not _is_tag(data, loc[:i], p))
        value = err.get("input", _lookup(data, loc))
        kind = err.get("type")
        if kind == "extra_forbidden":
            problem = "is not a known field"
        elif kind == "missing":
            value = "<missing>"
            problem = "is required"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            clean = clean + ("kind",)
            value = value.get("kind", "<missing>") if isinstance(value, dict) else value
            expected = (err.get("ctx") or {}).get("expected_tags") or _union_tags(model, clean)
            problem = f"is not a known kind (expected one of {expected})"
        else:
            problem = str(err.get("msg", "is invalid")).removeprefix("Value error, ")
        if any(str(p).lower() in SECRET_FIELDS for p in clean):
            value = "<redacted>"  # a secret is never printed, even when it is wrong
        raise ConfigError(source, _describe(clean) or "<top level>", value, problem) from None


def config_from_dict(data: Any, source: str = "<dict>") -> RunConfig:
    """Validate a mapping as a :class:`RunConfig`; the first problem becomes a :class:`ConfigError`."""
    return validate_model(RunConfig, data, source)


def _union_tags(root: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """The kinds a union section accepts, read off the models (for the error message)."""
    model: Any = root
    ann: Any = None
    for p in loc:
        fields = getattr(model, "model_fields", {})
        if str(p) not in fields:
            break
        ann = fields[str(p)].annotation
        model = ann
    kinds: list[str] = []

    def walk(t: Any) -> None:
        if isinstance(t, type) and issubclass(t, BaseModel):
            f = t.model_fields.get("kind")
            if f is not None and isinstance(f.default, str):
                kinds.append(repr(f.default))
            return
        for arg in get_args(t):
            walk(arg)

    walk(ann)
    return ", ".join(kinds) or "?"


def _is_tag(data: Any, parent_loc: tuple[Any, ...], p: Any) -> bool:
    cur = data
    for q in parent_loc:
        if isinstance(cur, dict) and q in cur:
            cur = cur[q]
    return isinstance(cur, dict) and isinstance(p, str) and p not in cur and cur.get("kind") == p


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML of ``path`` (an empty file is ``{}``); failures are one-line :class:`ConfigError`s."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), "<file>", str(p), f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(str(p), f"line {line}", exc.object[exc.start : exc.start + 4], "is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "<yaml>"
        raise ConfigError(str(p), where, getattr(exc, "problem", None) or "", "is not valid YAML") from None
    return {} if data is None else data


def load_model(path: str | Path, model: type[M]) -> M:
    """Read a YAML file and validate it as ``model`` (any of the project's config models)."""
    return validate_model(model, read_yaml(path), source=str(path))


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config; every failure is a one-line :class:`ConfigError`."""
    return load_model(path, RunConfig)
