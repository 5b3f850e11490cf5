"""``stemagent replay`` on an acquisition file from other software (.dm3/.dm4, .emd, .tif, Nion).

A run log carries its own configuration; a file from Gatan, Velox or Nion does not, so the run
is configured here: the default pipeline (or the one in ``--config``), the scan geometry of the
file's first image, and safety limits opened wide (a replay re-analyses what was seen; nothing
reaches a beam).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from stemagent.config import RunConfig, config_from_dict
from stemagent.drivers.files import read_acquisitions


def file_replay_config(path: Path, *, pace: str = "fast", base: RunConfig | None = None) -> RunConfig:
    """A run configuration that plays ``path`` through the pipeline of ``base`` (defaults if None)."""
    acqs = read_acquisitions(path)
    g = acqs[0].geometry(default_dwell_s=1e-6)
    data: dict[str, Any] = (base or RunConfig()).model_dump(mode="json")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{path.stem}-replay")[:64]
    side = int(min(8192, max(8, *g.shape_px)))
    data.update(
        name=name,
        max_frames=len(acqs),
        driver={"kind": "replay", "path": str(path), "pace": pace},
        telemetry={},
    )
    data["scan"] = {**data.get("scan", {}), "center_A": list(g.center_A), "fov_A": max(g.fov_A), "shape_px": side,
                    "dwell_s": g.dwell_s}
    data["safety"] = {
        **data.get("safety", {}),
        "area_center_A": list(g.center_A),
        "area_half_width_A": 10.0 * max(g.fov_A),  # room for the policy; its moves are not replayed
        "max_fov_A": 1e6,
        "max_shape_px": max(side, 2048),
        "max_total_dose_e_per_A2": 1e30,
        "max_commands_per_s": 1e9,
        "min_dwell_s": min(1e-9, g.dwell_s),
        "max_dwell_s": max(1.0, g.dwell_s),
    }
    return config_from_dict(data, source=f"{path} (replay of a file)")


def replay_file(path: Path, *, log_dir: Path | None, pace: str, json_out: bool) -> None:
    """Body of ``stemagent replay FILE`` for acquisition files; raises ``typer.Exit`` like the CLI."""
    import typer

    from stemagent.agent.cli import console, fail, print_summary
    from stemagent.agent.factory import build_agent, new_run_dir
    from stemagent.errors import ConfigError, InputError

    try:
        cfg = file_replay_config(path, pace=pace)
    except (InputError, ConfigError) as exc:
        fail(str(exc))

    async def go() -> Any:
        agent = await build_agent(cfg, run_dir=new_run_dir(cfg, log_dir), extra_metadata={"replay_of": str(path)})
        return await agent.run()

    try:
        summary = asyncio.run(go())
    except (InputError, ConfigError) as exc:
        fail(str(exc))
    if json_out:
        print(json.dumps(summary.to_dict()))
    else:
        print_summary(summary, f"replay of {path.name}")
        console.print(f"replay log: [bold]{summary.log_path}[/]")
    if summary.state != "stopped":
        raise typer.Exit(1)
