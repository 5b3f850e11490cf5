"""What a batch worker does: analyse the frames of one input (or a chunk of them) with the pipeline.

The configuration of an input is the one ``stemagent replay`` uses (a run log's own, from
:func:`~stemagent.agent.app.replay_log.replay_config`; a file's from
:func:`~stemagent.agent.app.replay_files.file_replay_config`), and its stages are built by the
factory's builders, less the policy: nothing decides and nothing reaches a beam. Frames go
through :meth:`~stemagent.pipeline.Pipeline.run` in order, as the agent's replay sends them, so
the atoms are those of the single-process replay, bit for bit. A frame whose chunk cannot be
read is recorded with the error and skipped (the replay skips it too).

Models are loaded once per worker: :class:`~stemagent.agent.app.batch.BatchWorkerPlugin` (a Dask worker plugin) holds
a :class:`ModelCache` on each worker and sets torch's threads there; outside a worker a cache of
this process is used (``agent/app/batch.py`` registers the plugin). Tasks take paths and return tables (:class:`~stemagent.batch.outputs.FrameRows`):
no frame travels between processes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import stemagent
from stemagent.agent.app.factory import build_drift_stage, build_encoding, build_segmenter, stage_names
from stemagent.agent.app.replay_files import file_replay_config
from stemagent.agent.app.replay_log import replay_config
from stemagent.batch.outputs import FrameRows, concat_rows, sha256_file
from stemagent.boundaries.trace import BoundaryStage
from stemagent.config import RunConfig, config_from_dict
from stemagent.drivers.files import FileDriver
from stemagent.errors import InputError
from stemagent.pipeline import BoundaryTraceStage, Pipeline, SegmentStage, Stage
from stemagent.runlog import RunLog
from stemagent.runlog.writer import jsonable
from stemagent.segmentation.classical import check_image
from stemagent.stages import Observation, Segmenter, no_atoms
from stemagent.types import Frame

#: stages whose result on a frame depends on that frame alone: their inputs may be split into chunks of frames
PER_FRAME_STAGES = frozenset({"segment", "boundaries"})
PLUGIN_NAME = "stemagent-batch-models"


@dataclass(frozen=True)
class TaskSpec:
    """One task: frames ``[start, stop)`` of the input at ``path`` (``stop`` None: to the end).

    ``stages``: the stages to run (None: the input's own pipeline less the policy); ``base_config``:
    the run configuration (as a dict) a file is analysed with (None: the defaults)."""

    path: str
    kind: str
    stages: tuple[str, ...] | None = None
    base_config: dict[str, Any] | None = None
    pixel_size_A: float | None = None
    start: int = 0
    stop: int | None = None


@dataclass
class TaskResult:
    rows: FrameRows
    config: dict[str, Any]
    stages: list[str]
    weights_sha256: str | None
    frames_in_input: int
    seconds: float
    worker_pid: int = field(default_factory=os.getpid)
    spec: TaskSpec | None = None


class ModelCache:
    """Segmenters by configuration, built once per process (the U-Net's weights are read once)."""

    def __init__(self, torch_threads: int | None = None) -> None:
        self.torch_threads = torch_threads
        self._segmenters: dict[str, Segmenter] = {}
        self._sha: dict[str, str] = {}
        self.loads = 0

    def segmenter(self, cfg: RunConfig) -> Segmenter:
        """The segmenter of ``cfg`` (built on first use). With ``torch_threads`` set, torch keeps that
        many threads whatever the configuration's ``num_threads`` says (a worker is one core's)."""
        key = cfg.pipeline.segmenter.model_dump_json()
        if key not in self._segmenters:
            self._segmenters[key] = build_segmenter(cfg)
            self.loads += 1
            if self.torch_threads is not None:
                import torch  # heavy: torch, loaded only in the workers that run models

                torch.set_num_threads(self.torch_threads)
        return self._segmenters[key]

    def weights_sha256(self, segmenter: Segmenter) -> str | None:
        path = getattr(segmenter, "weights", None)
        if path is None:
            return None
        key = str(path)
        if key not in self._sha:
            self._sha[key] = sha256_file(path)
        return self._sha[key]


_LOCAL = ModelCache()


def models_here() -> ModelCache:
    """The model cache of this worker (its plugin's), or of this process outside a Dask worker."""
    try:
        from distributed import get_worker  # optional: the 'batch' extra

        plugin = get_worker().plugins.get(PLUGIN_NAME)
    except (ImportError, ValueError):
        return _LOCAL
    models = getattr(plugin, "models", None)
    return models if isinstance(models, ModelCache) else _LOCAL


# --- frames of an input -------------------------------------------------------------------


class _LogFrames:
    """The frames of a run log in the order logged (as the replay driver plays them)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.log = RunLog.open(path)
        self.data = self.log.event_data("frames")

    def __len__(self) -> int:
        return len(self.data)

    def index(self, i: int) -> int:
        return int(self.data[i]["frame_index"])

    def frame(self, i: int) -> Frame:
        d = self.data[i]
        frame = self.log.frame_from_data(d)
        frame.meta = {**frame.meta, "replayed_from": int(d.get("log_index", i))}
        return frame

    def config(self, spec: TaskSpec) -> RunConfig:
        return replay_config(self.log, self.path, "fast")


class _FileFrames:
    """The images of an acquisition file as frames, each scan starting where the previous ended (as the file driver plays them)."""

    def __init__(self, path: Path, pixel_size_A: float | None) -> None:
        self.path = path
        self.driver = FileDriver(path, pixel_size_A=pixel_size_A)
        times = [a.geometry(self.driver.default_dwell_s).frame_time_s for a in self.driver.acquisitions]
        self.starts_s = np.concatenate([[0.0], np.cumsum(times)[:-1]]).tolist() if times else []

    def __len__(self) -> int:
        return self.driver.n_frames

    def index(self, i: int) -> int:
        return i

    def frame(self, i: int) -> Frame:
        return self.driver.frame(i, start_s=float(self.starts_s[i]))

    def config(self, spec: TaskSpec) -> RunConfig:
        base = config_from_dict(spec.base_config, source="--config") if spec.base_config is not None else None
        return file_replay_config(self.path, base=base, pixel_size_A=spec.pixel_size_A, acquisitions=self.driver.acquisitions)


def open_frames(spec: TaskSpec) -> _LogFrames | _FileFrames:
    path = Path(spec.path)
    return _LogFrames(path) if spec.kind == "runlog" else _FileFrames(path, spec.pixel_size_A)


# --- the pipeline -------------------------------------------------------------------------


def analysis_stages(cfg: RunConfig, stages: tuple[str, ...] | None) -> list[str]:
    """The stages to run on an input of configuration ``cfg`` (its own less the policy, or ``stages``);
    an :class:`InputError` naming ``--stages`` when one is not a stage of this input's pipeline."""
    own = [n for n in stage_names(cfg) if n != "policy"]
    if stages is None:
        return own
    for name in stages:
        if name not in own:
            raise InputError("--stages", name, f"is not a stage of this input's pipeline (its stages: {','.join(own)})")
    if "segment" not in stages:
        raise InputError("--stages", ",".join(stages), "must include 'segment' (every other stage works on its atoms)")
    return [n for n in own if n in stages]


def batch_pipeline(cfg: RunConfig, names: list[str], models: ModelCache) -> Pipeline:
    """The stages ``names`` of ``cfg``'s pipeline, built by the factory (the segmenter from ``models``)."""
    built: list[Stage] = [SegmentStage(models.segmenter(cfg))]
    if "drift" in names:
        assert cfg.pipeline.drift is not None
        built.append(build_drift_stage(cfg.pipeline.drift))
    if "boundaries" in names:
        assert cfg.pipeline.boundaries is not None
        built.append(BoundaryTraceStage(BoundaryStage(cfg.pipeline.boundaries)))
    if "encoding" in names:
        built.append(build_encoding(cfg))
    options = {k: v for k, v in cfg.pipeline.stages.items() if k in names}
    return Pipeline(built, options)


def frame_rows(frame_index: int, obs: Observation | None, error: str, class_names: tuple[str, ...]) -> FrameRows:
    """The rows of one frame: its atoms (none when ``obs`` is None) and its per-frame row."""
    rows = FrameRows(class_names=class_names)
    if obs is None:
        rows.frames = {"frame": [frame_index], "time_s": [None], "n_atoms": [0], "error": [error], "records": ["{}"],
                       "timings_ms": ["{}"]}
        return rows
    a = obs.atoms
    n = len(a)
    rows.class_names = tuple(a.class_names) if n else class_names
    rows.atoms = {
        "frame": np.full(n, frame_index, dtype=np.int64),
        "x_A": a.positions_A[:, 0].copy(),
        "y_A": a.positions_A[:, 1].copy(),
        "class": a.classes.copy(),
        "confidence": a.confidence.copy(),
        "uncertainty_A": a.uncertainty_A.copy() if a.uncertainty_A is not None else np.full(n, np.nan),
    }
    for k, v in obs.atom_features.items():
        arr = np.asarray(v)
        if arr.ndim == 1 and len(arr) == n and arr.dtype.kind in "biuf":
            rows.atoms[f"feature_{k}"] = arr.astype(np.float64) if arr.dtype.kind == "f" else arr.astype(np.int64)
    errors = "; ".join(f"{k}: {v}" for k, v in obs.errors.items())
    rows.frames = {"frame": [frame_index], "time_s": [float(obs.time_s)], "n_atoms": [n], "error": [errors],
                   "records": [json.dumps(jsonable(obs.records), sort_keys=True)],
                   "timings_ms": [json.dumps({k: round(v, 3) for k, v in obs.timings_ms.items()})]}
    return rows


def run_frames(pipeline: Pipeline, frames: _LogFrames | _FileFrames, start: int, stop: int,
               class_names: tuple[str, ...]) -> FrameRows:
    """Frames ``[start, stop)`` of ``frames`` through ``pipeline`` in order."""
    parts = []
    for i in range(start, stop):
        index = frames.index(i)
        try:
            frame = frames.frame(i)
            check_image(frame.image)
        except InputError as exc:
            parts.append(frame_rows(index, None, str(exc), class_names))
            continue
        obs = Observation(frame_index=frame.index, time_s=frame.end_time_s, geometry=frame.geometry,
                          atoms=no_atoms(frame.index), frame=frame)
        parts.append(frame_rows(index, pipeline.run(obs), "", class_names))
    return concat_rows(parts) if parts else FrameRows(class_names=class_names)


# --- tasks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskFailure:
    """A task's input cannot be used (an :class:`InputError`: a corrupt file, a stage it lacks).

    Returned, not raised: the same input fails the same way on every try, so Dask must not retry
    it (its ``retries`` are for errors that may pass, such as a file system that hiccups)."""

    error: str


def analyse(spec: TaskSpec, models: ModelCache | None = None) -> TaskResult | TaskFailure:
    """Frames ``[spec.start, spec.stop)`` of one input through its pipeline (a task); a :class:`TaskFailure`
    when the input cannot be used."""
    try:
        return _analyse(spec, models)
    except InputError as exc:
        return TaskFailure(str(exc))


def _analyse(spec: TaskSpec, models: ModelCache | None) -> TaskResult:
    t0 = time.perf_counter()
    models = models or models_here()
    frames = open_frames(spec)
    cfg = frames.config(spec)
    names = analysis_stages(cfg, spec.stages)
    pipeline = batch_pipeline(cfg, names, models)
    segmenter = pipeline.stage("segment").segmenter
    class_names = tuple(getattr(segmenter, "class_names", ("atom",)))
    stop = len(frames) if spec.stop is None else min(spec.stop, len(frames))
    try:
        rows = run_frames(pipeline, frames, spec.start, stop, class_names)
    finally:
        pipeline.close()
    return TaskResult(rows=rows, config=cfg.model_dump(mode="json"), stages=pipeline.names,
                      weights_sha256=models.weights_sha256(segmenter), frames_in_input=len(frames),
                      seconds=time.perf_counter() - t0, spec=spec)


def provenance(result: TaskResult, input_fingerprint: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """What the tables of an input record about how they were made."""
    return {"stemagent_version": stemagent.__version__, "weights_sha256": result.weights_sha256, "config": result.config,
            "stages": result.stages, "input": input_fingerprint, "request": request}
