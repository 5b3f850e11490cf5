"""``stemagent replay`` on an acquisition file from other software (.dm3/.dm4, .emd, .tif, Nion).

A run log carries its own configuration; a file from Gatan, Velox or Nion does not, so the run
is configured here: the default pipeline (or the one in ``--config``), with the segmenter
``--segmenter unet|log`` and the U-Net's ``--specimen`` when given, the scan geometry of the
file's first image, and safety limits opened wide (a replay re-analyses what was seen; nothing
reaches a beam).

The dose is reported only when the file or the user gives both the beam current and the dwell
time (:func:`file_dose`); otherwise it is "unknown", never computed from a default current.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from stemagent.agent.app.cli_support import run_with_signals
from stemagent.agent.app.factory import build_agent, new_run_dir
from stemagent.config import RunConfig, config_from_dict
from stemagent.drivers.files import Acquisition, read_acquisitions
from stemagent import dose as dose_model
from stemagent.errors import InputError

SEGMENTERS = ("unet", "log")


def file_dose(path: Path, *, pixel_size_A: float | None = None, beam_current_pA: float | None = None,
              dwell_s: float | None = None) -> tuple[float | None, str]:
    """The peak scan dose of the file's images (e/Å²) and where it came from, or ``(None, why)``
    when the file and the user do not give both the beam current and the dwell time."""
    acqs = read_acquisitions(path, pixel_size_A)
    doses = []
    for a in acqs:
        current = beam_current_pA or a.beam_current_pA
        dwell = a.dwell_s or dwell_s
        if not current or not dwell:
            missing = " and ".join(n for n, v in (("beam current", current), ("dwell time", dwell)) if not v)
            return None, f"unknown: {path.name} records no {missing} (give --beam-current-pA / --dwell-s)"
        doses.append(dose_model.dose_e_per_A2(current, dwell, a.pixel_size_A[0] * a.pixel_size_A[1]))
    src = "file" if beam_current_pA is None and dwell_s is None else "file and user"
    return max(doses), f"from the beam current and dwell ({src})"


class FileReplaySummary:
    """A file replay's run summary with its dose as the file (or the user) gives it: the run's own
    dose fields come from the driver's capabilities, which fall back to a default current for the
    safety gate; a summary must not report that as the file's dose."""

    def __init__(self, summary: Any, dose_e_per_A2: float | None, dose_note: str) -> None:
        self.summary = summary
        self.dose_e_per_A2 = dose_e_per_A2
        self.dose_note = dose_note

    def __getattr__(self, name: str) -> Any:
        return getattr(self.summary, name)

    def to_dict(self) -> dict[str, Any]:
        d = self.summary.to_dict()
        known = self.dose_e_per_A2 is not None
        d["peak_dose_e_per_A2"] = self.dose_e_per_A2 if known else "unknown"
        if not known:
            d["beam_current_pA"] = "unknown"
        d["dose_note"] = self.dose_note
        return d


def file_replay_config(path: Path, *, pace: str = "fast", base: RunConfig | None = None,
                       pixel_size_A: float | None = None, segmenter: str | None = None, specimen: str | None = None,
                       beam_current_pA: float | None = None, dwell_s: float | None = None,
                       acquisitions: list[Acquisition] | None = None) -> RunConfig:
    """A run configuration that plays ``path`` through the pipeline of ``base`` (defaults if None);
    ``pixel_size_A`` calibrates files that carry no calibration; ``segmenter`` (``unet`` / ``log``)
    and ``specimen`` (the U-Net's specimen prior) override the base's segmenter."""
    if segmenter is not None and segmenter not in SEGMENTERS:
        raise InputError("--segmenter", segmenter, f"must be one of {SEGMENTERS}")
    acqs = acquisitions if acquisitions is not None else read_acquisitions(path, pixel_size_A)
    g = acqs[0].geometry(default_dwell_s=dwell_s or 1e-6)
    data: dict[str, Any] = (base or RunConfig()).model_dump(mode="json")
    seg = dict(data["pipeline"]["segmenter"])
    if segmenter is not None and segmenter != seg.get("kind"):
        seg = {"kind": segmenter}
    if specimen is not None:
        if seg.get("kind") != "unet":
            raise InputError("--specimen", specimen, "applies to the U-Net segmenter (--segmenter unet)")
        seg["specimen"] = specimen
    data["pipeline"] = {**data["pipeline"], "segmenter": seg}
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{path.stem}-replay")[:64]
    side = int(min(8192, max(8, *g.shape_px)))
    data.update(
        name=name,
        max_frames=len(acqs),
        driver={"kind": "replay", "path": str(path), "pace": pace, "pixel_size_A": pixel_size_A,
                "beam_current_pA": beam_current_pA, "dwell_s": dwell_s},
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


async def replay_file(path: Path, *, log_dir: Path | None, pace: str, pixel_size_A: float | None = None,
                      base: RunConfig | None = None, segmenter: str | None = None, specimen: str | None = None,
                      beam_current_pA: float | None = None, dwell_s: float | None = None) -> Any:
    """Run ``stemagent replay FILE`` for an acquisition file; returns the summary and the signal
    that interrupted it (or None). Errors are raised for the CLI to report."""
    cfg = file_replay_config(path, pace=pace, pixel_size_A=pixel_size_A, base=base, segmenter=segmenter, specimen=specimen,
                             beam_current_pA=beam_current_pA, dwell_s=dwell_s)
    _, summary, sig = await run_with_signals(
        # nothing reaches a beam and no operator watches: a dose report above prediction is logged only
        lambda: build_agent(cfg, run_dir=new_run_dir(cfg, log_dir), extra_metadata={"replay_of": str(path)},
                            pause_on_dose_report=False)
    )
    return summary, sig
