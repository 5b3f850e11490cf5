"""The ``stemagent`` command line.

Errors a user can fix (a bad config, a log that is not a log) print one line on stderr and
exit with code 2, with no traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from stemagent.config import ReplayDriverConfig, RunConfig, config_from_dict, load_config
from stemagent.errors import ConfigError, InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="stemagent: an autonomous STEM agent.")
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(config: Path) -> RunConfig:
    try:
        return load_config(config)
    except ConfigError as exc:
        fail(str(exc))


def print_summary(summary: Any, title: str) -> None:
    table = Table(title=title, show_header=False)
    for k, v in summary.to_dict().items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log at INFO level")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def validate(config: Path = typer.Argument(..., help="a run configuration (YAML)")) -> None:
    """Check a run configuration and print it with every default filled in."""
    cfg = _load(config)
    console.print_json(json.dumps(cfg.model_dump(mode="json")))


@app.command()
def run(
    config: Path = typer.Option(..., "--config", "-c", help="a run configuration (YAML)"),
    max_frames: Optional[int] = typer.Option(None, help="override max_frames"),
    log_dir: Optional[Path] = typer.Option(None, help="write the run log under this folder"),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Run the closed loop described by CONFIG and write a run log."""
    from stemagent.agent.factory import build_agent, new_run_dir

    cfg = _load(config)
    if max_frames is not None:
        try:
            cfg = config_from_dict({**cfg.model_dump(mode="json"), "max_frames": max_frames}, source="--max-frames")
        except ConfigError as exc:
            fail(str(exc))

    async def go() -> Any:
        from stemagent.agent.telemetry_factory import open_telemetry

        async with open_telemetry(cfg) as telemetry:
            agent = await build_agent(cfg, run_dir=new_run_dir(cfg, log_dir), telemetry=telemetry)
            if telemetry is not None and hasattr(telemetry, "attach"):
                telemetry.attach(agent)
            summary = await agent.run()
            return summary, score_against_twin(summary.log_path, agent.driver)

    try:
        summary, score = asyncio.run(go())
    except (InputError, ConfigError, ValueError) as exc:  # raised while building the run's parts
        fail(str(exc))
    if json_out:
        print(json.dumps({**summary.to_dict(), **({"vs_ground_truth": score} if score else {})}))
    else:
        print_summary(summary, f"run {cfg.name}")
        if score:
            console.print(
                f"atoms vs the twin's ground truth ({score['frames_scored']} frames, match radius {score['match_radius_A']} Å): "
                f"F1 {score['f1']:.3f}, precision {score['precision']:.3f}, recall {score['recall']:.3f}, "
                f"position RMSE {score['rmse_A']:.3f} Å"
            )
        console.print(f"run log: [bold]{summary.log_path}[/]")
    if summary.state != "stopped":
        raise typer.Exit(1)


@app.command()
def replay(
    log: Path = typer.Argument(..., help="a run log folder (or its documents.jsonl)"),
    log_dir: Optional[Path] = typer.Option(None, help="write the replay's own run log under this folder"),
    pace: str = typer.Option("fast", help="'fast' or 'recorded'"),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Run a recorded log back through the same pipeline and compare the atoms found.

    LOG may also be an acquisition from other software (.dm3/.dm4, .emd, .tif, Nion .ndata/.h5):
    its images are analysed with the default pipeline at their own pixel calibration."""
    from stemagent.drivers.files import is_acquisition_file

    if is_acquisition_file(log):
        from stemagent.agent.replay_files import replay_file

        return replay_file(log, log_dir=log_dir, pace=pace, json_out=json_out)
    from stemagent.agent.factory import build_agent, new_run_dir
    from stemagent.runlog import RunLog

    try:
        original = RunLog.open(log)
        logged_cfg = original.start.get("config")
        if not isinstance(logged_cfg, dict):
            raise InputError("start.config", logged_cfg, "the log carries no run configuration to replay with")
        n_frames = len(original.events("frames"))
        if n_frames == 0:
            raise InputError("frames", 0, "the log holds no frames to replay")
        data = dict(logged_cfg)
        data["driver"] = ReplayDriverConfig(path=Path(log), pace=pace).model_dump(mode="json")  # type: ignore[arg-type]
        data["max_frames"] = n_frames
        data["name"] = f"{data.get('name', 'run')}-replay"[:64]
        data["telemetry"] = {}
        # the logged safety limits stay: the same decisions pass the same gate again
        cfg = config_from_dict(data, source=f"{log} (start.config)")
    except (InputError, ConfigError, ValueError) as exc:
        fail(str(exc))

    async def go() -> Any:
        agent = await build_agent(cfg, run_dir=new_run_dir(cfg, log_dir), extra_metadata={"replay_of": str(original.path)})
        return await agent.run()

    try:
        summary = asyncio.run(go())
    except (InputError, ConfigError, ValueError) as exc:  # raised while building the run's parts
        fail(str(exc))
    replayed = RunLog.open(summary.log_path)
    same, compared = compare_atoms(original, replayed)
    if json_out:
        print(json.dumps({**summary.to_dict(), "atoms_identical_frames": same, "frames_compared": compared}))
    else:
        print_summary(summary, f"replay of {original.path.name}")
        console.print(f"atoms identical in {same} of {compared} frames")
        console.print(f"replay log: [bold]{summary.log_path}[/]")
    if same != compared:
        raise typer.Exit(1)


@app.command("train-segmenter")
def train_segmenter(
    config: Path = typer.Option(..., "--config", "-c", help="a segmenter training configuration (YAML)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar (for logs)"),
) -> None:
    """Train the U-Net atom finder on frames generated by the twin; write weights and model card."""
    from stemagent.agent.segmenter_training import load_train_config, run_training

    try:
        card = run_training(load_train_config(config), show_progress=not no_progress)
    except (InputError, ConfigError) as exc:
        fail(str(exc))
    console.print(f"weights: [bold]{card['config']['out']}[/] ({card['trained']['steps']} steps, {card['trained']['seconds']} s)")


def score_against_twin(log_path: str, driver: Any) -> dict[str, Any] | None:
    """Detection scores against the twin's ground truth, when the driver is the physical twin."""
    truth = getattr(driver, "ground_truth", None)
    if truth is None or not hasattr(truth, "frame_truth"):
        return None
    from stemagent.runlog import RunLog
    from stemagent.simulators.scoring import score_run

    return score_run(RunLog.open(log_path), truth)


def compare_atoms(a: Any, b: Any) -> tuple[int, int]:
    """Count frames whose atoms (positions, classes, confidences) are bit-for-bit equal in two logs."""
    left = {x.frame_index: x for x in a.atoms()}
    right = {x.frame_index: x for x in b.atoms()}
    common = sorted(set(left) & set(right))
    same = sum(
        1
        for i in common
        if np.array_equal(left[i].positions_A, right[i].positions_A)
        and np.array_equal(left[i].classes, right[i].classes)
        and np.array_equal(left[i].confidence, right[i].confidence)
    )
    return same, max(len(left), len(common))


from stemagent.agent.transport_cli import bridge as _bridge  # noqa: E402 - the bridge command lives with the transport

app.command("bridge")(_bridge)

from stemagent.agent.cli_simulate import simulate as _simulate  # noqa: E402 - the twin's data command

app.command("simulate")(_simulate)

from stemagent.agent.cli_boundaries import analyze_boundaries as _analyze_boundaries  # noqa: E402 - boundary analysis

app.command("analyze-boundaries")(_analyze_boundaries)


def main() -> None:  # pragma: no cover - console entry for python -m
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
