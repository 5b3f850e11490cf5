"""The run report's figures (PNG, matplotlib's Agg backend; ``stemagent[bench]``).

- ``report_last_frame.png``: the last frame that can be read, its atoms coloured by class (or by
  motif when the encoding stage ran) and the next command (the field it scans, or the park);
- ``report_dose.png``: the dose map of the commands sent against the budget, with every scanned
  field (the acquisition map) and the parks;
- ``report_timings.png``: each stage's wall time per observation;
- ``report_drift.png``: the drift stage's estimate over time with its band, when the log has one;
- ``report_hops.png``: a manipulation run's hop history: every planned path of the dopant in the
  sample frame (older plans paler) and the outcome of each park checked.

:func:`draw_figures` returns the figures made and notes on what could not be drawn (never raises
on what a log lacks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, Polygon  # noqa: E402

from stemagent.codec import decode_atoms, decode_command  # noqa: E402
from stemagent.dose import DoseMap  # noqa: E402
from stemagent.errors import InputError  # noqa: E402
from stemagent.runlog import RunLog  # noqa: E402
from stemagent.types import Park, ScanGeometry, ScanRegion  # noqa: E402


def _field(ax: Any, g: ScanGeometry, **kw: Any) -> None:
    rows, cols = g.shape_px
    corners = g.pixel_to_sample(np.array([[0, 0], [0, cols - 1], [rows - 1, cols - 1], [rows - 1, 0]], dtype=float))
    ax.add_patch(Polygon(corners, closed=True, fill=False, **kw))


def last_frame(log: RunLog, out: Path) -> tuple[str, str] | None:
    frames = log.event_data("frames")
    atoms = {int(a["frame_index"]): a for a in log.event_data("atoms")}
    motifs = {int(m["frame_index"]): m for m in log.event_data("motifs")} if "motifs" in log.streams() else {}
    for d in reversed(frames):
        try:
            frame = log.frame_from_data(d)
        except InputError:
            continue
        fig, ax = plt.subplots(figsize=(6, 6))
        g = frame.geometry
        rows, cols = g.shape_px
        corners = g.pixel_to_sample(np.array([[0, 0], [rows - 1, cols - 1]], dtype=float))
        if abs(g.rotation_rad) < 1e-9:
            ax.imshow(frame.image, cmap="gray", origin="upper",
                      extent=(corners[0][0], corners[1][0], corners[1][1], corners[0][1]))
        caption = f"frame {frame.index}"
        a = atoms.get(frame.index)
        if a is not None:
            at = decode_atoms(a, "atoms")
            m = motifs.get(frame.index)
            if m is not None and len(m["motif"]) == len(at):
                colour, label = np.asarray(m["motif"]), "motif"
            else:
                colour, label = at.classes, "class"
            sc = ax.scatter(at.positions_A[:, 0], at.positions_A[:, 1], c=colour, s=12, cmap="tab10", vmin=-1, vmax=9)
            fig.colorbar(sc, ax=ax, label=label, fraction=0.046)
            caption += f": {len(at)} atoms coloured by {label}"
        nxt = [c for c in log.event_data("commands") if c.get("outcome") == "sent"]
        if nxt:
            try:
                cmd = decode_command(nxt[-1]["command"], "command")
            except InputError:
                cmd = None
            if isinstance(cmd, ScanRegion):
                _field(ax, cmd.geometry, edgecolor="tab:orange", lw=2)
                caption += "; the last command's field in orange"
            elif isinstance(cmd, Park):
                ax.plot(*cmd.position_A, "x", color="tab:red", ms=14, mew=3)
                caption += "; the last park (red cross)"
        ax.set_xlabel("x (Å)")
        ax.set_ylabel("y (Å)")
        ax.set_aspect("equal")
        ax.autoscale()
        fig.tight_layout()
        fig.savefig(out / "report_last_frame.png", dpi=90)
        plt.close(fig)
        return "report_last_frame.png", caption
    return None


def dose(log: RunLog, out: Path, budget: float, dm: DoseMap | None) -> tuple[str, str] | None:
    if dm is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    n = dm.shape[0]
    x0, y0 = dm.origin_A
    ext = (x0, x0 + n * dm.cell_A, y0, y0 + n * dm.cell_A)
    im = ax.imshow(dm.values / budget if budget > 0 else dm.values, origin="lower", extent=ext, cmap="magma", vmin=0,
                   vmax=max(1e-12, float((dm.values / budget).max()) if budget > 0 else float(dm.values.max())))
    fig.colorbar(im, ax=ax, label="dose / budget" if budget > 0 else "dose (e/Å²)")
    for c in log.event_data("commands"):
        if c.get("outcome") != "sent":
            continue
        try:
            cmd = decode_command(c["command"], "command")
        except InputError:
            continue
        if isinstance(cmd, ScanRegion):
            _field(ax, cmd.geometry, edgecolor="cyan", lw=0.8)
        elif isinstance(cmd, Park):
            ax.add_patch(Circle(cmd.position_A, 0.5, color="lime"))
    ax.set_xlabel("x (Å)")
    ax.set_ylabel("y (Å)")
    fig.tight_layout()
    fig.savefig(out / "report_dose.png", dpi=90)
    plt.close(fig)
    return "report_dose.png", f"dose map against the budget (peak {dm.peak:.3g} e/Å²); fields scanned in cyan, parks in green"


def timings(log: RunLog, out: Path) -> tuple[str, str] | None:
    per: dict[str, list[tuple[int, float]]] = {}
    rows = log.event_data("pipeline") if "pipeline" in log.streams() else []
    for i, d in enumerate(rows):
        for stage, ms in (d.get("timings_ms") or {}).items():
            per.setdefault(stage, []).append((i, float(ms)))
    if not per:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for stage, pts in per.items():
        a = np.asarray(pts)
        ax.plot(a[:, 0], a[:, 1], ".-", label=stage, ms=3, lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("observation")
    ax.set_ylabel("wall time (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "report_timings.png", dpi=90)
    plt.close(fig)
    return "report_timings.png", "per-stage wall time of every observation"


def drift(log: RunLog, out: Path) -> tuple[str, str] | None:
    """The drift stage's records, when they carry a time and a 2-vector estimate (and a band)."""
    pts = []
    for d in log.event_data("pipeline") if "pipeline" in log.streams() else []:
        rec = (d.get("records") or {}).get("drift") or {}
        off = rec.get("offset_A") or rec.get("drift_A")
        t = rec.get("t_s", rec.get("time_s"))
        if isinstance(off, list) and len(off) == 2 and t is not None:
            raw: Any = rec.get("sigma_A") or rec.get("std_A") or [0.0, 0.0]
            band = [float(v) for v in raw] if isinstance(raw, list) and len(raw) == 2 else [float(raw), float(raw)]
            pts.append((float(t), float(off[0]), float(off[1]), band[0], band[1]))
    if not pts:
        return None
    a = np.asarray(pts)
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, name in ((1, "x"), (2, "y")):
        ax.plot(a[:, 0], a[:, k], label=f"drift {name}")
        ax.fill_between(a[:, 0], a[:, k] - 2 * a[:, k + 2], a[:, k] + 2 * a[:, k + 2], alpha=0.3)
    ax.set_xlabel("t (s)")
    ax.set_ylabel("Å")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "report_drift.png", dpi=90)
    plt.close(fig)
    return "report_drift.png", "drift estimate with its 2-sigma band"


#: outcome kinds of a checked park, in the order the hop figure stacks them
OUTCOME_KINDS = ("intended", "other_site", "none", "damage")


def hops(log: RunLog, out: Path) -> tuple[str, str] | None:
    """The hop history of a manipulation run (its ``plans`` and ``outcomes`` streams), or None."""
    streams = log.streams()
    plans = [d for d in log.event_data("plans") if isinstance(d.get("path_A"), list)] if "plans" in streams else []
    outcomes = log.event_data("outcomes") if "outcomes" in streams else []
    if not plans and not outcomes:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.2))
    for i, d in enumerate(plans):
        path = np.asarray(d["path_A"], dtype=float).reshape(-1, 2)
        shade = 0.25 + 0.75 * (i + 1) / len(plans)
        ax.plot(path[:, 0], path[:, 1], "-o", ms=3, color=(0.1, 0.3, 0.8, shade), label=d.get("why") if i in (0, len(plans) - 1) else None)
        if len(path):
            ax.plot(*path[0], "s", color="tab:orange", ms=6)
            ax.plot(*path[-1], "*", color="tab:red", ms=10)
    ax.set_aspect("equal")
    ax.set_xlabel("x (Å)")
    ax.set_ylabel("y (Å)")
    ax.set_title(f"planned paths ({len(plans)}): dopant (square) to target (star)", fontsize=9)
    if plans:
        ax.legend(fontsize=7)
    kinds = [str(o.get("kind")) for o in outcomes]
    order = list(OUTCOME_KINDS) + sorted(set(kinds) - set(OUTCOME_KINDS))
    bx.scatter([int(o.get("park", i)) for i, o in enumerate(outcomes)], [order.index(k) for k in kinds], c="tab:green")
    bx.set_yticks(range(len(order)), order)
    bx.set_xlabel("park")
    bx.set_title(f"outcome of each park checked ({len(outcomes)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "report_hops.png", dpi=90)
    plt.close(fig)
    return "report_hops.png", "hop history: planned paths and the outcome of each park checked"


def draw_figures(log: RunLog, out: Path, dm: DoseMap | None) -> tuple[list[tuple[str, str]], list[str]]:
    """Every figure the log allows (``dm``: the run's dose map): ``([(file, caption)], [notes])``."""
    cfg = log.start.get("config") or {}
    safety = cfg.get("safety") or {}
    budget = float(safety.get("dose_budget_e_per_A2", safety.get("max_total_dose_e_per_A2", 0.0)) or 0.0)
    made: list[tuple[str, str]] = []
    notes: list[str] = []
    for name, draw in (("last frame", lambda: last_frame(log, out)), ("dose map", lambda: dose(log, out, budget, dm)),
                       ("stage timings", lambda: timings(log, out)), ("drift", lambda: drift(log, out)),
                       ("hops", lambda: hops(log, out))):
        try:
            fig = draw()
        except Exception as exc:  # noqa: BLE001 - a figure that fails must not lose the report
            plt.close("all")
            notes.append(f"figure {name} failed: {type(exc).__name__}: {exc}")
            continue
        if fig is not None:
            made.append(fig)
        elif name in ("last frame",):
            notes.append("no frame could be read for the last-frame figure")
    return made, notes
