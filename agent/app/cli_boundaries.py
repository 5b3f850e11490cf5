"""``stemagent analyze-boundaries LOG|FILE``: read domain boundaries from frames and fit their chain.

Input: a run log folder, a ``.npz`` written by ``stemagent simulate``, or a microscope file
(``.dm3/.dm4/.emd/.tif/...``; ``--pixel-size-A`` when it has no calibration). For every frame:
atomic columns (LoG finder) -> boundary sublattice -> lattice registration -> ordered step
sequences (:class:`stemagent.boundaries.trace.BoundaryStage`); then the analysis of all of them
(:func:`stemagent.boundaries.analysis.analyze_sequences`).

Writes into ``--out``: ``traces.json`` (every boundary with its motifs and confidences),
``transition_matrix.json`` (full Dirichlet posterior mean with credible bounds, reduced MLE,
counts), ``parameters.json`` (reduced parameters with 95% profile-likelihood intervals, steady
state, entropy rate, model comparison, forbidden 3-motifs), ``kmotifs.json`` (tested and
significant tileable k-motifs), ``omega.json`` (Omega(N), growth fits, alpha(d)), ``report.json``
(all of it), and the figures ``boundary_overlay.png``, ``alpha_d.png``, ``omega_loglog.png``
(when matplotlib is installed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import typer

from stemagent.agent.app.cli_support import console, fail
from stemagent.boundaries.analysis import analyze_sequences, deduplicate_traces, sequences_from_traces
from stemagent.boundaries.config import BoundaryAnalysisConfig
from stemagent.boundaries.trace import BoundaryStage
from stemagent.drivers.files import is_acquisition_file, read_acquisitions
from stemagent.errors import InputError
from stemagent.runlog.reader import RunLog
from stemagent.types import Frame, ScanGeometry


def _frames_from_npz(path: Path) -> Iterator[Frame]:
    with np.load(path, allow_pickle=False) as z:
        if "images" not in z.files:
            raise InputError(str(path), sorted(z.files)[:6], "is not a 'stemagent simulate' file (no 'images' array)")
        images = z["images"]
        cfg = json.loads(str(z["config_json"])) if "config_json" in z.files else {}
        scan = cfg.get("scan", {})
        centers = z["centers_A"] if "centers_A" in z.files else np.zeros((len(images), 2))
        doses = z["doses_e_per_A2"] if "doses_e_per_A2" in z.files else np.zeros(len(images))
        times = z["line_times_s"] if "line_times_s" in z.files else None
    fov = scan.get("fov_A")
    if fov is None:
        raise InputError(f"{path}:config_json.scan.fov_A", None, "is needed to place the frames in Å")
    fov = (float(fov), float(fov)) if isinstance(fov, (int, float)) else tuple(float(v) for v in fov)
    for i, img in enumerate(images):
        geo = ScanGeometry(center_A=tuple(float(v) for v in centers[i]), fov_A=fov, shape_px=img.shape,  # type: ignore[arg-type]
                           rotation_rad=float(scan.get("rotation_rad", 0.0)), dwell_s=float(scan.get("dwell_s", 1e-6)))
        lt = times[i] if times is not None else geo.line_start_times_s(0.0)
        yield Frame(image=img, geometry=geo, line_times_s=lt, index=i, dose_e_per_A2=float(doses[i]), source=str(path))


def frames_from_path(path: Path, pixel_size_A: Optional[float] = None) -> Iterator[Frame]:
    """Frames of a run log folder, a ``simulate`` .npz, or a microscope file."""
    if path.is_dir() or path.name == "documents.jsonl":
        yield from RunLog.open(path).frames()
        return
    if not path.is_file():
        raise InputError("path", str(path), "does not exist")
    if path.suffix.lower() == ".npz":
        yield from _frames_from_npz(path)
        return
    if not is_acquisition_file(path):
        raise InputError("path", str(path), "is not a run log, a .npz from 'stemagent simulate' or a microscope image file")
    for i, acq in enumerate(read_acquisitions(path, pixel_size_A=pixel_size_A)):
        geo = acq.geometry(1e-6)
        yield Frame(image=np.asarray(acq.image, dtype=np.float32), geometry=geo, line_times_s=geo.line_start_times_s(0.0), index=i,
                    dose_e_per_A2=0.0, source=str(path))


def _parse_fixed(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"--fix {name.strip()}", value, "must be NAME=NUMBER, e.g. k=0,g=0,f=1") from None
    return out


def analyze_boundaries(
    path: Path = typer.Argument(..., help="a run log folder, a .npz from 'stemagent simulate', or a microscope image file"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: <path>_boundaries)"),
    pixel_size_A: Optional[float] = typer.Option(None, "--pixel-size-A", help="pixel size for files without a calibration, Å"),
    max_frames: int = typer.Option(1000, "--max-frames", min=1, help="read at most this many frames"),
    fix: str = typer.Option("", "--fix", help="reduced parameters held fixed, e.g. 'k=0,g=0,f=1'"),
    alpha_curve: bool = typer.Option(True, "--alpha-curve/--no-alpha-curve", help="compute alpha(d) (about a second per d value)"),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="write PNG figures (needs matplotlib)"),
    omega_n_max: int = typer.Option(40, "--omega-n-max", min=8, max=200, help="largest N of the exact Omega(N) transfer matrix"),
    kmotif_boot: int = typer.Option(2000, "--kmotif-boot", min=99, max=100000, help="bootstrap replicates of the k-motif test"),
    seed: int = typer.Option(0, help="seed of the bootstrap and the cross-validation folds"),
) -> None:
    """Read domain boundaries from frames, fit their 2-motif chain and write the analysis."""
    try:
        cfg = BoundaryAnalysisConfig(fixed=_parse_fixed(fix), seed=seed, omega_n_max=omega_n_max, kmotif_boot=kmotif_boot)
        stage = BoundaryStage(cfg.trace)
        traces, first = [], None
        for n, frame in enumerate(frames_from_path(path, pixel_size_A)):
            if n >= max_frames:
                break
            res = stage.process(frame)
            for t in res.traces:
                t.frame_index = frame.index
            traces.extend(res.traces)
            if first is None:
                first = (frame, res)
        if first is None:
            raise InputError("path", str(path), "holds no frames")
        traces = deduplicate_traces(traces)  # a boundary seen in two overlapping frames counts once
        seqs = sequences_from_traces(traces, cfg.min_step_confidence)
        report = analyze_sequences(seqs, cfg, with_alpha_curve=alpha_curve)
    except InputError as exc:
        fail(str(exc))
    out_dir = out or path.with_name(path.stem + "_boundaries")
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = report.to_dict()
    files = {
        "traces.json": [t.to_dict() for t in traces],
        "transition_matrix.json": {"states": doc["states"], **doc["transition_matrix"]},
        "parameters.json": {k: doc[k] for k in ("n_boundaries", "n_transitions", "n_unread_windows", "forbidden_3motifs", "reduced",
                                                "steady_state", "entropy_rate_nats_per_step", "model_comparison")},
        "kmotifs.json": {"significant": doc["significant_kmotifs"], "tested": doc["tested_kmotifs"]},
        "omega.json": {"omega": doc["omega"], "alpha_of_d": doc["alpha_of_d"]},
        "report.json": doc,
    }
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, indent=1))
    written = list(files)
    if figures:
        try:
            from stemagent.boundaries import figures as figs  # matplotlib: optional (the bench extra)
        except ImportError:  # pragma: no cover - matplotlib is in the bench extra
            figures = False
        else:
            frame, res = first
            figs.boundary_overlay(out_dir / "boundary_overlay.png", frame.image, frame.geometry, res.traces)
            figs.omega_loglog(out_dir / "omega_loglog.png", report.omega_n, report.log_omega, report.growth, log_count=report.log_count)
            written += ["boundary_overlay.png", "omega_loglog.png"]
            if report.alpha_curve is not None:
                figs.alpha_curve(out_dir / "alpha_d.png", report.alpha_curve)
                written.append("alpha_d.png")
    p = report.reduced
    summary = {
        "out": str(out_dir),
        "frames_read": len({t.frame_index for t in traces}) if traces else 0,
        "boundaries": report.counts.n_sequences,
        "transitions": report.counts.n_transitions,
        "forbidden_3motifs": len(report.counts.forbidden),
        "params": {k: [round(v, 4), [round(p.intervals[k][0], 4), round(p.intervals[k][1], 4)]] for k, v in p.params.as_dict().items()},
        "entropy_rate_nats": round(report.entropy_rate_nats, 4),
        "best_model": report.model_scores[0].name if report.model_scores else None,
        "significant_kmotifs": len(doc["significant_kmotifs"]),
        "alpha": [round(report.growth.alpha, 3), round(report.growth.alpha_stderr, 3)],
        "alpha_peak_d": None if report.alpha_curve is None else round(report.alpha_curve.peak_d, 3),
        "files": written,
    }
    console.print_json(json.dumps(summary))
