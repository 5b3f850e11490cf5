"""What a run shows at the console: where things go at start, a live status line, the summary.

- :func:`announce`: the run log's folder and, with telemetry on, the MQTT broker, the topics the
  agent publishes and the control topic (printed on stderr when the run starts);
- :class:`StatusLine`: a telemetry sink that keeps one line up to date while the run goes on:
  frame count, state, peak dose against the budget, the last decision and the latency from a
  frame's arrival to the next command. On a terminal it is a live line (rich) that disappears
  at the end; elsewhere (a log file, CI) it prints a plain line every ``every_s`` seconds;
- :class:`Tee`: publishes to several sinks (MQTT and the status line).

Every method here never blocks and never raises into the agent.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from rich.console import Console
from rich.live import Live
from rich.text import Text

from stemagent.agent.loop import Agent, TelemetrySink
from stemagent.config import RunConfig

log = logging.getLogger("stemagent.agent.app.console")

#: the kinds the agent publishes (README, "Transport and telemetry")
PUBLISHED = ("status", "frame", "decision", "safety", "fault", "error", "summary", "ack")


def announce(console: Console, cfg: RunConfig, run_id: str, log_path: str, telemetry: Any) -> None:
    """Where the run's log and telemetry go, printed once at start."""
    console.print(f"run {cfg.name} ({run_id}): log [bold]{log_path}[/]", highlight=False)
    base = getattr(telemetry, "base", None)
    if base is None:
        console.print("telemetry: off (no telemetry.host in the config)", highlight=False)
        return
    t = cfg.telemetry
    console.print(f"telemetry: mqtt{'s' if t.tls else ''}://{t.host}:{t.port}, publishing {base}/{{{','.join(PUBLISHED)}}}; "
                  f"control on {base}/control", highlight=False)


class Tee:
    """A :class:`~stemagent.agent.loop.TelemetrySink` that publishes to every sink it holds."""

    def __init__(self, *sinks: TelemetrySink | None) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        for sink in self.sinks:
            try:
                sink.publish(kind, payload)
            except Exception:  # noqa: BLE001 - a sink must never take the loop down
                log.exception("telemetry sink %r failed", type(sink).__name__)


class StatusLine:
    """The live status line (see the module docstring). Attach the agent with :meth:`start`."""

    def __init__(self, console: Console, *, every_s: float = 10.0, wall: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.every_s = every_s
        self._wall = wall
        self._agent: Agent | None = None
        self._live: Live | None = None
        self._last_plain = wall()
        self.state = "idle"
        self.frame = -1
        self.decision = ""

    def start(self, agent: Agent) -> None:
        self._agent = agent
        if self.console.is_terminal:
            self._live = Live(self.render(), console=self.console, transient=True, refresh_per_second=4,
                              get_renderable=self.render)
            self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def line(self) -> str:
        a = self._agent
        if a is None:
            return f"{self.state}"
        s = a.summary
        budget = a.gate.dose_budget_e_per_A2
        lat = list(s.latencies_s)[-20:]
        latency = f"{1e3 * sorted(lat)[len(lat) // 2]:.0f} ms" if lat else "-"
        parts = [
            f"frame {s.frames}/{a.max_frames}",
            self.state,
            f"dose {a.gate.peak_dose_e_per_A2:.3g}/{budget:.3g} e/Å²",
            f"latency {latency}",
        ]
        if s.frames_dropped:
            parts.append(f"dropped {s.frames_dropped}")
        if s.commands_refused:
            parts.append(f"refused {s.commands_refused}")
        if s.faults:
            parts.append(f"faults {s.faults}")
        if self.decision:
            parts.append(f"last: {self.decision}")
        return " | ".join(parts)

    def render(self) -> Text:
        return Text(self.line(), no_wrap=True, overflow="ellipsis")

    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "status":
            self.state = str(payload.get("state", self.state))
        elif kind == "frame":
            self.frame = int(payload.get("frame_index", self.frame))
        elif kind == "decision":
            cmd = payload.get("command", {})
            where = cmd.get("geometry", {}).get("center_A") if cmd.get("kind") == "scan" else cmd.get("position_A")
            at = f" at ({where[0]:.1f}, {where[1]:.1f}) Å" if isinstance(where, list) and len(where) == 2 else ""
            self.decision = f"{payload.get('policy', '?')}: {cmd.get('kind', '?')}{at}"
        else:
            return
        if self._live is None and self._wall() - self._last_plain >= self.every_s:
            self._last_plain = self._wall()
            self.console.print(self.line(), highlight=False, soft_wrap=True)
