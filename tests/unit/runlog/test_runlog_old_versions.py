"""Logs of earlier format versions still read and replay: a version-1 log (no log_index, no park
dose, the old dose-budget name, scalar scan sizes, no pipeline stream) made from a fresh run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from typer.testing import CliRunner

from stemagent.agent.app.cli import app
from stemagent.agent.app.factory import build_agent, build_clock
from stemagent.config import config_from_dict
from stemagent.runlog import RunLog
from stemagent.simulators.minimal import MinimalTwinDriver

CFG = {
    "name": "old", "seed": 4, "max_frames": 3,
    "scan": {"fov_A": 12.8, "shape_px": 48, "dwell_s": 1e-5},
    "pipeline": {"segmenter": {"kind": "log"}},
    "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0},
    "log": {"fsync": False},
}
NEW_STREAMS = {"pipeline", "drops"}


def as_version_1(path: Path) -> None:
    """Rewrite a fresh log's documents as the first log format wrote them."""
    docs = [json.loads(line) for line in (path / "documents.jsonl").read_text().splitlines()]
    new_descriptors = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] in NEW_STREAMS}
    names = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    out = []
    for name, doc in docs:
        if name == "start":
            doc["stemagent_log_version"] = 1
            doc.pop("pipeline", None)
            cfg = doc["config"]
            cfg["safety"]["max_total_dose_e_per_A2"] = cfg["safety"].pop("dose_budget_e_per_A2")
            cfg["scan"]["fov_A"] = cfg["scan"]["fov_A"][0]
            cfg["scan"]["shape_px"] = cfg["scan"]["shape_px"][0]
            for key in ("overlap", "stream_burst_frames"):
                cfg["agent"].pop(key)
            for key in ("boundaries", "stages"):
                cfg["pipeline"].pop(key)
            doc["capabilities"].pop("probe_fwhm_A")
        if name == "descriptor" and doc["uid"] in new_descriptors:
            continue
        if name == "event":
            if doc["descriptor"] in new_descriptors:
                continue
            stream = names[doc["descriptor"]]
            drop = {"frames": ["log_index"], "commands": ["frames", "converted"], "parks": ["dose_e_per_A2"]}.get(stream, [])
            for key in drop:
                doc["data"].pop(key, None)
                doc["timestamps"].pop(key, None)
        out.append(json.dumps([name, doc]))
    (path / "documents.jsonl").write_text("\n".join(out) + "\n")


async def record(tmp_path: Path) -> str:
    cfg = config_from_dict(CFG)
    clock = build_clock(cfg)
    agent = await build_agent(cfg, run_dir=tmp_path / "original", driver=MinimalTwinDriver(cfg.driver, seed=4, clock=clock),
                              clock=clock)
    return (await agent.run()).log_path


def test_a_version_1_log_reads_and_replays_with_the_same_atoms(tmp_path):
    log_path = asyncio.run(record(tmp_path))
    as_version_1(Path(log_path))
    old = RunLog.open(log_path)
    assert old.start["stemagent_log_version"] == 1 and "pipeline" not in old.streams()
    assert [f.index for f in old.frames()] == [0, 1, 2] and len(old.atoms()) == 3

    result = CliRunner().invoke(app, ["replay", log_path, "--log-dir", str(tmp_path / "replays"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["atoms_identical_frames"] == out["frames_compared"] == 3
