"""``stemagent analyze-latents LOG``: transformation pathways in a run log's rVAE latents.

Reads the log's ``latents`` stream (or replays its frames' atoms through the rVAE when it has
none: :mod:`stemagent.agent.app.latent_log`), follows every atom across the frames, finds states
and events (:mod:`stemagent.encoding.pathways`) and writes into ``--out`` (default
``<LOG>_latents``):

- ``graph.json``: the states (BIC per number of states, means), the transition graph (counts,
  dose in each state, rates per e/Å²), the events and their groups, the latent noise, and, when
  the log has the twin's truth (``twin_truth.json``), the events scored against the twin's event
  log;
- ``trajectories.parquet`` (``trajectories.csv`` without pyarrow): one row per atom and frame
  (``track, frame_index, step, x_A, y_A, z0.., angle_rad, dose_e_per_A2, state, true_class``);
- figures (matplotlib, the ``bench`` extra): ``latent_scatter.png`` (content latents coloured by
  the twin's true class, or by state without truth), ``transition_graph.png`` (states at their
  means, arrows with counts), ``decoded_path.png`` (patches decoded from one track's latents
  around its strongest event, upright).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import typer

from stemagent.agent.app.cli_support import console, one_line_errors
from stemagent.agent.app.latent_log import (TRUTH_FILE, LogLatents, assign_true_classes, latent_frames_from_log, read_twin_truth,
                                            register_to_truth, score_events)
from stemagent.encoding.pathways import DEFAULT_N_SIGMA, DEFAULT_WINDOWS, PathwayAnalysis, analyze_pathways
from stemagent.errors import InputError
from stemagent.runlog import RunLog


def write_table(columns: dict[str, np.ndarray], out_dir: Path) -> str:
    """Parquet (pyarrow, as ``stemagent batch`` writes) or CSV without it; the file's name."""
    try:
        import pyarrow as pa  # lazy: pyarrow is optional (the files extra): CSV without it
        import pyarrow.parquet as pq  # lazy: pyarrow is optional (the files extra): CSV without it
    except ImportError:
        name = "trajectories.csv"
        keys = list(columns)
        data = np.column_stack([np.asarray(columns[k], dtype=np.float64) for k in keys]) if keys else np.zeros((0, 0))
        fmt = ["%d" if np.asarray(columns[k]).dtype.kind in "iub" else "%.6g" for k in keys]
        np.savetxt(out_dir / name, data, delimiter=",", header=",".join(keys), comments="", fmt=fmt)
        return name
    name = "trajectories.parquet"
    pq.write_table(pa.table({k: np.asarray(v) for k, v in columns.items()}), out_dir / name)
    return name


def _figures(out_dir: Path, res: PathwayAnalysis, class_names: list[str] | None, weights: Optional[Path], device: str) -> list[str]:
    import matplotlib  # lazy: matplotlib only when figures are written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib only when figures are written

    written = []
    tr = res.trajectories
    rng = np.random.default_rng(0)
    idx = rng.choice(len(tr), min(len(tr), 20000), replace=False) if len(tr) else np.zeros(0, dtype=int)
    z = tr.z[idx]
    zy = z[:, 1] if z.shape[1] > 1 else np.zeros(len(z))
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    known = class_names is not None and np.any(tr.true_class[idx] >= 0)
    colour_by = tr.true_class[idx] if known else tr.state[idx]
    names = class_names if known and class_names is not None else [f"state {s}" for s in range(res.states.n_states)]
    order = np.argsort([-np.sum(colour_by == c) for c in range(len(names))])
    for c in order:  # the common class first, the rare ones drawn on top
        m = colour_by == c
        if m.any():
            ax.scatter(z[m, 0], zy[m], s=3 if c == order[0] else 8, alpha=0.5, label=f"{names[c]} ({int(m.sum())})")
    if known and np.any(colour_by < 0):
        m = colour_by < 0
        ax.scatter(z[m, 0], zy[m], s=2, c="0.7", alpha=0.3, label=f"no true site ({int(m.sum())})")
    mu = res.states.means
    ax.scatter(mu[:, 0], mu[:, 1] if mu.shape[1] > 1 else np.zeros(len(mu)), marker="x", c="k", s=50, label="state means")
    ax.set_xlabel("z0")
    ax.set_ylabel("z1")
    ax.set_title("content latents" + (" by the twin's true class" if known else " by state"))
    ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    fig.savefig(out_dir / "latent_scatter.png", dpi=110)
    plt.close(fig)
    written.append("latent_scatter.png")

    g = res.graph
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    xy = np.column_stack([mu[:, 0], mu[:, 1] if mu.shape[1] > 1 else np.arange(len(mu))])
    size = 200 + 1800 * g.occupancy / max(int(g.occupancy.max()) if len(g.occupancy) else 1, 1)
    ax.scatter(xy[:, 0], xy[:, 1], s=size, c=np.arange(g.n_states), cmap="tab10", alpha=0.6, edgecolors="k")
    for s in range(g.n_states):
        ax.annotate(f"{s}\n{int(g.occupancy[s])}", xy[s], ha="center", va="center", fontsize=8)
    top = max(int(g.counts.max()), 1) if g.counts.size else 1
    for i in range(g.n_states):
        for j in range(g.n_states):
            if i != j and g.counts[i, j] > 0:
                ax.annotate("", xy=xy[j], xytext=xy[i], arrowprops={"arrowstyle": "->", "lw": 0.8 + 3 * g.counts[i, j] / top,
                                                                 "connectionstyle": "arc3,rad=0.2", "color": "C3"})
                mid = 0.5 * (xy[i] + xy[j]) + 0.08 * np.array([xy[j, 1] - xy[i, 1], xy[i, 0] - xy[j, 0]])
                ax.annotate(str(int(g.counts[i, j])), mid, fontsize=8, color="C3")
    ax.set_xlabel("z0 (state mean)")
    ax.set_ylabel("z1 (state mean)")
    ax.set_title(f"transition graph: {g.n_states} states, {int(g.counts.sum())} transitions")
    ax.margins(0.25)
    fig.tight_layout()
    fig.savefig(out_dir / "transition_graph.png", dpi=110)
    plt.close(fig)
    written.append("transition_graph.png")

    if res.events:
        import torch  # lazy: torch only when a log must be re-encoded: the CLI starts without it

        from stemagent.encoding.rvae import Latents, default_rvae_weights, load_rvae  # lazy: torch only when a log must be re-encoded: the CLI starts without it

        ev = max(res.events, key=lambda e: e.score)
        rows = np.flatnonzero(tr.track == ev.track)
        at = int(np.searchsorted(tr.step[rows], ev.step))
        rows = rows[max(0, at - 6):at + 6]
        model = load_rvae(weights or default_rvae_weights(), device=device)
        if model.spec.latent_dim == tr.z.shape[1]:
            zz = torch.as_tensor(tr.z[rows], dtype=torch.float32)
            with torch.no_grad():
                patches = model.decode(Latents(torch.zeros(len(rows)), torch.zeros(len(rows), 2), zz)).cpu().numpy()
            fig, axes = plt.subplots(1, len(rows), figsize=(1.2 * len(rows), 1.7))
            for a, p, r in zip(np.atleast_1d(axes), patches, rows):
                a.imshow(p, cmap="gray")
                a.set_title(f"f{tr.frame_index[r]}\ns{tr.state[r]}", fontsize=7, color="C3" if tr.step[r] >= ev.step else "k")
                a.axis("off")
            fig.suptitle(f"track {ev.track} at ({ev.position_A[0]:.1f}, {ev.position_A[1]:.1f}) Å: state {ev.from_state} -> "
                         f"{ev.to_state} at frame {ev.frame_index}", fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / "decoded_path.png", dpi=110)
            plt.close(fig)
            written.append("decoded_path.png")
    return written


def analyze(log_path: Path, out_dir: Path, *, weights: Optional[Path] = None, device: str = "cpu", truth_path: Optional[Path] = None,
            windows: Sequence[int] = DEFAULT_WINDOWS, n_sigma: float = DEFAULT_N_SIGMA, max_states: int = 6, seed: int = 0, gate_fraction: float = 0.4,
            max_frames: Optional[int] = None, figures: bool = True) -> dict[str, Any]:
    """The command's work, callable from benchmarks: returns the summary (``graph.json``'s content
    is in ``out_dir``)."""
    log = RunLog.open(log_path)
    lat: LogLatents = latent_frames_from_log(log, weights=weights, device=device, max_frames=max_frames)
    truth_file = truth_path or (log.path / TRUTH_FILE)
    truth = read_twin_truth(truth_file) if truth_path is not None or truth_file.is_file() else None
    offset = np.zeros(2)
    if truth is not None:
        offset = register_to_truth(lat.frames, truth)
        assign_true_classes(lat.frames, truth, offset)
    res = analyze_pathways(lat.frames, sample_frame=lat.sample_frame, gate_fraction=gate_fraction, max_states=max_states,
                           window=windows, n_sigma=n_sigma, seed=seed)
    tr = res.trajectories
    score = None
    if truth is not None:
        score = score_events(res.groups, truth, lat.intervals_s, offset, tr)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph = {
        "log": str(log.path), "latents": lat.source, "weights": lat.weights, "frames": len(lat.frames),
        "positions": "drift stage's sample frame" if lat.sample_frame else "scan frame (common shift per frame taken out)",
        "settings": {"windows": list(windows), "n_sigma": n_sigma, "max_states": max_states, "seed": seed, "gate_fraction": gate_fraction},
        "tracks": int(len(np.unique(tr.track))), "observations": len(tr),
        "latent_noise_sigma_per_state": np.round(res.sigma_z, 5).tolist(),
        "states": {"n_states": res.states.n_states, "mixture_components": res.states.components,
                   "state_of_component": [] if res.states.merged is None else res.states.merged.tolist(),
                   "bic": {str(k): round(v, 2) for k, v in res.states.bic.items()},
                   "means_z": np.round(res.states.means, 5).tolist(), "weights": np.round(res.states.weights, 5).tolist()},
        "graph": res.graph.to_dict(),
        "events": [e.to_dict() for e in res.events],
        "event_groups": [[res.events.index(e) for e in g] for g in res.groups],
    }
    if truth is not None:
        counts = np.bincount(tr.true_class[tr.true_class >= 0], minlength=len(truth.class_names))
        graph["truth"] = {"file": str(truth_file), "offset_A": np.round(offset, 4).tolist(),
                          "class_counts": {truth.class_names[i]: int(c) for i, c in enumerate(counts)}, "events": score}
    (out_dir / "graph.json").write_text(json.dumps(graph, indent=1), encoding="utf-8")
    written = ["graph.json", write_table(tr.columns(), out_dir)]
    if figures:
        try:
            import matplotlib  # noqa: F401 - optional (the bench extra)
        except ImportError:  # pragma: no cover
            pass
        else:
            written += _figures(out_dir, res, truth.class_names if truth is not None else None, weights, device)
    return {"out": str(out_dir), "latents": lat.source, "frames": len(lat.frames), "tracks": graph["tracks"],
            "states": res.states.n_states, "events": len(res.events), "event_groups": len(res.groups),
            "transitions": int(res.graph.counts.sum()), "vs_twin_events": score, "files": written}


def parse_windows(text: str) -> list[int]:
    """``"2,6"`` -> ``[2, 6]`` (each between 1 and 50)."""
    try:
        out = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InputError("--windows", text, "must be whole numbers separated by commas, e.g. 2,6") from None
    if not out or min(out) < 1 or max(out) > 50:
        raise InputError("--windows", text, "must be between 1 and 50 frames each")
    return out


@one_line_errors
def analyze_latents(
    log: Path = typer.Argument(..., help="a run log folder (or its documents.jsonl)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: <LOG>_latents)"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="rVAE weights for a log without latents and for decoding "
                                                                  "(default: the shipped ones)"),
    device: str = typer.Option("cpu", help="torch device for replaying and decoding"),
    truth: Optional[Path] = typer.Option(None, "--truth", help=f"the twin's truth (default: {TRUTH_FILE} in the log's folder, if there)"),
    windows: str = typer.Option(",".join(map(str, DEFAULT_WINDOWS)), "--windows", help="frames averaged on each side of a jump: one number or several "
                                                         "(multi-scale), e.g. 3,6"),
    n_sigma: float = typer.Option(DEFAULT_N_SIGMA, min=0.5, help="event threshold: the jumps of an atom and its neighbours together "
                                                                 "(root sum of squares), in units of the noise of a difference of window means"),
    max_states: int = typer.Option(6, min=1, max=20, help="most states the mixture may use (chosen by BIC)"),
    gate_fraction: float = typer.Option(0.4, min=0.05, max=0.49, help="linking gate, fraction of the lattice spacing"),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", min=2, help="read at most this many frames"),
    seed: int = typer.Option(0, help="seed of the mixture"),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="write PNG figures (needs matplotlib)"),
) -> None:
    """Follow every atom's rVAE latents through a run log: states, transition graph, events; writes
    graph.json, the per-atom trajectories and figures."""
    path = log.parent if log.name == "documents.jsonl" else log
    if not path.exists():
        raise InputError("LOG", str(log), "does not exist")
    out_dir = out or path.with_name(path.name + "_latents")
    summary = analyze(path, out_dir, weights=weights, device=device, truth_path=truth, windows=parse_windows(windows), n_sigma=n_sigma,
                      max_states=max_states, seed=seed, gate_fraction=gate_fraction, max_frames=max_frames, figures=figures)
    console.print_json(json.dumps(summary))
