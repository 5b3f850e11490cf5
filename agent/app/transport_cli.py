"""The ``stemagent bridge`` command (registered in :mod:`stemagent.agent.app.cli`); it hands the bridge
the wiring room's driver builder for a ``driver`` backend."""

from __future__ import annotations

from pathlib import Path

import typer

from stemagent.agent.app.factory import bridge_backend
from stemagent.drivers.bridge import run_bridge


def bridge(
    config: Path = typer.Option(..., "--config", "-c", help="bridge configuration (YAML): endpoints and backend"),
) -> None:
    """Serve a microscope backend (the twin by default) over ZeroMQ for a remote agent."""
    code = run_bridge(config, build_driver=bridge_backend)
    if code:
        raise typer.Exit(code)
