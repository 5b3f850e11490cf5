"""``stemagent report LOG``: what a run did, from its log alone.

:func:`summarize` reads a :class:`~stemagent.runlog.RunLog` and returns a JSON-able summary:

- ``run``: name, log version, exit status, stop reason, whether the log was cut short;
- ``frames``: logged, analysed, dropped (newest-wins), not analysed (bad input), atoms per frame;
- ``stages``: per stage, observations, wall time p50 / p95 / max (ms) and errors; ``total`` is
  the whole pipeline per observation;
- ``dose``: the budget (the configured one and the last one the operator set) and the peak dose
  used, rebuilt from the commands sent with the dose model of :mod:`stemagent.dose` (scans and
  parks; the short idle before each blank is not counted, so the gate's own figure is a little
  higher); the dose map is a figure;
- ``decisions``: by what they were decided on (frame, park, refused) and by command kind;
  ``commands``: sent, refused by the gate (by rule) and by the device;
- ``faults``: faults, stage errors, bad input, failed blanks, signals, pauses, controls;
- ``parks``: count and total dwell; ``motifs``: the motif library at the end (encoding stage);
  ``latents``: atoms the rVAE stage encoded and its weights' version;
  ``events``: the policy's own streams and their counts.

:func:`write_report` writes ``report.md`` and ``report.html`` (and the figures of
:mod:`stemagent.agent.app.report_figures` as PNG when matplotlib is installed) into a folder,
by default the run's own. A log with no frames, a torn last line or an unreadable frame still
gets its report (what it holds), and says so.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from stemagent.codec import decode_command
from stemagent.dose import DoseMap, park_footprint, scan_footprint
from stemagent.errors import InputError
from stemagent.runlog import RunLog
from stemagent.types import Park, ScanRegion

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "max_ms": float(a.max())} if a.size else {"n": 0, "p50_ms": 0.0, "p95_ms": 0.0, "max_ms": 0.0}


def _streams(log: RunLog, name: str) -> list[dict[str, Any]]:
    return log.event_data(name) if name in log.streams() else []


def stage_timings(log: RunLog) -> dict[str, dict[str, float]]:
    """Per stage (and ``total``): observations and wall-time percentiles over the ``pipeline`` stream."""
    per: dict[str, list[float]] = {}
    total: list[float] = []
    errors: Counter[str] = Counter()
    for d in _streams(log, "pipeline"):
        t = d.get("timings_ms") or {}
        for stage, ms in t.items():
            per.setdefault(stage, []).append(float(ms))
        if t:
            total.append(float(sum(float(v) for v in t.values())))
        errors.update((d.get("errors") or {}).keys())
    out = {stage: {**_pct(v), "errors": int(errors.get(stage, 0))} for stage, v in per.items()}
    if total:
        out["total"] = {**_pct(total), "errors": int(sum(errors.values()))}
    return out


def dose_map(log: RunLog) -> tuple[DoseMap | None, str]:
    """The dose map of the commands the run sent (scans and parks), and a note of what it leaves out."""
    cfg = log.start.get("config") or {}
    safety = cfg.get("safety") or {}
    caps = log.start.get("capabilities") or {}
    current = float(log.start.get("beam_current_pA") or caps.get("beam_current_pA") or 0.0)
    fwhm = float(safety.get("probe_fwhm_A", 0.8))
    if caps.get("probe_fwhm_A"):
        fwhm = min(fwhm, float(caps["probe_fwhm_A"]))
    try:
        dm = DoseMap(tuple(safety.get("area_center_A", (0.0, 0.0))), float(safety.get("area_half_width_A", 150.0)) + 10.0,
                     float(safety.get("dose_cell_A", 1.0)))
    except (TypeError, ValueError) as exc:
        return None, f"no dose map: {exc}"
    for d in _streams(log, "commands"):
        if d.get("outcome") != "sent":
            continue
        try:
            cmd = decode_command(d.get("command"), "commands.command")
        except InputError:
            continue
        for _ in range(max(1, int(d.get("frames", 1) or 1))):
            if isinstance(cmd, ScanRegion):
                dm.add(scan_footprint(dm, cmd.geometry, current, fwhm, flyback_blanked=bool(safety.get("flyback_blanked"))).increment)
            elif isinstance(cmd, Park):
                dm.add(park_footprint(dm, cmd.position_A, cmd.dwell_s, current, fwhm).increment)
    return dm, "scans and parks sent (the idle beam before each blank is not counted)"


def summarize(log: RunLog) -> dict[str, Any]:
    """The run's summary (see the module docstring)."""
    start, stop = log.start, log.stop
    cfg = start.get("config") or {}
    frames = _streams(log, "frames")
    pipeline = _streams(log, "pipeline")
    analysed = [d for d in pipeline if d.get("observation") == "frame"]
    atoms = _streams(log, "atoms")
    n_atoms = [int(a.get("n_atoms", len(a.get("positions_A", [])))) for a in atoms]
    drops = _streams(log, "drops")
    decisions = _streams(log, "decisions")
    commands = _streams(log, "commands")
    safety = _streams(log, "safety")
    inter = _streams(log, "interruptions")
    controls = _streams(log, "controls")
    parks = _streams(log, "parks")
    kinds = Counter(str(e.get("kind")) for e in inter)
    budget = float((cfg.get("safety") or {}).get("dose_budget_e_per_A2", (cfg.get("safety") or {}).get("max_total_dose_e_per_A2", 0.0)) or 0.0)
    budget_now = budget
    for c in controls:
        if c.get("accepted") and c.get("command") == "set_dose_budget":
            budget_now = float((c.get("arguments") or {}).get("value", budget_now))
    dm, dose_note = dose_map(log)
    peak = dm.peak if dm is not None else 0.0
    analysed_frames = len(analysed) if pipeline else len(atoms)
    events = {s: len(log.event_data(s)) for s in log.streams() if s not in (
        "frames", "atoms", "decisions", "commands", "safety", "interruptions", "parks", "controls", "pipeline", "drops", "motifs", "latents")}
    motifs = _streams(log, "motifs")
    latents = _streams(log, "latents")
    enc = [((d.get("records") or {}).get("encoding") or {}) for d in analysed]
    enc = [e for e in enc if "library_size" in e]
    return {
        "run": {
            "name": cfg.get("name", start.get("run_name", "?")), "path": str(log.path),
            "log_version": start.get("stemagent_log_version"), "driver": start.get("driver_kind", "?"),
            "policy": (cfg.get("policy") or {}).get("kind", "?"), "stages": (start.get("pipeline") or {}).get("stages", []),
            "exit_status": stop.get("exit_status", "unknown (no stop document: the run did not close its log)") if stop else
            "unknown (no stop document: the run did not close its log)",
            "stop_reason": (stop or {}).get("reason", ""), "truncated": bool(log.truncated),
            "wall_s": float(stop["time"] - start["time"]) if stop and "time" in stop and "time" in start else None,
        },
        "frames": {
            "logged": len(frames), "analysed": analysed_frames, "dropped": len(drops),
            "not_analysed": max(0, len(frames) - analysed_frames - len(drops)),
            "atoms_total": int(sum(n_atoms)), "atoms_per_frame": float(np.mean(n_atoms)) if n_atoms else 0.0,
        },
        "stages": stage_timings(log),
        "dose": {"budget_e_per_A2": budget, "budget_at_end_e_per_A2": budget_now, "peak_e_per_A2": peak,
                 "used_fraction": peak / budget_now if budget_now > 0 else None, "note": dose_note,
                 "frames_dose_e_per_A2": float(sum(float(f.get("dose_e_per_A2", 0.0)) for f in frames))},
        "decisions": {
            "total": len(decisions),
            "by_observation": dict(Counter(str(d.get("observation", "frame")) for d in decisions)),
            "by_command": dict(Counter(str((d.get("command") or {}).get("kind", "?")) for d in decisions)),
            "by_policy": dict(Counter(str(d.get("policy", "?")) for d in decisions)),
        },
        "commands": {
            "sent": sum(int(c.get("frames", 1) or 1) for c in commands if c.get("outcome") == "sent"),
            "refused_by_gate": sum(1 for c in commands if c.get("outcome") == "refused"),
            "refused_by_device": sum(1 for c in commands if c.get("outcome") == "refused_by_device"),
            "refusal_rules": dict(Counter(str(s.get("rule")) for s in safety if s.get("verdict") == "refused")),
            "dose_reports_over_prediction": sum(1 for s in safety if s.get("verdict") == "paused"),
        },
        "faults": {k: int(kinds.get(k, 0)) for k in ("fault", "stage_error", "bad_input", "blank_failed", "signal", "recovered")}
        | {"controls": len(controls)},
        "parks": {"count": len(parks), "dwell_s": float(sum(float(p.get("dwell_s", 0.0)) for p in parks))},
        "motifs": {"frames": len(motifs), "library_size": int(enc[-1]["library_size"]) if enc else 0,
                   "reclustered_frames": sum(1 for e in enc if e.get("reclustered")),
                   "last_counts": enc[-1].get("motif_counts", {}) if enc else {}} if motifs or enc else {},
        "latents": {"frames": len(latents), "encoded_atoms": int(sum(sum(bool(e) for e in d.get("encoded", [])) for d in latents)),
                    "weights": sorted({str(d.get("weights", "")) for d in latents})} if latents else {},
        "events": events,
        "hops": hop_summary(log),
    }


def hop_summary(log: RunLog) -> dict[str, Any]:
    """A manipulation run's hops (the policy's ``outcomes`` and ``plans`` streams): the outcome of
    each park checked, by kind (``intended`` is a hop along the plan), and the re-plans; empty
    when the log has none."""
    outcomes, plans = _streams(log, "outcomes"), _streams(log, "plans")
    if not outcomes and not plans:
        return {}
    kinds = Counter(str(o.get("kind")) for o in outcomes)
    return {"parks_checked": len(outcomes), "by_outcome": dict(kinds), "hops_intended": int(kinds.get("intended", 0)),
            "hops_elsewhere": int(kinds.get("other_site", 0)),
            "replans": sum(1 for d in plans if str(d.get("why", "")).startswith("re-planned")),
            "end": next((str(d.get("reason", "")) for d in reversed(plans) if d.get("event") == "stop"), "")}


def _table(rows: list[list[Any]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _g(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def markdown(summary: dict[str, Any], figures: list[tuple[str, str]] | None = None, notes: list[str] | None = None) -> str:
    """The report as Markdown (figures: ``(file name, caption)``)."""
    r, f, d, c, dec = summary["run"], summary["frames"], summary["dose"], summary["commands"], summary["decisions"]
    out = [f"# Run report: {r['name']}", "",
           f"- log: `{r['path']}` (format {r['log_version']}{', cut short: its last line was torn' if r['truncated'] else ''})",
           f"- driver {r['driver']}, policy {r['policy']}, stages {' -> '.join(r['stages']) or '?'}",
           f"- ended **{r['exit_status']}**: {r['stop_reason'] or '-'}" + (f" after {r['wall_s']:.3g} s" if r["wall_s"] else ""),
           f"- frames: {f['logged']} logged, {f['analysed']} analysed, {f['dropped']} dropped (analysis behind), "
           f"{f['not_analysed']} not analysed; {f['atoms_per_frame']:.4g} atoms per frame ({f['atoms_total']} in all)",
           f"- dose: peak {d['peak_e_per_A2']:.4g} e/Å² of a budget of {d['budget_at_end_e_per_A2']:.4g} e/Å²"
           + (f" ({100 * d['used_fraction']:.3g} %)" if d["used_fraction"] is not None else "") + f"; {d['note']}",
           f"- commands: {c['sent']} sent, {c['refused_by_gate']} refused by the gate"
           + (f" (rules {c['refusal_rules']})" if c["refusal_rules"] else "") + ", "
           f"{c['refused_by_device']} by the device; {c['dose_reports_over_prediction']} dose reports above prediction",
           f"- decisions: {dec['total']} ({', '.join(f'{k} {v}' for k, v in dec['by_observation'].items()) or 'none'}; "
           f"commands {', '.join(f'{k} {v}' for k, v in dec['by_command'].items()) or '-'})",
           f"- faults and interruptions: {', '.join(f'{k} {v}' for k, v in summary['faults'].items())}",
           f"- parks: {summary['parks']['count']} ({summary['parks']['dwell_s']:.4g} s in all)"]
    if summary["motifs"]:
        m = summary["motifs"]
        out.append(f"- motifs: library of {m['library_size']} after {m['frames']} frames ({m['reclustered_frames']} reclustered); "
                   f"last frame {m['last_counts']}")
    if summary.get("latents"):
        lt = summary["latents"]
        out.append(f"- rVAE latents: {lt['encoded_atoms']} atoms encoded over {lt['frames']} frames (weights {', '.join(lt['weights'])})")
    if summary.get("hops"):
        h = summary["hops"]
        out.append(f"- hops: {h['hops_intended']} along the plan, {h['hops_elsewhere']} elsewhere, in {h['parks_checked']} "
                   f"parks checked ({h['by_outcome']}); {h['replans']} re-plans" + (f"; ended: {h['end']}" if h["end"] else ""))
    if summary["events"]:
        out.append(f"- the policy's own streams: {summary['events']}")
    out += ["", "## Stage wall times per observation (ms)", ""]
    rows = [[s, t["n"], _g(t["p50_ms"]), _g(t["p95_ms"]), _g(t["max_ms"]), t["errors"]] for s, t in summary["stages"].items()]
    out.append(_table(rows, ["stage", "observations", "p50", "p95", "max", "errors"]) if rows else "(no pipeline stream in this log)")
    for note in notes or []:
        out += ["", f"_{note}_"]
    for name, caption in figures or []:
        out += ["", f"![{caption}]({name})", "", f"*{caption}*"]
    return "\n".join(out) + "\n"


def html_page(summary: dict[str, Any], md: str, figures: list[tuple[str, str]]) -> str:
    """The report as one HTML page: the summary, the figures side by side, the JSON."""
    imgs = "".join(f'<figure><img src="{html.escape(n)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
                   for n, c in figures)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>stemagent run report</title>"
            "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:1em;vertical-align:top}"
            "img{max-width:520px}pre{background:#f4f4f4;padding:1em;white-space:pre-wrap}</style></head><body>"
            f"<pre>{html.escape(md)}</pre>{imgs}<h2>summary (JSON)</h2><pre>{html.escape(json.dumps(summary, indent=1))}</pre>"
            "</body></html>\n")


def write_report(log: RunLog, out_dir: Path | None = None, figures: bool = True) -> tuple[dict[str, Any], Path, str]:
    """Write ``report.md``, ``report.html`` and the figures; returns (summary, markdown path, markdown)."""
    out = Path(out_dir) if out_dir is not None else log.path
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError("report folder", str(out), f"cannot be created ({exc.strerror or exc})") from None
    summary = summarize(log)
    notes: list[str] = []
    made: list[tuple[str, str]] = []
    if figures:
        try:
            # heavy (matplotlib, ~1 s); optional: the bench extra
            from stemagent.agent.app.report_figures import draw_figures
        except ImportError as exc:
            notes.append(f"no figures: {exc} (pip install 'stemagent[bench]')")
        else:
            made, why = draw_figures(log, out, dose_map(log)[0])
            notes += why
    md = markdown(summary, made, notes)
    md_path = out / REPORT_MD
    try:
        md_path.write_text(md, encoding="utf-8")
        (out / REPORT_HTML).write_text(html_page(summary, md, made), encoding="utf-8")
    except OSError as exc:
        raise InputError("report folder", str(out), f"cannot be written ({exc.strerror or exc})") from None
    return summary, md_path, md
