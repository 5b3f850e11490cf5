"""Closed loops on the twin through the ordinary command line (real processes, real files): a run
with the encoding stage, its report and its verified replay; runs stopped by SIGTERM or killed
outright leave a log that ``replay --verify`` reproduces and ``report`` summarises."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stemagent.runlog import RunLog

pytestmark = pytest.mark.system

CLI = [sys.executable, "-m", "stemagent.agent.app.cli"]
TWIN = {
    "name": "loop", "seed": 9, "max_frames": 5,
    "driver": {"kind": "twin", "specimen": "graphene", "specimen_size_A": 60.0, "n_si": 4, "pace": "fast"},
    "scan": {"fov_A": 19.2, "shape_px": 96, "dwell_s": 5e-5},
    "pipeline": {"segmenter": {"kind": "log"}, "encoding": {"n_max": 6, "pool_size": 400}},
    "policy": {"kind": "raster", "overlap": 0.3},
    "safety": {"area_half_width_A": 20.0, "max_fov_A": 60.0},
    "log": {"fsync": False},
}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def start(tmp_path: Path, cfg: dict, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runs = tmp_path / "runs"
    proc = subprocess.Popen([*CLI, "run", "--config", str(path), "--log-dir", str(runs), "--json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, runs


def wait_for_motifs(runs: Path, n: int, proc: subprocess.Popen[str], timeout_s: float = 120.0) -> Path:
    """Wait until ``n`` frames have been analysed (their motif labels are in the log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        docs = list(runs.glob("*/documents.jsonl"))
        if docs and docs[0].read_bytes().count(b'"symmetry_folds":[') >= n:  # one per motifs event
            return docs[0].parent
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the run made no progress")


def verify(log: Path) -> dict:
    proc = cli("replay", str(log), "--verify", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_run_with_motifs_reports_and_verifies(tmp_path):
    proc, runs = start(tmp_path, TWIN)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["frames"] == 5 and summary["beam_blanked_at_end"]
    log = Path(summary["log_path"])
    assert "run report:" in err and (log / "report.md").is_file() and (log / "report_last_frame.png").is_file()
    assert len(RunLog.open(log).event_data("motifs")) == 5
    rep = verify(log)
    assert rep["ok"] and rep["frames"] == 5 and rep["compared"]["motifs"] == 5 and rep["compared"]["decision"] == 5
    md = cli("report", str(log))
    assert md.returncode == 0 and "| encoding | 5 |" in md.stdout and "motifs: library of" in md.stdout


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_leaves_a_closed_log_that_verifies(tmp_path, sig, code):
    cfg = {**TWIN, "max_frames": 100000, "driver": {**TWIN["driver"], "pace": "realtime"},
           "scan": {**TWIN["scan"], "dwell_s": 2e-5}}
    proc, runs = start(tmp_path, cfg, "--no-report")
    wait_for_motifs(runs, 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["beam_blanked_at_end"] and summary["exit_status"] == "abort"
    log = RunLog.open(summary["log_path"])
    assert log.stop["exit_status"] == "abort" and log.stop["reason"] == f"interrupted by {sig.name}"
    assert [e["kind"] for e in log.event_data("interruptions")][-1] == "state"
    rep = verify(Path(summary["log_path"]))
    assert rep["ok"] and rep["frames"] == summary["frames"] >= 3
    s = json.loads(cli("report", summary["log_path"], "--json", "--no-figures").stdout.strip().splitlines()[-1])
    assert s["run"]["exit_status"] == "abort" and s["faults"]["signal"] == 1 and s["frames"]["analysed"] == summary["frames"]


def test_a_killed_run_leaves_a_log_that_still_verifies(tmp_path):
    cfg = {**TWIN, "max_frames": 100000, "driver": {**TWIN["driver"], "pace": "realtime"},
           "scan": {**TWIN["scan"], "dwell_s": 2e-5}}
    proc, runs = start(tmp_path, cfg, "--no-report")
    log = wait_for_motifs(runs, 3, proc)
    proc.kill()  # SIGKILL: no handler runs, no stop document
    proc.communicate(timeout=60)
    assert RunLog.open(log).stop is None
    rep = verify(log)
    assert rep["ok"] and rep["frames"] >= 3
    s = json.loads(cli("report", str(log), "--json").stdout.strip().splitlines()[-1])
    assert s["run"]["exit_status"].startswith("unknown") and s["frames"]["analysed"] >= 3
