"""``stemagent replay`` on an acquisition file from other software (.dm3/.dm4, .emd, .tif, Nion).

A run log carries its own configuration; a file from Gatan, Velox or Nion does not, so the run
is configured here: the default pipeline (or the one in ``--config``), the scan geometry of the
file's first image, and safety limits opened wide (a replay re-analyses what was seen; nothing
reaches a beam).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from stemagent.agent.app.cli_support import run_with_signals
from stemagent.agent.app.factory import build_agent, new_run_dir
from stemagent.config import RunConfig, config_from_dict
from stemagent.drivers.files import Acquisition, read_acquisitions


def file_replay_config(path: Path, *, pace: str = "fast", base: RunConfig | None = None,
                       pixel_size_A: float | None = None, acquisitions: list[Acquisition] | None = None) -> RunConfig:
    """A run configuration that plays ``path`` through the pipeline of ``base`` (defaults if None);
    ``pixel_size_A`` calibrates files that carry no calibration; ``acquisitions``: the file's images
    when the caller has read them already (``stemagent batch``)."""
    acqs = acquisitions if acquisitions is not None else read_acquisitions(path, pixel_size_A)
    g = acqs[0].geometry(default_dwell_s=1e-6)
    data: dict[str, Any] = (base or RunConfig()).model_dump(mode="json")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{path.stem}-replay")[:64]
    side = int(min(8192, max(8, *g.shape_px)))
    data.update(
        name=name,
        max_frames=len(acqs),
        driver={"kind": "replay", "path": str(path), "pace": pace, "pixel_size_A": pixel_size_A},
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
        "dose_budget_e_per_A2": 1e30,
        "max_commands_per_s": 1e9,
        "min_dwell_s": min(1e-9, g.dwell_s),
        "max_dwell_s": max(1.0, g.dwell_s),
    }
    return config_from_dict(data, source=f"{path} (replay of a file)")


async def replay_file(path: Path, *, log_dir: Path | None, pace: str, pixel_size_A: float | None = None) -> Any:
    """Run ``stemagent replay FILE`` for an acquisition file; returns the summary and the signal
    that interrupted it (or None). Errors are raised for the CLI to report."""
    cfg = file_replay_config(path, pace=pace, pixel_size_A=pixel_size_A)
    _, summary, sig = await run_with_signals(
        # nothing reaches a beam and no operator watches: a dose report above prediction is logged only
        lambda: build_agent(cfg, run_dir=new_run_dir(cfg, log_dir), extra_metadata={"replay_of": str(path)},
                            pause_on_dose_report=False)
    )
    return summary, sig
