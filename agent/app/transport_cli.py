"""The ``stemagent bridge`` command (registered in :mod:`stemagent.agent.app.cli`)."""

from __future__ import annotations

from pathlib import Path

import typer


def bridge(
    config: Path = typer.Option(..., "--config", "-c", help="bridge configuration (YAML): endpoints and backend"),
) -> None:
    """Serve a microscope backend (the twin by default) over ZeroMQ for a remote agent."""
    from stemagent.drivers.bridge import run_bridge

    code = run_bridge(config)
    if code:
        raise typer.Exit(code)
