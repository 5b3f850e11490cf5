"""``stemagent report LOG``: the summary and figures of a run from its log, and what it does with
logs that are empty, cut short, corrupt or old."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from stemagent.agent.app.cli import app
from stemagent.agent.app.factory import build_agent, build_clock
from stemagent.config import config_from_dict
from stemagent.runlog import RunLog, RunLogWriter

CFG = {
    "name": "rep", "seed": 5, "max_frames": 5,
    "scan": {"fov_A": 12.8, "shape_px": 48, "dwell_s": 1e-5},
    "pipeline": {"segmenter": {"kind": "log"}},
    "safety": {"area_half_width_A": 40.0, "max_fov_A": 100.0, "dose_budget_e_per_A2": 1e7},
    "log": {"fsync": False},
}


def record(tmp_path: Path, **over) -> str:
    async def go() -> str:
        cfg = config_from_dict({**CFG, **over})
        agent = await build_agent(cfg, run_dir=tmp_path / "run", clock=build_clock(cfg))
        return (await agent.run()).log_path

    return asyncio.run(go())


def report(log: str | Path, *extra: str):
    return CliRunner().invoke(app, ["report", str(log), *extra])


def test_report_of_a_run(tmp_path):
    log = record(tmp_path)
    result = report(log, "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.output.strip().splitlines()[-1])
    run = RunLog.open(log)
    assert s["run"]["exit_status"] == "success" and s["run"]["stop_reason"] == "reached max_frames=5"
    assert s["frames"] == {**s["frames"], "logged": 5, "analysed": 5, "dropped": 0, "not_analysed": 0}
    assert s["decisions"]["total"] == 5 and s["decisions"]["by_command"] == {"scan": 5}
    seg = [d["timings_ms"]["segment"] for d in run.event_data("pipeline")]
    assert s["stages"]["segment"]["n"] == 5
    assert np.isclose(s["stages"]["segment"]["p95_ms"], np.percentile(seg, 95))
    # the peak dose of five fields that do not overlap is one frame's peak, well under the budget
    per_frame = max(f["dose_e_per_A2"] for f in run.event_data("frames"))
    assert per_frame * 0.5 < s["dose"]["peak_e_per_A2"] < per_frame * 3 and 0 < s["dose"]["used_fraction"] < 1
    for name in ("report.md", "report.html", "report_last_frame.png", "report_dose.png", "report_timings.png"):
        assert (Path(log) / name).stat().st_size > 100, name
    md = (Path(log) / "report.md").read_text()
    assert "| segment | 5 |" in md and "ended **success**" in md and "![" in md
    # printed as Markdown, with where the report is
    result = report(log, "--out", str(tmp_path / "elsewhere"), "--no-figures")
    assert result.exit_code == 0 and "# Run report: rep" in result.output and "elsewhere" in result.output
    assert not (tmp_path / "elsewhere" / "report_dose.png").exists()


def test_report_of_an_empty_run_and_of_a_log_cut_short(tmp_path):
    w = RunLogWriter(tmp_path / "empty", {"config": config_from_dict(CFG).model_dump(mode="json")}, fsync=False)
    w.close("fail", "the device never answered")
    result = report(tmp_path / "empty", "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.output.strip().splitlines()[-1])
    assert s["frames"]["logged"] == 0 and s["run"]["exit_status"] == "fail" and s["stages"] == {}
    assert "no frame could be read" in (tmp_path / "empty" / "report.md").read_text()

    log = Path(record(tmp_path))
    docs = log / "documents.jsonl"
    text = docs.read_bytes()
    docs.write_bytes(text[: text.rfind(b"\n", 0, len(text) - 1) + 20])  # the stop document torn by a crash
    result = report(log, "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.output.strip().splitlines()[-1])
    assert s["run"]["truncated"] and s["run"]["exit_status"].startswith("unknown") and s["frames"]["logged"] == 5


def test_report_and_verify_of_corrupt_logs_fail_in_one_line(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "documents.jsonl").write_text('["start", {"stemagent_log_version": 3}]\nnot json\n')
    for args in (["report", str(tmp_path / "junk")], ["replay", str(tmp_path / "junk"), "--verify"],
                 ["report", str(tmp_path / "nowhere")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        errors = [ln for ln in result.output.splitlines() if ln.startswith("error")]
        assert len(errors) == 1 and "Traceback" not in result.output
    # a log with no frames cannot be verified: said in one line
    w = RunLogWriter(tmp_path / "empty", {"config": config_from_dict(CFG).model_dump(mode="json")}, fsync=False)
    w.close("fail", "nothing")
    result = CliRunner().invoke(app, ["replay", str(tmp_path / "empty"), "--verify"])
    assert result.exit_code == 2 and "holds no frames" in result.output


def test_a_rotten_last_frame_falls_back_to_an_earlier_one(tmp_path):
    log = Path(record(tmp_path))
    chunk = next((log / "frames.zarr" / "Experiments").glob("*/data/c/4/0/0"))
    chunk.write_bytes(b"rotten" * 40)
    result = report(log, "--json")
    assert result.exit_code == 0, result.output
    md = (log / "report.md").read_text()
    assert "frame 3:" in md  # the last readable frame
    # verify says which frame it could not read and fails
    result = CliRunner().invoke(app, ["replay", str(log), "--verify"])
    assert result.exit_code == 1 and "1 frames could not be read" in result.output
