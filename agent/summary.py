"""What a run reports: the summary at its end, and the telemetry sinks it publishes to while it runs."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol


class TelemetrySink(Protocol):
    """Where status, frame summaries and decisions go (MQTT, or nothing). Must never block or raise."""

    def publish(self, kind: str, payload: dict[str, Any]) -> None: ...


class NullTelemetry:
    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        return None


@dataclass
class RunSummary:
    log_path: str
    state: str
    exit_status: str = "success"
    frames: int = 0
    atoms_per_frame: float = 0.0
    commands_sent: int = 0
    commands_refused: int = 0
    parks: int = 0
    faults: int = 0
    pauses: int = 0
    peak_dose_e_per_A2: float = 0.0
    beam_current_pA: float = 0.0
    elapsed_s: float = 0.0
    sim_time_s: float = 0.0
    reason: str = ""
    beam_blanked_at_end: bool = True
    frames_dropped: int = 0
    stage_errors: int = 0
    latency_ms_p50: float = 0.0
    latency_ms_p95: float = 0.0
    atom_counts: list[int] = field(default_factory=list)
    #: wall time from a frame's (or park's) arrival to the next command's issue, s (the last 10 000)
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("atom_counts")
        d.pop("latencies_s")
        return d
