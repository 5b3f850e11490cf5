"""``stemagent batch``: the command line of the batch engine (:mod:`stemagent.agent.app.batch`,
imported when the command runs: Dask is the optional 'batch' extra and slow to import)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from stemagent.agent.app.cli_support import EXIT_FAILED, console, err_console, fail, one_line_errors
from stemagent.config import load_config
from stemagent.errors import InputError

#: stage names ``--stages`` may list
KNOWN_STAGES = ("segment", "drift", "boundaries", "encoding")


def parse_stages(text: str | None) -> tuple[str, ...] | None:
    if text is None or not text.strip():
        return None
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    for name in names:
        if name not in KNOWN_STAGES:
            raise InputError("--stages", name, f"is not a stage (one of {','.join(KNOWN_STAGES)})")
    if "segment" not in names:
        raise InputError("--stages", text, "must include 'segment' (every other stage works on its atoms)")
    return names


def show_report(report: Any) -> None:
    table = Table(title="batch", show_header=True)
    for col in ("input", "status", "frames", "atoms", "seconds", "error"):
        table.add_column(col)
    for o in report.outcomes:
        table.add_row(str(o.input.path), o.status, str(o.frames), str(o.atoms), f"{o.seconds:.1f}", o.error[:200])
    console.print(table)
    d = report.to_dict()
    console.print(f"done {d['done']}, failed {d['failed']}, skipped {d['skipped']} of {d['inputs']} inputs; "
                  f"{d['frames']} frames in {d['elapsed_s']:.1f} s ({d['frames_per_s']:.2f} frames/s); summary {d['summary']}")


@one_line_errors
def batch(
    inputs: list[str] = typer.Argument(..., help="run logs, acquisition files, folders of them, or globs"),
    out: Path = typer.Option(..., "--out", help="folder of the results (one folder per input, summary.parquet)"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="address of a running Dask scheduler (tcp://host:port); "
                                                                       "default: a local cluster"),
    workers: Optional[int] = typer.Option(None, "--workers", help="local cluster: worker processes (default: one per core)"),
    stages: Optional[str] = typer.Option(None, "--stages", help="comma-separated stages to run (segment,drift,boundaries,"
                                                                 "encoding); default: each input's own pipeline"),
    config: Optional[Path] = typer.Option(None, "--config", help="run configuration whose pipeline analyses acquisition "
                                                                  "files (run logs use their own)"),
    pixel_size_A: Optional[float] = typer.Option(None, "--pixel-size-A", help="pixel size (Å) for files without calibration"),
    chunk_frames: int = typer.Option(8, "--chunk-frames", help="frames per task when the stages work frame by frame"),
    torch_threads: int = typer.Option(1, "--torch-threads", help="torch threads per worker (the replay's count gives its "
                                                                  "atoms bit for bit)"),
    json_out: bool = typer.Option(False, "--json", help="print the final report as JSON"),
) -> None:
    """Analyse many run logs and acquisition files with the pipeline on a Dask cluster; Parquet out.

    Each input's atoms (frame, x_A, y_A, class, confidence, uncertainty_A) and per-frame results go
    to OUT/<input>/{atoms,frames}.parquet with provenance (stemagent version, weights sha256,
    config) in the Parquet metadata; OUT/summary.parquet lists every input. Inputs whose results
    are complete are skipped; an input that fails is reported and the others go on (exit 1 at the
    end when any failed)."""
    if workers is not None and not 1 <= workers <= 1024:
        raise InputError("--workers", workers, "must be between 1 and 1024")
    if workers is not None and scheduler:
        raise InputError("--workers", workers, "applies to the local cluster (not with --scheduler)")
    if not 1 <= chunk_frames <= 100000:
        raise InputError("--chunk-frames", chunk_frames, "must be between 1 and 100000")
    if pixel_size_A is not None and not (0 < pixel_size_A < 1e4):
        raise InputError("--pixel-size-A", pixel_size_A, "must be a positive length in Å")
    if not 1 <= torch_threads <= 256:
        raise InputError("--torch-threads", torch_threads, "must be between 1 and 256")
    if out.exists() and not out.is_dir():
        raise InputError("--out", str(out), "is a file; the results go to a folder")
    names = parse_stages(stages)
    base_config = load_config(config).model_dump(mode="json") if config is not None else None
    from stemagent.agent.app.batch import BatchOptions, check_scheduler_address, dashboard_of, open_client, run_batch  # Dask: imported when asked for
    from stemagent.batch.inputs import discover  # the batch engine and its Dask are imported only when the command runs
    from stemagent.drivers.files import ACQUISITION_SUFFIXES  # the file readers (rosettasciio) only when the command runs

    options = BatchOptions(out=out, stages=names, pixel_size_A=pixel_size_A, chunk_frames=chunk_frames,
                           torch_threads=torch_threads, base_config=base_config)
    if scheduler:
        check_scheduler_address(scheduler)  # a malformed address fails before any folder is searched
    found = discover(inputs, ACQUISITION_SUFFIXES)
    if not found:
        raise InputError("INPUTS", " ".join(inputs), "hold no run log or acquisition file")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} inputs"),
                        TimeElapsedColumn(), console=err_console, transient=json_out)
    with open_client(scheduler, workers) as client:
        link = dashboard_of(client)
        if link:
            err_console.print(f"Dask dashboard: {link}")
        with progress:
            bar = progress.add_task("batch", total=len(found))

            def on_progress(done: int, total: int, frames: int) -> None:
                progress.update(bar, total=total, completed=done, description=f"batch: {frames} frames")

            report = run_batch(client, found, options, on_progress)
    if json_out:
        print(json.dumps(report.to_dict()))
    else:
        show_report(report)
    if report.count("failed"):
        first = next(o for o in report.outcomes if o.status == "failed")
        fail(f"batch: {report.count('failed')} of {len(report.outcomes)} inputs failed; first: {first.input.path}: {first.error}",
             EXIT_FAILED)
