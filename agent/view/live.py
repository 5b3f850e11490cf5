"""The live page's source: what a running agent shows, taken lazily and off its loop.

:class:`LiveSource` is a :class:`~stemagent.agent.summary.TelemetrySink`: on the control loop
its :meth:`publish` only appends the event to a bounded list, notes the frame's arrival and
ready times (wall clock, the browser's) and its drift trace row (four numbers), and bumps a counter
(no copy of the frame, no encoding). The newest observation is the agent's own reference to it (newest wins: frames the
page did not ask for in time are never looked at). :meth:`snapshot` builds the page's document
(downsampling, base64, JSON-ready lists; :mod:`stemagent.agent.view.snapshot`) and is meant to
run in a thread, only when a page is waiting for an update.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import numpy as np

from stemagent.agent.control import ControlAck, ControlMessage
from stemagent.agent.view import snapshot as snap

#: events kept for the page's event list
EVENTS_KEPT = 200
#: drift trace points kept
DRIFT_KEPT = 500
#: the kinds that go to the event list (frames and decisions are drawn, not listed)
LISTED = frozenset({"status", "safety", "fault", "error", "ack", "summary"})


class LiveSource:
    """The view of one running agent; :meth:`attach` it once the agent exists."""

    mode = "live"

    def __init__(self, *, wall: Any = time.time, max_px: int = snap.DISPLAY_MAX_PX) -> None:
        self.agent: Any = None
        self.seq = 0  # grows with every published document: the page's "something new"
        self.changed = asyncio.Event()
        self._wall = wall
        self.max_px = max_px
        self._events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self._frame_walls: deque[float] = deque(maxlen=32)
        # (frame index, arrival wall s, ready wall s) of the newest frames: a snapshot takes the
        # times of the frame it shows, not of one that arrived while it was being built
        self._frame_times: deque[tuple[int, float, float]] = deque(maxlen=16)
        self._drift: deque[list[float]] = deque(maxlen=DRIFT_KEPT)
        self._drift_last: float = -1
        self._built: tuple[int, dict[str, Any]] | None = None  # (frame index, frame part) cache

    # --- on the control loop: cheap ------------------------------------------------------------
    def attach(self, agent: Any) -> None:
        self.agent = agent
        self._bump()

    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        now = self._wall()
        if kind == "frame":
            self._frame_walls.append(now)
            age_s = self.agent.frame_age_s() if self.agent is not None else None
            self._frame_times.append((int(payload.get("frame_index", -1)), now - (age_s or 0.0), now))
            obs = self.agent.last_observation if self.agent is not None else None
            if obs is not None and obs.drift is not None:
                # every frame's drift, page open or not: one row of four numbers (~20 µs), not the
                # estimate with its atoms
                row = snap.drift_row(obs.drift)
                if row is not None and row[0] != self._drift_last:
                    self._drift.append(row)
                    self._drift_last = row[0]
        if kind in LISTED:
            self._events.append({"kind": kind, "wall_s": now, "doc": payload})
        self._bump()

    def _bump(self) -> None:
        self.seq += 1
        self.changed.set()

    def control(self, msg: ControlMessage) -> ControlAck:
        """The agent's own control (logged, acknowledged), or a refusal before it exists."""
        if self.agent is None:
            return ControlAck(id=msg.id, command=msg.command, accepted=False, state="idle", detail="the agent is not running yet")
        ack: ControlAck = self.agent.control(msg)
        return ack

    # --- in a thread: the page's document --------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        agent = self.agent
        seq = self.seq
        doc: dict[str, Any] = {"mode": self.mode, "seq": seq, "state": "idle", "events": self._event_list()}
        if agent is None:
            return doc
        obs = agent.last_observation  # a reference the loop replaces, never changes
        summary = agent.summary
        doc.update(state=agent.sm.state.value, run=getattr(agent.writer, "path", None) and str(agent.writer.path),
                   frames_done=int(summary.frames), max_frames=int(agent.max_frames),
                   target_A=list(agent.target_A) if agent.target_A is not None else None)
        gate = agent.gate
        doc["dose"] = snap.dose_part(getattr(getattr(gate, "map", None), "values", None), gate.peak_dose_e_per_A2,
                                     gate.dose_budget_e_per_A2)
        lat = list(summary.latencies_s)[-200:]
        walls = list(self._frame_walls)
        doc["rates"] = {
            "frames_per_s": (len(walls) - 1) / (walls[-1] - walls[0]) if len(walls) > 1 and walls[-1] > walls[0] else None,
            "latency_ms": lat[-1] * 1e3 if lat else None,
            "latency_ms_p50": float(np.percentile(lat, 50) * 1e3) if lat else None,
            "frames_dropped": int(summary.frames_dropped),
        }
        if obs is None or obs.frame is None:
            return doc
        frame = obs.frame
        for index, arrived_wall_s, ready_wall_s in list(self._frame_times):
            if index == frame.index:
                doc.update(arrived_wall_s=arrived_wall_s, ready_wall_s=ready_wall_s)
        if self._built is not None and self._built[0] == frame.index:
            frame_doc, factor = self._built[1], int(self._built[1]["_factor"])
        else:
            frame_doc, factor = snap.frame_part(frame, self.max_px)
            frame_doc["_factor"] = factor
            self._built = (frame.index, frame_doc)
        doc["frame"] = {k: v for k, v in frame_doc.items() if k != "_factor"}
        doc["atoms"] = snap.atoms_part(obs.atoms, frame.geometry, factor)
        # the newest decision (after a park too: parks do not replace the frame shown)
        doc["decision"] = snap.decision_part(agent.last_decision, frame.geometry, factor)
        doc["timings_ms"] = {k: round(float(v), 2) for k, v in obs.timings_ms.items()}
        if self._drift:
            doc["drift"] = {"trace": list(self._drift)}
        return doc

    def _event_list(self) -> list[dict[str, Any]]:
        return [{"kind": e["kind"], "wall_s": e["wall_s"], "text": describe(e["kind"], e["doc"])} for e in list(self._events)[-50:]]


def describe(kind: str, doc: dict[str, Any]) -> str:
    """One line for the page's event list."""
    if kind == "status":
        return f"{doc.get('previous', '?')} → {doc.get('state', '?')}: {doc.get('reason', '')}"
    if kind == "ack":
        verdict = "accepted" if doc.get("accepted") else "refused"
        detail = f": {doc['detail']}" if doc.get("detail") else ""
        return f"{doc.get('command')} ({doc.get('id') or '-'}) {verdict}, state {doc.get('state')}{detail}"
    if kind == "safety":
        return f"{doc.get('verdict')} by {doc.get('rule')}: {doc.get('detail', '')}"
    if kind == "summary":
        return f"run ended {doc.get('exit_status')}: {doc.get('reason', '')}"
    if kind in ("fault", "error"):
        stage = f"{doc['stage']}: " if doc.get("stage") else ""
        return f"{stage}{doc.get('error', '')}"
    return str(doc)[:200]
