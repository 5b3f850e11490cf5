"""The console: where the log and telemetry go, a status line while running, the summary on every way out."""

from __future__ import annotations

import io
import json

from agent_doubles import scripted_agent
from rich.console import Console
from typer.testing import CliRunner

from stemagent.agent.app.cli import app
from stemagent.agent.app.console import StatusLine, Tee, announce
from stemagent.config import config_from_dict


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def test_the_status_line_says_frame_state_dose_decision_and_latency(tmp_path):
    out = io.StringIO()
    wall = Clock()
    status = StatusLine(Console(file=out, force_terminal=False, width=200), every_s=10.0, wall=wall)
    seen: list[str] = []
    agent, _ = await scripted_agent(tmp_path, max_frames=3)
    agent.telemetry = Tee(status, type("Sink", (), {"publish": lambda self, k, p: seen.append(k)})())
    status.start(agent)
    wall.t = 11.0  # the next update prints a plain line (not a terminal)
    summary = await agent.run()
    status.stop()
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("frame ")
    final = status.line()
    assert final.startswith(f"frame 3/3 | {summary.state} | dose ") and "e/Å²" in final
    assert "latency" in final and "last: raster: scan at (" in final
    assert "frame" in seen and "decision" in seen  # the tee fed both sinks


def test_announce_names_the_log_and_the_topics():
    out = io.StringIO()
    cfg = config_from_dict({"name": "demo", "telemetry": {"host": "broker.lab", "port": 1884}})
    sink = type("Mqtt", (), {"base": "stemagent/demo/RID"})()
    announce(Console(file=out, width=300), cfg, "RID", "runs/demo-RID", sink)
    text = out.getvalue()
    assert "log runs/demo-RID" in text and "mqtt://broker.lab:1884" in text
    assert "stemagent/demo/RID/{status,frame,decision,safety,fault,error,summary,ack}" in text
    assert "control on stemagent/demo/RID/control" in text
    out = io.StringIO()
    announce(Console(file=out, width=300), config_from_dict({}), "RID", "runs/x", None)
    assert "telemetry: off" in out.getvalue()


def test_a_run_prints_where_it_logs_and_its_summary(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"max_frames": 3, "scan": {"fov_A": 12.8, "shape_px": 32, "dwell_s": 1e-5},
                               "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0, "dose_budget_e_per_A2": 1e9},
                               "policy": {"kind": "random"}, "log": {"fsync": False}}))
    result = CliRunner().invoke(app, ["run", "-c", str(cfg), "--log-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "run run (" in result.output and "telemetry: off" in result.output and "frames" in result.output
