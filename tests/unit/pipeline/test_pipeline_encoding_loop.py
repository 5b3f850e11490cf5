"""The encoding stage in the loop (``pipeline.encoding``): per-atom motif labels in the policy's
observation and the run log's ``motifs`` stream; replay and ``replay --verify`` reproduce them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from policy_inputs import run_recording_policy_inputs
from typer.testing import CliRunner

from stemagent.agent.app.cli import app
from stemagent.agent.app.factory import stage_names
from stemagent.config import config_from_dict
from stemagent.errors import ConfigError
from stemagent.runlog import RunLog

CFG = {
    "name": "motifs", "seed": 7, "max_frames": 4,
    "driver": {"kind": "twin", "specimen": "graphene", "specimen_size_A": 60.0, "n_si": 6, "pace": "fast"},
    "scan": {"fov_A": 25.6, "shape_px": 128, "dwell_s": 1e-4},
    "pipeline": {"segmenter": {"kind": "log"}, "encoding": {"n_max": 6, "pool_size": 400}},
    "policy": {"kind": "raster", "overlap": 0.5},
    "safety": {"area_half_width_A": 16.0, "max_fov_A": 60.0},
    "log": {"fsync": False},
}


@pytest.fixture(scope="module")
def run_log(tmp_path_factory) -> str:
    cfg = config_from_dict(CFG)
    assert stage_names(cfg) == ["segment", "encoding", "policy"]
    path, seen = run_recording_policy_inputs(cfg, tmp_path_factory.mktemp("enc") / "run")
    assert len(seen) == 4
    for f in seen:  # the policy sees a motif label, cell and symmetry scores for every atom
        assert f["motif"].shape == (f["n"],) and f["motif_cell"].shape == (f["n"],) and f["symmetry"].shape == (f["n"], 4)
        assert np.mean(f["motif"] >= 0) > 0.6
    return path


def test_motifs_stream_has_a_label_per_atom(run_log):
    log = RunLog.open(run_log)
    motifs = log.event_data("motifs")
    atoms = log.atoms()
    assert [m["frame_index"] for m in motifs] == [a.frame_index for a in atoms] == [0, 1, 2, 3]
    for m, a in zip(motifs, atoms):
        assert len(m["motif"]) == len(m["motif_cell"]) == len(m["rare_cell"]) == len(a)
        assert len(m["symmetry"]) == len(a) and m["symmetry_folds"] == [2, 3, 4, 6]
    records = [d["records"]["encoding"] for d in log.event_data("pipeline")]
    assert all(r["library_size"] >= 1 for r in records)
    # the per-frame path does not recluster every frame (recluster_every 0: only on novelty)
    assert records[0]["reclustered"] and sum(r["reclustered"] for r in records) < 4
    counts = records[-1]["motif_counts"]
    labels = np.asarray(motifs[-1]["motif"])
    assert {int(k): v for k, v in counts.items()} == {int(i): int(c) for i, c in zip(*np.unique(labels[labels >= 0], return_counts=True))}
    assert "encoding" in log.start["pipeline"]["stages"]


def _verify_edited_copy(log_dir, copy, which, edit):
    """Copy the run log ``log_dir`` to ``copy``, apply ``edit(doc)`` to the first document for
    which ``which(name, doc, descriptor names by uid)`` holds, and return the report of
    ``replay --verify`` on the copy (which must exit 1: a difference)."""
    import shutil  # noqa: I001 - only the tests that edit a log copy it

    shutil.copytree(log_dir, copy)
    lines = (copy / "documents.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    names = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    k = next(i for i, (n, d) in enumerate(docs) if which(n, d, names))
    name, doc = docs[k]
    edit(doc)
    lines[k] = json.dumps([name, doc])
    (copy / "documents.jsonl").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, ["replay", str(copy), "--verify", "--json"])
    assert result.exit_code == 1
    return json.loads(next(ln for ln in result.output.splitlines() if ln.startswith("{")))


def test_verify_reproduces_the_motif_labels_and_finds_a_changed_one(run_log, tmp_path):
    result = CliRunner().invoke(app, ["replay", run_log, "--verify", "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.output.strip().splitlines()[-1])
    assert rep["ok"] and rep["compared"]["motifs"] == 4
    # a copy of the log with one label changed
    def first_motifs(name, doc, names):
        return name == "event" and names[doc["descriptor"]] == "motifs"

    def change_label(doc):
        doc["data"]["motif"][5] = 99

    rep = _verify_edited_copy(run_log, tmp_path / "copy", first_motifs, change_label)
    assert rep["first_divergence"].startswith("observation 0 (frame of frame 0): motifs.motif[5]: logged 99")


def test_plain_replay_reproduces_the_motifs(run_log, tmp_path):
    result = CliRunner().invoke(app, ["replay", run_log, "--log-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    replayed = RunLog.open(next(tmp_path.iterdir()))
    assert [m["motif"] for m in replayed.event_data("motifs")] == [m["motif"] for m in RunLog.open(run_log).event_data("motifs")]


def test_encoding_off_by_default_and_its_options_checked():
    cfg = config_from_dict({k: v for k, v in CFG.items() if k != "pipeline"})
    assert cfg.pipeline.encoding is None and "encoding" not in stage_names(cfg)
    with pytest.raises(ConfigError, match="pipeline.encoding.recluster_every"):
        config_from_dict({**CFG, "pipeline": {"encoding": {"recluster_every": -1}}})
    with pytest.raises(ConfigError, match="pipeline.encoding.bogus"):
        config_from_dict({**CFG, "pipeline": {"encoding": {"bogus": 1}}})


def test_background_reclusters_are_adopted_k_frames_later_and_verify(tmp_path):
    # reclusters every 3 frames, off the frame path, adopted 2 frames after they start: the log says
    # which frame started and which adopted each; replay --verify reproduces every label and record
    enc = {"n_max": 6, "pool_size": 400, "recluster_every": 3, "recluster_adopt_after_frames": 2}
    cfg = config_from_dict({**CFG, "max_frames": 8, "pipeline": {**CFG["pipeline"], "encoding": enc}})
    path, _ = run_recording_policy_inputs(cfg, tmp_path / "run")
    records = [d["records"]["encoding"] for d in RunLog.open(path).event_data("pipeline")]
    assert [i for i, r in enumerate(records) if r["recluster_started"]] == [3, 6]
    assert [i for i, r in enumerate(records) if r["reclustered"]] == [0, 5]  # the first on its frame, then 3 + 2
    result = CliRunner().invoke(app, ["replay", path, "--verify", "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.output.strip().splitlines()[-1])
    assert rep["ok"] and rep["compared"]["motifs"] == 8
    # the same log replayed with the recluster adopted one frame earlier: the labels part at frame 4
    def adopt_sooner(doc):
        doc["config"]["pipeline"]["encoding"]["recluster_adopt_after_frames"] = 1

    rep = _verify_edited_copy(path, tmp_path / "copy", lambda name, doc, names: name == "start", adopt_sooner)
    assert rep["first_divergence"].startswith("observation 4 (frame of frame 4): records.encoding")
