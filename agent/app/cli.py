"""The ``stemagent`` command line.

Every command ends an error in one line on stderr naming what, where and the value; exit code 2
for bad input, 1 for a failed run, 128 + n when signal n (SIGINT, SIGTERM) stopped it; ``-v``
adds the traceback (``agent/app/cli_support.py``). ``run`` and ``replay`` treat SIGINT and SIGTERM
as a stop (a second one aborts): the beam is blanked, the log closed with the true exit status
and reason, and the summary printed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from stemagent.agent.app.cli_batch import batch
from stemagent.agent.app.cli_boundaries import analyze_boundaries
from stemagent.agent.app.cli_latents import analyze_latents
from stemagent.agent.app.cli_simulate import simulate
from stemagent.agent.app.cli_view import VIEW_DEFAULT, open_live_view, view
from stemagent.agent.app.console import StatusLine, Tee, announce
from stemagent.agent.app.cli_support import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    console,
    err_console,
    fail,
    ignore_late_signals,
    one_line_errors,
    run_with_signals,
    set_verbose,
    signal_exit_code,
)
from stemagent.agent.app.factory import build_agent, check_stage_options, new_run_dir, new_run_id
from stemagent.agent.app.replay_files import FileReplaySummary, file_dose, replay_file
from stemagent.agent.app.report import write_report
from stemagent.agent.app.heap import keep_freed_memory
from stemagent.agent.app.replay_log import compare_atoms as compare_by_identity
from stemagent.agent.app.replay_log import compare_drift, logged_controls, replay_config, unreadable_frames, verify_run_log
from stemagent.agent.app.telemetry_factory import open_telemetry
from stemagent.agent.app.transport_cli import bridge
from stemagent.agent.safety import preflight
from stemagent.config import RunConfig, config_from_dict, load_config
from stemagent.drivers.files import is_acquisition_file
from stemagent.errors import InputError
from stemagent.runlog import RunLog
from stemagent.simulators.scoring import score_run

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="stemagent: an autonomous STEM agent.")

__all__ = ["app", "compare_atoms", "fail", "print_summary", "run_with_signals"]

PACES = ("fast", "recorded")


def print_summary(summary: Any, title: str) -> None:
    table = Table(title=title, show_header=False)
    for k, v in summary.to_dict().items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)


def exit_code(summary: Any, signal_name: str | None) -> int:
    if signal_name:
        return signal_exit_code(signal_name)
    return 0 if summary.exit_status == "success" else EXIT_FAILED


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log at INFO level; tracebacks with errors")) -> None:
    set_verbose(verbose)
    keep_freed_memory()  # the frame path's large arrays reused, not faulted in afresh per frame
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _refuse_if_gate_would(cfg: RunConfig, source: Path) -> str:
    """Stage options that name no stage are bad input; so is the initial scan the gate would refuse
    (exit 2). Returns the gate's note."""
    check_stage_options(cfg, str(source))
    verdict, note = preflight(cfg)
    if not verdict.allowed:
        fail(f"{source}: scan: the safety gate refuses the initial scan ({verdict.rule}): {verdict.detail}", EXIT_BAD_INPUT)
    return note


@app.command()
@one_line_errors
def validate(config: Path = typer.Argument(..., help="a run configuration (YAML)")) -> None:
    """Check a run configuration, print it with every default filled in (secrets masked), and run
    its initial scan through the safety gate."""
    cfg = load_config(config)
    console.print_json(json.dumps(cfg.model_dump(mode="json")))
    note = _refuse_if_gate_would(cfg, config)
    console.print(f"the safety gate accepts the initial scan{f' ({note})' if note else ''}", highlight=False)


@app.command()
@one_line_errors
def run(
    config: Path = typer.Option(..., "--config", "-c", help="a run configuration (YAML)"),
    max_frames: Optional[int] = typer.Option(None, help="override max_frames"),
    log_dir: Optional[Path] = typer.Option(None, help="write the run log under this folder"),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    with_report: bool = typer.Option(True, "--report/--no-report", help="write the run report (report.md, report.html, "
                                                                         "figures) into the run log's folder at the end"),
    view_on: bool = typer.Option(False, "--view", help=f"serve the live page with pause/stop on {VIEW_DEFAULT} (this machine only)"),
    view_at: Optional[str] = typer.Option(None, "--view-at", metavar="HOST:PORT", help="serve the live page there (implies --view)"),
) -> None:
    """Run the closed loop described by CONFIG and write a run log.

    At start it prints where the log and the telemetry go; while it runs, a status line (frame,
    state, dose, last decision, latency); on every way out, the summary."""
    cfg = load_config(config)
    if max_frames is not None:
        cfg = config_from_dict({**cfg.model_dump(), "max_frames": max_frames}, source="--max-frames")  # secrets stay SecretStr
    _refuse_if_gate_would(cfg, config)
    run_id = new_run_id()
    status = StatusLine(err_console)
    ran: dict[str, Any] = {}  # the summary once there is one: printed whatever happens after

    async def go() -> Any:
        async with open_telemetry(cfg, run_id) as telemetry, open_live_view(view_at or (VIEW_DEFAULT if view_on else None)) as page:

            def started(agent: Any) -> None:
                announce(err_console, cfg, run_id, str(agent.writer.path), telemetry)
                for sink in (telemetry, page):
                    if sink is not None:
                        sink.attach(agent)
                status.start(agent)

            try:
                agent, summary, sig = await run_with_signals(
                    lambda: build_agent(cfg, run_dir=new_run_dir(cfg, log_dir, run_id), telemetry=Tee(telemetry, status, page)),
                    attach=started,
                )
            finally:
                status.stop()
            ran.update(summary=summary, sig=sig)
        return summary, sig, score_against_twin(summary.log_path, agent.driver)

    def show(summary: Any, score: dict[str, Any] | None) -> None:
        if json_out:
            print(json.dumps({**summary.to_dict(), **({"vs_ground_truth": score} if score else {})}))
            return
        print_summary(summary, f"run {cfg.name} ({run_id})")
        if score:
            console.print(
                f"atoms vs the twin's ground truth ({score['frames_scored']} frames, match radius {score['match_radius_A']} Å): "
                f"F1 {score['f1']:.3f}, precision {score['precision']:.3f}, recall {score['recall']:.3f}, "
                f"position RMSE {score['rmse_A']:.3f} Å"
            )
        console.print(f"run log: [bold]{summary.log_path}[/]")

    try:
        summary, sig, score = asyncio.run(go())
    except BaseException:
        if "summary" in ran:  # the run ended but something after it failed: the summary still shows
            ignore_late_signals()
            show(ran["summary"], None)
        raise
    ignore_late_signals()
    show(summary, score)
    if with_report:
        report_at_end(summary.log_path, json_out)
    code = exit_code(summary, sig)
    if code:
        fail(f"run {cfg.name}: ended {summary.exit_status}: {summary.reason} (log {summary.log_path})", code)


@app.command()
@one_line_errors
def replay(
    log: Path = typer.Argument(..., help="a run log folder (or its documents.jsonl), or an acquisition file"),
    log_dir: Optional[Path] = typer.Option(None, help="write the replay's own run log under this folder"),
    pace: str = typer.Option("fast", help="'fast' or 'recorded'"),
    pixel_size_A: Optional[float] = typer.Option(None, "--pixel-size-A", help="pixel size (Å) for a file without calibration"),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    verify: bool = typer.Option(False, "--verify", help="re-run the log's pipeline on every logged observation and check "
                                                          "every output (atoms, stage records, labels, decisions) equals the log"),
    rtol: float = typer.Option(0.0, "--rtol", help="with --verify: relative tolerance of numbers (0: bit for bit)"),
    segmenter: Optional[str] = typer.Option(None, "--segmenter", help="for a file: 'unet' or 'log' (default: the config's)"),
    specimen: Optional[str] = typer.Option(None, "--specimen", help="for a file, with the U-Net: graphene | tmd | perovskite | auto"),
    config: Optional[Path] = typer.Option(None, "--config", help="for a file: the run config whose pipeline analyses it"),
    beam_current_pA: Optional[float] = typer.Option(None, "--beam-current-pA", help="for a file that records none (dose unknown without it)"),
    dwell_s: Optional[float] = typer.Option(None, "--dwell-s", help="for a file that records none (dose unknown without it)"),
) -> None:
    """Run a recorded log back through the same pipeline and compare the atoms found.

    With --verify, no device and no new log: the pipeline of the log's configuration re-runs
    every observation the run analysed (frames, parks, re-asks after a refusal; dropped frames are
    skipped as the run skipped them) and every output is compared with the log; the first
    difference of each observation is printed with its frame and field (exit 1 on a difference).

    LOG may also be an acquisition from other software (.dm3/.dm4, .emd, .tif, Nion .ndata/.h5):
    its images are analysed with the default pipeline (or --config's; --segmenter, --specimen) at
    their own pixel calibration (or at --pixel-size-A). Its dose is reported only when the file or
    --beam-current-pA and --dwell-s give the current and the dwell; otherwise it is "unknown"."""
    if pace not in PACES:
        raise InputError("--pace", pace, f"must be one of {PACES}")
    if pixel_size_A is not None and not (0 < pixel_size_A < 1e4):
        raise InputError("--pixel-size-A", pixel_size_A, "must be a positive length in Å")
    if rtol != 0.0 and not verify:
        raise InputError("--rtol", rtol, "applies with --verify")
    if is_acquisition_file(log):
        if verify:
            raise InputError("--verify", log.name, "applies to run logs (an acquisition file has no decisions to check)")
        base = load_config(config) if config is not None else None
        summary, sig = asyncio.run(replay_file(log, log_dir=log_dir, pace=pace, pixel_size_A=pixel_size_A, base=base, segmenter=segmenter,
                                               specimen=specimen, beam_current_pA=beam_current_pA, dwell_s=dwell_s))
        ignore_late_signals()
        dose, dose_note = file_dose(log, pixel_size_A=pixel_size_A, beam_current_pA=beam_current_pA, dwell_s=dwell_s)
        shown = FileReplaySummary(summary, dose, dose_note)
        if json_out:
            print(json.dumps(shown.to_dict()))
        else:
            print_summary(shown, f"replay of {log.name}")
            console.print(f"replay log: [bold]{summary.log_path}[/]")
        code = exit_code(summary, sig)
        if code:
            fail(f"replay of {log}: ended {summary.exit_status}: {summary.reason} (log {summary.log_path})", code)
        return
    for flag, value in (("--pixel-size-A", pixel_size_A), ("--segmenter", segmenter), ("--specimen", specimen), ("--config", config),
                        ("--beam-current-pA", beam_current_pA), ("--dwell-s", dwell_s)):
        if value is not None:
            raise InputError(flag, value, "applies to acquisition files; a run log carries its own configuration and calibration")
    original = RunLog.open(log)
    if verify:
        show_verification(verify_run_log(original, log, rtol), original, json_out)
        return
    cfg = replay_config(original, log, pace)
    schedule = logged_controls(original)

    async def go() -> Any:
        _, summary, sig = await run_with_signals(
            lambda: build_agent(cfg, run_dir=new_run_dir(cfg, log_dir), extra_metadata={"replay_of": str(original.path)},
                                schedule=schedule, pause_on_dose_report=False)
        )
        return summary, sig

    summary, sig = asyncio.run(go())
    ignore_late_signals()
    replayed = RunLog.open(summary.log_path)
    same, compared = compare_atoms(original, replayed)
    skipped = unreadable_frames(replayed)
    drift_same, drift_compared = compare_drift(original, replayed)
    if json_out:
        print(json.dumps({**summary.to_dict(), "atoms_identical_frames": same, "frames_compared": compared,
                          "frames_unreadable": len(skipped), "drift_reproduced_frames": drift_same,
                          "drift_frames_compared": drift_compared}))
    else:
        print_summary(summary, f"replay of {original.path.name}")
        console.print(f"atoms identical in {same} of {compared} frames")
        if drift_compared:
            console.print(f"drift estimates: {drift_same} of {drift_compared} frames reproduced")
        console.print(f"replay log: [bold]{summary.log_path}[/]")
    code = exit_code(summary, sig)
    if code:
        fail(f"replay of {log}: ended {summary.exit_status}: {summary.reason} (log {summary.log_path})", code)
    if skipped:
        fail(f"replay of {log}: {len(skipped)} of {compared} frames could not be read and were skipped; first: {skipped[0]}",
             EXIT_FAILED)
    if same != compared:
        fail(f"replay of {log}: atoms differ in {compared - same} of {compared} frames", EXIT_FAILED)
    # frames the original dropped (overlap) were never analysed there: the replay's estimates may part from its
    if drift_same != drift_compared and not original.event_data("drops"):
        fail(f"replay of {log}: drift estimates differ in {drift_compared - drift_same} of {drift_compared} frames",
             EXIT_FAILED)


def report_at_end(log_path: str, json_out: bool) -> None:
    """The run report after a run; a report that cannot be written is a warning, never the run's failure."""
    try:
        _, path, _ = write_report(RunLog.open(log_path))
    except Exception as exc:  # noqa: BLE001 - the run is done and logged; the report is a convenience
        err_console.print(f"warning: no run report: {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
        return
    (err_console if json_out else console).print(f"run report: [bold]{path}[/] (stemagent report {log_path})", soft_wrap=True)


def show_verification(report: Any, original: RunLog, json_out: bool) -> None:
    """Print a ``replay --verify`` report; exit 1 when anything differs or could not be read."""
    if json_out:
        print(json.dumps(report.to_dict()))
    else:
        for note in report.notes:
            console.print(f"note: {note}", highlight=False)
        for d in report.divergences:
            console.print(f"differs: {d.describe()}", highlight=False, soft_wrap=True)
        for why in report.skipped[:10]:
            console.print(f"skipped: {why}", highlight=False)
        speed = f", {report.speed:.3g}x real time" if report.run_span_s > 0 else ""
        console.print(f"verified {report.observations} observations ({report.frames} frames, {report.parks} parks, "
                      f"{report.refused} re-asks; {len(report.skipped)} frames skipped as in the run) in "
                      f"{report.elapsed_s:.3g} s{speed}: " + ("identical" if report.ok else f"{report.differing} differ"),
                      highlight=False)
    if report.unreadable:
        fail(f"replay --verify of {original.path}: {len(report.unreadable)} frames could not be read; first: {report.unreadable[0]}",
             EXIT_FAILED)
    if report.differing:
        fail(f"replay --verify of {original.path}: {report.differing} of {report.observations} observations differ; first: "
             f"{report.divergences[0].describe() if report.divergences else '?'}", EXIT_FAILED)


@app.command()
@one_line_errors
def report(
    log: Path = typer.Argument(..., help="a run log folder (or its documents.jsonl)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the report here (default: the run log's folder)"),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="draw the PNG figures (matplotlib)"),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON instead of Markdown"),
) -> None:
    """Summarise a run from its log: frames, atoms, per-stage wall times (p50/p95), dose used
    against the budget, decisions, refusals, faults, drops, parks, motifs and the stop reason;
    written as report.md and report.html with PNG figures, and printed."""
    summary, path, md = write_report(RunLog.open(log), out, figures=figures)
    if json_out:
        print(json.dumps(summary))
    else:
        console.print(md, highlight=False, markup=False, soft_wrap=True)
        console.print(f"report: [bold]{path}[/] (and {path.with_suffix('.html').name})")


@app.command("train-segmenter")
@one_line_errors
def train_segmenter(
    config: Path = typer.Option(..., "--config", "-c", help="a segmenter training configuration (YAML)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar (for logs)"),
) -> None:
    """Train the U-Net atom finder on frames generated by the twin; write weights and model card."""
    # heavy: torch and the training loop, imported only for this command
    from stemagent.agent.app.segmenter_training import load_train_config, run_training

    card = run_training(load_train_config(config), show_progress=not no_progress)
    console.print(f"weights: [bold]{card['config']['out']}[/] ({card['trained']['steps']} steps, {card['trained']['seconds']} s)")


@app.command("train-rvae")
@one_line_errors
def train_rvae(
    config: Path = typer.Option(..., "--config", "-c", help="an rVAE training configuration (YAML), e.g. configs/train-rvae.yaml"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar (for logs)"),
) -> None:
    """Train the rotationally invariant VAE on atom patches from twin sequences; write weights and model card."""
    # heavy: torch, the twin and the training loop, imported only for this command
    from stemagent.agent.app.rvae_training import load_rvae_train_config, run_training

    card = run_training(load_rvae_train_config(config), show_progress=not no_progress)
    m = card.get("metrics", {})
    console.print(f"weights: [bold]{card['config']['out']}[/] ({card['trained']['steps']} steps, {card['trained']['seconds']} s); "
                  f"held out: rotation error {m.get('rotation_error_deg_rms')} deg rms, reconstruction/mean-patch "
                  f"{m.get('clean_reconstruction_ratio')} (noiseless), k-NN balanced accuracy {m.get('knn_balanced_accuracy')}")


def score_against_twin(log_path: str, driver: Any) -> dict[str, Any] | None:
    """Detection scores against the twin's ground truth, when the driver is the physical twin."""
    truth = getattr(driver, "ground_truth", None)
    if truth is None or not hasattr(truth, "frame_truth"):
        return None
    return score_run(RunLog.open(log_path), truth)


def compare_atoms(a: Any, b: Any) -> tuple[int, int]:
    """(frames whose atoms are bit-for-bit equal, frames of the original with atoms), matched by identity."""
    return compare_by_identity(a, b)


app.command("bridge")(one_line_errors(bridge))
app.command("simulate")(one_line_errors(simulate))
app.command("view")(one_line_errors(view))
app.command("analyze-boundaries")(analyze_boundaries)
app.command("analyze-latents")(analyze_latents)
app.command("batch")(batch)


def main() -> None:  # pragma: no cover - console entry for python -m
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
