"""The page on a run log (``stemagent view LOG``): the run stepped through frame by frame.

:class:`ReplaySource` indexes the log once (documents only; images are read when shown): for
each logged frame, its atoms, the decision taken on it, its stage timings, the drift estimate,
and the state and events up to it. :meth:`step` chooses the frame shown; :meth:`snapshot`
builds the same document as the live page's (``mode: "replay"``, plus ``replay: {index, count}``).
Control requests are refused: a log cannot be paused.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stemagent.agent.control import ControlAck, ControlMessage
from stemagent.agent.view import snapshot as snap
from stemagent.codec import decode_atoms, decode_decision
from stemagent.errors import InputError
from stemagent.runlog import RunLog
from stemagent.types import Atoms, Decision

STREAMS = ("frames", "atoms", "decisions", "pipeline", "drift", "interruptions", "controls", "safety")


@dataclass
class _Step:
    frame_data: dict[str, Any]
    frame_index: int
    atoms: Atoms | None = None
    decision: Decision | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    drift: dict[str, Any] | None = None
    state: str = "running"
    n_events: int = 0  # events logged before the next frame


class ReplaySource:
    mode = "replay"

    def __init__(self, log: RunLog, *, max_px: int = snap.DISPLAY_MAX_PX) -> None:
        self.log = log
        self.max_px = max_px
        self.seq = 0
        self.changed = asyncio.Event()
        self.index = 0
        self.steps: list[_Step] = []
        self.events: list[dict[str, Any]] = []
        self._state = "running"  # the run's state while indexing
        start = log.start
        cfg: dict[str, Any] = start["config"] if isinstance(start.get("config"), dict) else {}
        self.name = str(start.get("name") or cfg.get("name") or log.path.name)
        self.budget_e_per_A2 = float((cfg.get("safety") or {}).get("dose_budget_e_per_A2", math.nan))
        self.max_frames = int(cfg.get("max_frames") or 0)
        self._index(log)
        if not self.steps:
            raise InputError("LOG", str(log.path), "has no logged frames to show")

    @classmethod
    def open(cls, path: str | Path) -> "ReplaySource":
        return cls(RunLog.open(path))

    def _index(self, log: RunLog) -> None:
        by_frame: dict[int, _Step] = {}
        seen: dict[str, int] = {}
        for stream, d in log.ordered_event_data(*STREAMS):
            k = seen[stream] = seen.get(stream, -1) + 1
            try:
                self._index_one(stream, d, by_frame)
            except InputError:
                raise
            except (KeyError, ValueError, TypeError, AttributeError) as exc:  # a document of the wrong shape
                raise InputError(f"{log.path}: {stream}[{k}]", d, f"cannot be shown ({type(exc).__name__}: {exc})") from None

    def _index_one(self, stream: str, d: dict[str, Any], by_frame: dict[int, _Step]) -> None:
        state = self._state
        if stream == "frames":
            step = _Step(frame_data=d, frame_index=int(d.get("frame_index", len(self.steps))), state=state,
                         n_events=len(self.events))
            self.steps.append(step)
            by_frame[step.frame_index] = step
            return
        fi = d.get("frame_index")
        step_of = by_frame.get(int(fi)) if isinstance(fi, int) else None
        if stream == "atoms" and step_of is not None:
            step_of.atoms = decode_atoms(d, f"atoms[frame_index={fi}]")
        elif stream == "decisions" and step_of is not None and d.get("observation") == "frame":
            step_of.decision = decode_decision({k: d[k] for k in ("command", "policy", "reason", "scores") if k in d},
                                               f"decisions[frame_index={fi}]")
        elif stream == "pipeline" and step_of is not None and d.get("observation") == "frame":
            step_of.timings_ms = {k: float(v) for k, v in (d.get("timings_ms") or {}).items()}
        elif stream == "drift" and step_of is not None:
            step_of.drift = d
        elif stream in ("interruptions", "controls", "safety"):
            if stream == "interruptions" and d.get("kind") == "state":
                state = self._state = str(d.get("state", state))
            self.events.append({"kind": stream, "t_s": d.get("t_s"), "text": _describe(stream, d)})
            if self.steps:  # shown with the frame they followed
                self.steps[-1].state = state
                self.steps[-1].n_events = len(self.events)

    @property
    def count(self) -> int:
        return len(self.steps)

    def step(self, index: int) -> int:
        """Show observation ``index`` (0-based); raises IndexError naming the range."""
        if not 0 <= index < len(self.steps):
            raise IndexError(f"index={index}: the log has observations 0..{len(self.steps) - 1}")
        self.index = index
        self.seq += 1
        self.changed.set()
        return index

    def control(self, msg: ControlMessage) -> ControlAck:
        return ControlAck(id=msg.id, command=msg.command, accepted=False, state="replay", detail="a run log cannot be controlled")

    def snapshot(self) -> dict[str, Any]:
        i = self.index
        s = self.steps[i]
        frame = self.log.frame_from_data(s.frame_data)
        frame_doc, factor = snap.frame_part(frame, self.max_px)
        doc: dict[str, Any] = {
            "mode": self.mode, "seq": self.seq, "state": s.state, "run": f"{self.name} ({self.log.path})",
            "frames_done": i + 1, "max_frames": self.count, "replay": {"index": i, "count": self.count},
            "frame": frame_doc, "timings_ms": {k: round(v, 2) for k, v in s.timings_ms.items()},
            "dose": {**snap.dose_part(None, float(frame.dose_e_per_A2), self.budget_e_per_A2),
                     "frame_dose_e_per_A2": float(frame.dose_e_per_A2)},
            "events": [{"kind": e["kind"], "wall_s": None, "text": e["text"]} for e in self.events[max(0, s.n_events - 50): s.n_events]],
        }
        if s.atoms is not None:
            doc["atoms"] = snap.atoms_part(s.atoms, frame.geometry, factor)
        doc["decision"] = snap.decision_part(s.decision, frame.geometry, factor)
        trace = []
        for prev in self.steps[: i + 1]:
            if prev.drift is not None:
                row = snap.drift_row(_DriftDoc(prev.drift))
                if row is not None:
                    trace.append(row)
        if trace:
            doc["drift"] = {"trace": trace[-500:]}
        return doc


class _DriftDoc:
    """A logged drift document read like a drift estimate (for :func:`snapshot.drift_row`)."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.frame_index = int(d.get("frame_index", -1))
        self.displacement_A = d.get("displacement_A") or []
        self.std_A = d.get("std_A") or []


def _describe(stream: str, d: dict[str, Any]) -> str:
    if stream == "interruptions":
        return f"{d.get('kind')}: {d.get('reason', '')}"
    if stream == "controls":
        return f"{d.get('command')} ({d.get('id') or '-'}) {'accepted' if d.get('accepted') else 'refused'}" + (
            f": {d['detail']}" if d.get("detail") else "")
    return f"{d.get('verdict')} by {d.get('rule')}: {d.get('detail', '')}"
