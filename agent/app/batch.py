"""``stemagent batch INPUTS... --out DIR``: the pipeline over many run logs and acquisition files, on Dask.

Engine: ``dask.distributed``. Without ``--scheduler`` a :class:`~distributed.LocalCluster` of
``--workers`` processes (default: one per core) with one thread each (torch at one thread per
worker) is started and closed here; with ``--scheduler tcp://host:port`` an existing cluster
(SLURM, Kubernetes, ``dask scheduler`` + ``dask worker``) is used as it is. Each worker loads a
model once (:class:`BatchWorkerPlugin`).

Tasks: an input whose stages all work frame by frame (``segment``, ``boundaries``) is split into
chunks of ``--chunk-frames`` frames, one task each (the first chunk's task reports how many frames
the input holds, and the other chunks are submitted then: no task only counts, no file is read
twice for a count);
an input whose stages carry state from frame to frame (``drift``, ``encoding``) is one task, its
frames in order. A task takes a path and returns the tables of its frames; frames are read on the
worker and never travel. Tasks are retried by Dask when a worker dies under them.

Outputs (:mod:`stemagent.batch.outputs`): ``<out>/<input name>/atoms.parquet`` and
``frames.parquet``, written when the input's last task is in, under a temporary name and then
renamed; ``<out>/summary.parquet`` across inputs. An input whose output is complete and valid for
the same request is skipped on a re-run. An input that cannot be read, or whose analysis fails,
is reported with its path and the error; the others go on. A progress bar runs on stderr; the
final report gives inputs done, failed and skipped and frames per second.

Trust: Dask ships tasks and results between its processes with pickle. Run the scheduler and
workers on a network you trust (or with Dask's TLS security); this module sends only paths and
tables of numbers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator


from stemagent.agent.app.batch_worker import (PER_FRAME_STAGES, PLUGIN_NAME, ModelCache, TaskFailure, TaskResult, TaskSpec, analyse,
                                              provenance)
from stemagent.batch.inputs import BatchInput
from stemagent.batch.outputs import FrameRows, concat_rows, fingerprint, is_complete, write_input_outputs, write_summary
from stemagent.errors import InputError, StemAgentError, shown

try:  # the 'batch' extra
    import dask
    from distributed import Client, LocalCluster, as_completed
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError as missing:  # pragma: no cover - the command says what to install
    raise InputError("batch", "dask", f"needs the 'batch' extra (pip install 'stemagent[batch]'): {missing}") from None


class BatchWorkerPlugin(WorkerPlugin):
    """On each worker: torch at ``torch_threads`` threads and a :class:`ModelCache` (models loaded once per worker)."""

    name = PLUGIN_NAME

    def __init__(self, torch_threads: int = 1) -> None:
        self.torch_threads = int(torch_threads)
        self.models = ModelCache(self.torch_threads)

    def setup(self, worker: Any) -> None:
        import torch  # heavy: torch, loaded only in the workers that run models

        torch.set_num_threads(self.torch_threads)
        self.models = ModelCache(self.torch_threads)


@dataclass
class BatchOptions:
    out: Path
    stages: tuple[str, ...] | None = None
    base_config: dict[str, Any] | None = None
    pixel_size_A: float | None = None
    chunk_frames: int = 8
    retries: int = 2
    torch_threads: int = 1


@dataclass
class Outcome:
    """What became of one input."""

    input: BatchInput
    status: str  # done | failed | skipped
    frames: int = 0
    atoms: int = 0
    seconds: float = 0.0
    output: str = ""
    error: str = ""

    def row(self) -> dict[str, Any]:
        return {"input": str(self.input.path), "kind": self.input.kind, "status": self.status, "frames": self.frames,
                "atoms": self.atoms, "seconds": round(self.seconds, 3), "output": self.output, "error": self.error}


@dataclass
class BatchReport:
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed_s: float = 0.0
    dashboard: str = ""
    summary_path: str = ""
    #: time the client spent writing the inputs' tables (Parquet), serially, as results came in
    client_write_s: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def frames(self) -> int:
        return sum(o.frames for o in self.outcomes if o.status == "done")

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": len(self.outcomes), "done": self.count("done"), "failed": self.count("failed"),
                "skipped": self.count("skipped"), "frames": self.frames, "elapsed_s": round(self.elapsed_s, 3),
                "frames_per_s": round(self.frames_per_s, 3), "dashboard": self.dashboard, "summary": self.summary_path,
                "failures": [{"input": str(o.input.path), "error": o.error} for o in self.outcomes if o.status == "failed"]}


def request_of(options: BatchOptions) -> dict[str, Any]:
    """What an output must have been made with to be reused (stages, the files' base config, calibration)."""
    return {"stages": list(options.stages) if options.stages is not None else None, "base_config": options.base_config,
            "pixel_size_A": options.pixel_size_A}


def describe_error(exc: BaseException | str) -> str:
    text = exc if isinstance(exc, str) else str(exc) if isinstance(exc, StemAgentError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:2000]


def check_scheduler_address(address: str) -> str:
    """``address`` as Dask reads it (``tcp://host:port``; ``host:port`` is taken as tcp), or an
    :class:`InputError` naming ``--scheduler`` and the value when it cannot be an address."""
    from distributed.comm.addressing import get_address_host_port, parse_address  # Dask's own parser (the 'batch' extra)

    text = address.strip()
    try:
        scheme, _ = parse_address(text, strict=False)
        if scheme != "inproc":
            _, port = get_address_host_port(text)
            if not 0 < int(port) < 65536:
                raise ValueError(f"port {port} is not between 1 and 65535")
    except (ValueError, TypeError) as exc:
        raise InputError("--scheduler", address, f"is not a Dask scheduler address like tcp://host:8786 ({exc})") from None
    return text


@contextlib.contextmanager
def open_client(scheduler: str | None, workers: int | None, connect_timeout_s: float = 30.0) -> Iterator[Any]:
    """A Dask client: of the cluster at ``scheduler``, or of a LocalCluster of ``workers`` single-threaded processes.

    A malformed ``scheduler`` is an :class:`InputError`; one that does not answer within
    ``connect_timeout_s`` a :class:`StemAgentError`, both naming ``--scheduler`` and the address."""
    if scheduler:
        address = check_scheduler_address(scheduler)
        try:
            client = Client(address, timeout=f"{connect_timeout_s}s")
        except (OSError, TimeoutError) as exc:
            raise StemAgentError(f"--scheduler={shown(scheduler)}: no Dask scheduler answered there within "
                                 f"{connect_timeout_s:g} s ({describe_error(exc)})") from None
        with client:
            yield client
        return
    n = workers or os.cpu_count() or 1
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    logging.getLogger("distributed").setLevel(logging.WARNING)  # the scheduler's INFO lines would bury the report
    # ':0': a free port (another user's cluster on this machine may hold Dask's default 8787)
    # glibc's malloc: Dask's workers get MALLOC_TRIM_THRESHOLD_=65536 by default, and any value there also fixes the
    # mmap threshold at 128 KiB, so each frame-sized array is mmap'ed and faulted in afresh: the U-Net ran at half
    # speed (240 vs 120 ms per 512x512 frame, bench_batch.py). Unset here (None removes it from the workers' environment).
    trim = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    with dask.config.set(trim), LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                             silence_logs=logging.ERROR, env=env) as cluster, Client(cluster) as client:
        yield client


def dashboard_of(client: Any) -> str:
    """The dashboard address when the scheduler runs one with its pages (bokeh installed: the 'batch' extra); '' otherwise."""
    import importlib.util  # optional: probes for the dashboard's bokeh without importing it

    try:
        services = client.scheduler_info().get("services", {})
    except Exception:  # noqa: BLE001 - informational only
        return ""
    has_pages = importlib.util.find_spec("bokeh") is not None  # without it the service answers only health and metrics
    return str(client.dashboard_link) if "dashboard" in services and has_pages else ""


class _Input:
    """The client's bookkeeping of one input being analysed."""

    def __init__(self, inp: BatchInput, spec: TaskSpec, out: Path) -> None:
        self.input = inp
        self.spec = spec
        self.folder = out / inp.output_name
        self.fingerprint = fingerprint(inp.path)
        self.parts: dict[int, TaskResult] = {}
        self.expected: int | None = None
        self.futures: list[Any] = []
        self.failed = False
        self.t0 = time.perf_counter()


def run_batch(client: Any, inputs: list[BatchInput], options: BatchOptions,
              on_progress: Callable[[int, int, int], None] | None = None,
              on_task: Callable[[str, TaskResult], None] | None = None) -> BatchReport:
    """Analyse ``inputs`` on ``client``'s cluster (see the module docstring). ``on_progress(inputs finished,
    inputs to run, frames done)`` is called after each input finishes; ``on_task(task key, result)`` after
    each analysis task (the benchmark's per-task times and sizes)."""
    t0 = time.perf_counter()
    report = BatchReport(dashboard=dashboard_of(client))
    request = request_of(options)
    outcomes: dict[BatchInput, Outcome] = {}
    todo: list[_Input] = []
    for inp in inputs:
        spec = TaskSpec(path=str(inp.path), kind=inp.kind, stages=options.stages, base_config=options.base_config,
                        pixel_size_A=options.pixel_size_A)
        try:
            state = _Input(inp, spec, options.out)
        except OSError as exc:
            outcomes[inp] = Outcome(inp, "failed", error=describe_error(exc))
            continue
        if is_complete(state.folder, state.fingerprint, request):
            outcomes[inp] = Outcome(inp, "skipped", output=str(state.folder))
        else:
            todo.append(state)
    client.register_plugin(BatchWorkerPlugin(options.torch_threads), name=PLUGIN_NAME)
    token = uuid.uuid4().hex[:8]
    chunked = options.stages is not None and set(options.stages) <= PER_FRAME_STAGES
    owner: dict[str, tuple[_Input, int]] = {}
    pending = as_completed()

    def submit(fn: Callable[..., Any], state: _Input, spec: TaskSpec, key: str, order: int = 0) -> None:
        fut = client.submit(fn, spec, key=f"{key}-{state.input.output_name}-{token}", pure=False, retries=options.retries)
        owner[fut.key] = (state, order)
        state.futures.append(fut)
        pending.add(fut)

    for state in todo:
        if chunked:  # the first chunk; its result says how many frames the input holds, and the other chunks follow
            submit(analyse, state, replace(state.spec, start=0, stop=options.chunk_frames), "analyse-0")
        else:
            state.expected = 1
            submit(analyse, state, state.spec, "analyse-0")
    finished = 0
    frames_done = 0
    for fut in pending:
        found = owner.pop(fut.key, None)
        if found is None or found[0].failed:
            continue
        state, order = found
        result = fut.result() if fut.status == "finished" else None
        if fut.status != "finished" or isinstance(result, TaskFailure):
            error: BaseException | str
            if isinstance(result, TaskFailure):
                error = result.error
            else:
                try:
                    error = fut.exception()
                except BaseException as lost:  # noqa: BLE001 - a cancelled or lost task: its reason is the error
                    error = lost
            fut.release()
            state.failed = True
            for other in state.futures:
                if other.key in owner:
                    owner.pop(other.key)
                    other.cancel()
            outcomes[state.input] = Outcome(state.input, "failed", seconds=time.perf_counter() - state.t0,
                                            error=describe_error(error))
            finished += 1
            if on_progress:
                on_progress(finished, len(todo), frames_done)
            continue
        fut.release()
        assert isinstance(result, TaskResult)
        if state.expected is None:  # the first chunk of a chunked input: the others follow
            starts = range(options.chunk_frames, max(result.frames_in_input, 0), options.chunk_frames)
            state.expected = 1 + len(starts)
            for i, start in enumerate(starts, start=1):
                submit(analyse, state, replace(state.spec, start=start, stop=start + options.chunk_frames), f"analyse-{i}", order=i)
        if on_task:
            on_task(str(fut.key), result)
        state.parts[order] = result
        if len(state.parts) < (state.expected or 0):
            continue
        t_write = time.perf_counter()
        outcomes[state.input] = _finish(state, request)
        report.client_write_s += time.perf_counter() - t_write
        frames_done += outcomes[state.input].frames
        finished += 1
        if on_progress:
            on_progress(finished, len(todo), frames_done)
    report.outcomes = [outcomes[inp] for inp in inputs]
    report.elapsed_s = time.perf_counter() - t0
    report.summary_path = str(write_summary(options.out, [o.row() for o in report.outcomes]))
    return report


def _finish(state: _Input, request: dict[str, Any]) -> Outcome:
    """Write the tables of an input whose tasks are all in."""
    results = [state.parts[k] for k in sorted(state.parts)]
    rows: FrameRows = concat_rows([r.rows for r in results])
    try:
        write_input_outputs(state.folder, rows, provenance(results[0], state.fingerprint, request))
    except OSError as exc:
        return Outcome(state.input, "failed", seconds=time.perf_counter() - state.t0, error=describe_error(exc))
    return Outcome(state.input, "done", frames=rows.n_frames, atoms=rows.n_atoms, seconds=time.perf_counter() - state.t0,
                   output=str(state.folder))
