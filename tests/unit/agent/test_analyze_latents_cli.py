"""``stemagent analyze-latents LOG`` on a short twin run with the rVAE stage: the graph, the
trajectories and the figures are written, a log without latents is replayed through the rVAE,
and bad logs end in one clear line with a non-zero exit code."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stemagent.agent.app.cli import app
from stemagent.agent.app.factory import build_agent, build_clock
from stemagent.agent.app.latent_log import TRUTH_FILE, write_twin_truth
from stemagent.config import config_from_dict

CFG = {
    "name": "latent-paths", "seed": 7, "max_frames": 12,
    "driver": {"kind": "twin", "specimen": "graphene", "specimen_size_A": 50.0, "n_si": 20, "pace": "fast",
               "si_swap_barn": 300.0, "c_knock_on_barn": 3.0, "beam_current_pA": 30.0},
    "scan": {"fov_A": 25.6, "shape_px": 128, "dwell_s": 1e-5},
    "pipeline": {"segmenter": {"kind": "log"}, "rvae": {"device": "cpu"}},
    "policy": {"kind": "raster", "overlap": 0.0},  # one field, scanned again and again
    "safety": {"area_half_width_A": 12.81, "max_fov_A": 60.0},
    "log": {"fsync": False},
}


@pytest.fixture(scope="module")
def run_log(tmp_path_factory) -> Path:
    cfg = config_from_dict(CFG)

    async def go():
        agent = await build_agent(cfg, run_dir=tmp_path_factory.mktemp("latents") / "run", clock=build_clock(cfg))
        agent.driver.ground_truth.frames = deque()
        summary = await agent.run()
        assert summary.exit_status == "success", summary.reason
        write_twin_truth(summary.log_path, agent.driver.ground_truth)
        return Path(summary.log_path)

    return asyncio.run(go())


def invoke(*args: str):
    return CliRunner().invoke(app, ["analyze-latents", *map(str, args)])


def test_writes_graph_trajectories_and_figures(run_log, tmp_path):
    out = tmp_path / "out"
    result = invoke(run_log, "--out", out, "--windows", "2,3")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["latents"] == "log" and summary["frames"] == 12
    names = set(summary["files"])
    assert {"graph.json", "latent_scatter.png", "transition_graph.png"} <= names
    assert names & {"trajectories.parquet", "trajectories.csv"}
    assert all((out / n).stat().st_size > 0 for n in names)
    graph = json.loads((out / "graph.json").read_text())
    assert graph["states"]["n_states"] >= 1 and graph["tracks"] > 50
    g = graph["graph"]
    assert np.array(g["counts"]).shape == (g["n_states"], g["n_states"])
    # the twin's truth beside the log: atoms get their true class, events are scored
    truth = graph["truth"]
    assert truth["class_counts"]["C"] > 1000 and truth["class_counts"]["Si"] > 0
    assert set(truth["events"]) >= {"precision", "recall", "true_events", "detected_groups"}
    if "trajectories.parquet" in names:
        import pyarrow.parquet as pq

        table = pq.read_table(out / "trajectories.parquet")
        assert table.num_rows == graph["observations"]
        assert {"track", "frame_index", "x_A", "y_A", "z0", "z1", "angle_rad", "state", "true_class"} <= set(table.column_names)


def test_a_log_without_latents_is_replayed_through_the_rvae(run_log, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_log, copy)
    (copy / TRUTH_FILE).unlink()
    docs = (copy / "documents.jsonl").read_text().splitlines(keepends=True)
    uid = next(json.loads(d)[1]["uid"] for d in docs if json.loads(d)[0] == "descriptor" and json.loads(d)[1].get("name") == "latents")
    (copy / "documents.jsonl").write_text("".join(d for d in docs if uid not in d))
    result = invoke(copy, "--out", tmp_path / "out", "--windows", "2,3", "--no-figures")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["latents"] == "replayed" and summary["vs_twin_events"] is None
    # the same latents as the stage logged (rounded there): the same tracks
    logged = json.loads((tmp_path / "out" / "graph.json").read_text())
    assert logged["latents"] == "replayed" and logged["weights"].startswith("rvae_graphene.pt@")
    again = invoke(run_log, "--out", tmp_path / "out2", "--windows", "2,3", "--no-figures")
    assert json.loads(again.stdout)["tracks"] == summary["tracks"]


@pytest.mark.parametrize("case,expect", [
    ("missing", "does not exist"),
    ("not_a_log", "is not a run log"),
    ("corrupt", "line 4"),  # (rich markup drops the "[name, document]" of the reader's message: fail() prints with markup)
    ("no_frames", "holds no frames"),
])
def test_bad_logs_end_in_one_clear_line(run_log, tmp_path, case, expect):
    path = tmp_path / "log"
    if case == "not_a_log":
        path.mkdir()
    elif case in ("corrupt", "no_frames"):
        shutil.copytree(run_log, path)
        docs = (path / "documents.jsonl").read_text().splitlines(keepends=True)
        if case == "corrupt":
            docs.insert(3, "{not json\n")
        else:
            uid = next(json.loads(d)[1]["uid"] for d in docs if json.loads(d)[0] == "descriptor" and json.loads(d)[1].get("name") == "frames")
            docs = [d for d in docs if uid not in d]
        (path / "documents.jsonl").write_text("".join(docs))
    result = invoke(path, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
