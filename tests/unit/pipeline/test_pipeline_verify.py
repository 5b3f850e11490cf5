"""``stemagent replay LOG --verify``: a run's observations re-run through its own pipeline, every
output compared with the log; a changed decision, atom or label is found with its frame and field."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from stemagent.agent.app.cli import app
from stemagent.agent.app.factory import build_agent, build_clock
from stemagent.agent.control import ControlMessage
from stemagent.config import config_from_dict
from stemagent.pipeline.verify import first_difference, plain, same_text
from stemagent.runlog import RunLog

BASE = {
    "name": "verify", "seed": 3, "max_frames": 6,
    "scan": {"fov_A": 12.8, "shape_px": 64, "dwell_s": 1e-5},
    "pipeline": {"segmenter": {"kind": "log"}},
    "policy": {"kind": "random"},
    "safety": {"area_half_width_A": 40.0, "max_fov_A": 100.0},
    "log": {"fsync": False},
}


async def record(tmp_path: Path, schedule=None, **over) -> str:
    cfg = config_from_dict({**BASE, **over})
    agent = await build_agent(cfg, run_dir=tmp_path / "original", clock=build_clock(cfg), schedule=schedule)
    summary = await agent.run()
    assert summary.exit_status == "success", summary.reason
    return summary.log_path


def verify(log: str, *extra: str):
    return CliRunner().invoke(app, ["replay", log, "--verify", "--json", *extra])


def report_of(result) -> dict:
    return json.loads(next(ln for ln in result.output.splitlines() if ln.startswith("{")))


def rewrite(log: str, stream: str, nth: int, change) -> None:
    """Change the ``nth`` event of ``stream`` in the log's documents (as a tampered or diverging log)."""
    path = Path(log, "documents.jsonl")
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    names = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    seen = 0
    for name, doc in docs:
        if name == "event" and names[doc["descriptor"]] == stream:
            if seen == nth:
                data = doc["data"]
                texts = {k for k, v in data.items() if isinstance(v, str) and v.startswith("{")}
                decoded = {k: (json.loads(v) if k in texts else v) for k, v in data.items()}
                change(decoded)
                doc["data"] = {k: (json.dumps(v) if k in texts else v) for k, v in decoded.items()}
                break
            seen += 1
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def test_a_fresh_log_verifies_and_a_changed_decision_is_found(tmp_path):
    log = asyncio.run(record(tmp_path, schedule=[(2, ControlMessage(command="set_target", target_A=(3.0, -2.0)))]))
    result = verify(log)
    assert result.exit_code == 0, result.output
    rep = report_of(result)
    assert rep["ok"] and rep["observations"] == 6 and rep["frames"] == 6 and rep["differing_observations"] == 0
    assert rep["compared"]["decision"] == 6 and rep["compared"]["atoms"] == 6 and rep["compared"]["records"] == 6

    def move(data):
        data["command"]["geometry"]["center_A"][0] += 0.5

    rewrite(log, "decisions", 3, move)
    result = verify(log)
    assert result.exit_code == 1
    rep = report_of(result)
    assert rep["differing_observations"] == 1
    first = rep["first_divergence"]
    assert first.startswith("observation 3 (frame of frame 3): decision.command.geometry.center_A[0]")
    err = [ln for ln in result.output.splitlines() if ln.startswith("error")]
    assert len(err) == 1 and "1 of 6 observations differ" in err[0]


def test_a_changed_atom_and_a_changed_record_are_found(tmp_path):
    log = asyncio.run(record(tmp_path))

    def shift(data):
        data["positions_A"][2][1] = data["positions_A"][2][1] + 1e-9

    rewrite(log, "atoms", 1, shift)
    rewrite(log, "pipeline", 4, lambda d: d["records"].update(segment={"n_atoms": -1}))
    rep = report_of(verify(log))
    assert rep["differing_observations"] == 2
    assert rep["divergences"][0].startswith("observation 1 (frame of frame 1): atoms.positions_A[2][1]")
    assert "observation 4" in rep["divergences"][1] and "records.segment" in rep["divergences"][1]
    # a tolerance forgives the tiny shift, not the changed record
    rep = report_of(verify(log, "--rtol", "1e-6"))
    assert rep["differing_observations"] == 1


def test_refusals_are_re_asked_and_dropped_frames_skipped(tmp_path):
    # a small dose budget: after the first frames the gate refuses fields that overlap, and the
    # policy is asked again (refused observations) until one passes
    log = asyncio.run(record(tmp_path, max_frames=5, safety={**BASE["safety"], "dose_budget_e_per_A2": 4e4}))
    refused = [d for d in RunLog.open(log).event_data("pipeline") if d["observation"] == "refused"]
    assert refused, "the budget should have refused some fields"
    rep = report_of(verify(log))
    assert rep["ok"], rep
    assert rep["refused"] == len(refused)


def test_first_difference_paths():
    assert first_difference({"a": [1, 2, {"b": 3}]}, {"a": [1, 2, {"b": 3}]}) is None
    assert first_difference({"a": [1, 2, {"b": 3}]}, {"a": [1, 2, {"b": 4}]}) == ("a[2].b", 3, 4)
    assert first_difference([1, 2], [1, 2, 3]) == (" (length)", 2, 3)
    assert first_difference({"x": 1.0}, {"x": 1.0 + 1e-12}, rtol=1e-9) is None
    assert first_difference({"x": 1}, {"y": 1}) == ("x", 1, "<absent>")


def test_same_text_is_the_fast_path_and_never_hides_a_difference():
    replayed = {"motif": np.array([0, 3, 1]), "symmetry": np.array([[0.25, 1 / 3]], dtype=np.float32), "ok": np.bool_(True),
                "n": np.int64(7), "x": np.float64(0.1)}
    logged = plain(replayed)  # what the log holds after writing and reading back
    assert same_text(logged, replayed) and first_difference(logged, plain(replayed)) is None
    changed = {**replayed, "x": np.float64(0.1 + 1e-16 * 2)}  # one ulp
    assert not same_text(logged, changed) and first_difference(logged, plain(changed)) == ("x", 0.1, 0.1 + 2e-16)
    # undecided cases fall back to the field-by-field comparison: NaN (logged as a string), 1 vs 1.0, key order
    assert not same_text(plain({"v": float("nan")}), {"v": float("nan")})
    assert first_difference(plain({"v": float("nan")}), plain({"v": float("nan")})) is None
    assert not same_text({"v": 1}, {"v": 1.0}) and first_difference({"v": 1}, {"v": 1.0}) is None
    assert not same_text({"a": 1, "b": 2}, {"b": 2, "a": 1})
    assert not same_text({"v": object()}, {"v": object()})


def test_a_log_of_format_1_verifies_on_what_it_holds(tmp_path):
    log = asyncio.run(record(tmp_path, max_frames=4))
    path = Path(log, "documents.jsonl")
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    gone = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] in ("pipeline", "drops")}
    out = []
    for name, doc in docs:
        if name == "start":
            doc["stemagent_log_version"] = 1
            doc.pop("pipeline", None)
            doc["config"]["safety"]["max_total_dose_e_per_A2"] = doc["config"]["safety"].pop("dose_budget_e_per_A2")
        if (name == "descriptor" and doc["uid"] in gone) or (name == "event" and doc["descriptor"] in gone):
            continue
        out.append(json.dumps([name, doc]))
    path.write_text("\n".join(out) + "\n")
    result = verify(log)
    assert result.exit_code == 0, result.output
    rep = report_of(result)
    assert rep["ok"] and rep["frames"] == 4 and rep["compared"] == {"atoms": 4, "decision": 4}
    assert "no pipeline stream" in rep["notes"][0]


def test_verify_options_checked(tmp_path):
    log = asyncio.run(record(tmp_path, max_frames=2))
    for args, says in ((["replay", log, "--verify", "--rtol", "-1"], "rtol=-1"), (["replay", log, "--rtol", "0.1"], "--rtol"),
                       (["replay", str(tmp_path / "x.dm4"), "--verify"], "--verify")):
        if args[1].endswith(".dm4"):
            Path(args[1]).write_bytes(b"\0" * 64)
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert says in result.output and "Traceback" not in result.output


def test_a_drift_run_verifies_its_drift_documents_less_their_wall_times(tmp_path):
    log = asyncio.run(record(tmp_path, pipeline={"segmenter": {"kind": "log"}, "drift": {}}))
    assert len(RunLog.open(log).event_data("drift")) == 6
    rep = report_of(verify(log))
    assert rep["ok"] and rep["differing_observations"] == 0 and rep["compared"]["drift"] == 6

    rewrite(log, "drift", 2, lambda d: d.update(update_ms=d["update_ms"] + 100.0))  # a wall time: not compared
    assert report_of(verify(log))["differing_observations"] == 0
    rewrite(log, "drift", 2, lambda d: d.update(band95_A=d["band95_A"] * 2.0))
    rep = report_of(verify(log))
    assert rep["differing_observations"] == 1 and rep["first_divergence"].startswith("observation 2 (frame of frame 2): drift.band95_A")


def test_segmenting_ahead_reports_what_one_thread_reports(tmp_path):
    # the replay segments the next frames in a worker thread (overlap, the default); on a log
    # with a changed atom, a changed decision and an unreadable frame it finds the same as the
    # serial replay, and the worker segments the frames in the log's order
    from stemagent.agent.app.factory import build_pipeline
    from stemagent.agent.app.replay_log import logged_capabilities, replay_config
    from stemagent.pipeline.verify import verify_log

    log = asyncio.run(record(tmp_path, max_frames=5))
    rewrite(log, "atoms", 1, lambda d: d["positions_A"][0].__setitem__(0, d["positions_A"][0][0] + 1e-9))
    rewrite(log, "decisions", 3, lambda d: d["command"]["geometry"]["center_A"].__setitem__(1, 7.0))
    rewrite(log, "frames", 4, lambda d: d.update(image="no-such-datum"))
    reports, seen = {}, {}
    for overlap in (True, False):
        original = RunLog.open(log)
        cfg = replay_config(original, Path(log), "fast")
        pipeline = build_pipeline(cfg, np.random.default_rng(cfg.seed), logged_capabilities(original))
        segmenter = pipeline.stage("segment").segmenter
        find, seen[overlap] = segmenter.find, []

        def spy(frame, find=find, record=seen[overlap]):
            record.append(frame.index)
            return find(frame)

        segmenter.find = spy
        try:
            rep = verify_log(original, pipeline, overlap=overlap).to_dict()
        finally:
            pipeline.close()
        reports[overlap] = {k: v for k, v in rep.items() if k not in ("elapsed_s", "x_real_time", "cpu_s")}
        assert (rep["cpu_s"]["segment_ahead"] > 0) == overlap
    assert reports[True] == reports[False]
    # the unreadable frame's logged decision has nothing to match: a third difference
    assert reports[True]["differing_observations"] == 3 and reports[True]["frames_unreadable"] == 1
    assert "no-such-datum" in reports[True]["unreadable"][0] and "frame 4" in reports[True]["divergences"][2]
    assert "observation 1 (frame of frame 1): atoms.positions_A[0][0]" in reports[True]["divergences"][0]
    assert "observation 3 (frame of frame 3): decision.command.geometry.center_A[1]" in reports[True]["divergences"][1]
    assert seen[True] == seen[False] == [0, 1, 2, 3]


def _tampered_reports(tmp_path, variants, per_frame):
    """verify_log's report of one tampered LoG log under each ``(overlap, segment_workers)`` of
    ``variants``, and which segmenter object found which frame."""
    from stemagent.agent.app.factory import build_pipeline
    from stemagent.agent.app.replay_log import logged_capabilities, replay_config
    from stemagent.pipeline.verify import verify_log
    from stemagent.segmentation.classical import LoGFinder

    log = asyncio.run(record(tmp_path, max_frames=6))
    rewrite(log, "atoms", 1, lambda d: d["positions_A"][0].__setitem__(0, d["positions_A"][0][0] + 1e-9))
    rewrite(log, "decisions", 3, lambda d: d["command"]["geometry"]["center_A"].__setitem__(1, 7.0))
    rewrite(log, "frames", 4, lambda d: d.update(image="no-such-datum"))
    find = LoGFinder.find
    reports, calls = {}, {}
    for overlap, workers in variants:
        original = RunLog.open(log)
        cfg = replay_config(original, Path(log), "fast")
        pipeline = build_pipeline(cfg, np.random.default_rng(cfg.seed), logged_capabilities(original))
        if per_frame:
            pipeline.stage("segment").segmenter.per_frame = True
        seen = calls[(overlap, workers)] = []

        def spy(self, frame, seen=seen):
            seen.append((frame.index, id(self)))
            return find(self, frame)

        LoGFinder.find = spy  # type: ignore[method-assign]
        try:
            rep = verify_log(original, pipeline, overlap=overlap, segment_workers=workers).to_dict()
        finally:
            LoGFinder.find = find  # type: ignore[method-assign]
            pipeline.close()
        assert (rep["cpu_s"]["segment_ahead"] > 0) == overlap
        reports[(overlap, workers)] = {k: v for k, v in rep.items() if k not in ("elapsed_s", "x_real_time", "cpu_s")}
    return reports, calls


def test_two_segmenting_workers_report_what_one_thread_reports(tmp_path):
    # a segmenter whose atoms depend on the frame alone (per_frame) is run on two workers, each with
    # its own copy; the changed atom, the changed decision and the unreadable frame are found as
    # the serial replay finds them
    variants = [(False, 1), (True, 1), (True, 2)]
    reports, calls = _tampered_reports(tmp_path, variants, per_frame=True)
    assert reports[(True, 2)] == reports[(True, 1)] == reports[(False, 1)]
    rep = reports[(True, 2)]
    # the unreadable frame's logged decision matches nothing, and the random policy drew one decision
    # fewer, so frame 5's differs as well
    assert rep["differing_observations"] == 4 and rep["frames_unreadable"] == 1
    assert "observation 1 (frame of frame 1): atoms.positions_A[0][0]" in rep["divergences"][0]
    assert "observation 3 (frame of frame 3): decision.command.geometry.center_A[1]" in rep["divergences"][1]
    two = calls[(True, 2)]
    assert sorted(fi for fi, _ in two) == [0, 1, 2, 3, 5]  # every readable frame once
    assert len({who for _, who in two}) == 2  # on two segmenters
    assert len({who for _, who in calls[(True, 1)]}) == 1


def test_a_segmenter_with_state_is_never_split_over_workers(tmp_path):
    # without per_frame the segmenter may carry state from frame to frame: one worker, the log's order
    reports, calls = _tampered_reports(tmp_path, [(False, 1), (True, 2)], per_frame=False)
    assert reports[(True, 2)] == reports[(False, 1)]
    assert [fi for fi, _ in calls[(True, 2)]] == [0, 1, 2, 3, 5] and len({who for _, who in calls[(True, 2)]}) == 1


def test_segment_workers_checked(tmp_path):
    import pytest

    from stemagent.agent.app.replay_log import verify_run_log
    from stemagent.errors import InputError

    log = asyncio.run(record(tmp_path, max_frames=2))
    with pytest.raises(InputError, match="segment_workers"):
        verify_run_log(RunLog.open(log), Path(log), segment_workers=0)


def test_a_unet_run_verifies_on_two_segmenting_workers(tmp_path):
    # the U-Net declares per_frame: its replay segments on two copies and reproduces every output;
    # a changed atom is still found
    from stemagent.agent.app.replay_log import verify_run_log

    log = asyncio.run(record(tmp_path, max_frames=4, pipeline={"segmenter": {"kind": "unet", "device": "cpu", "num_threads": 1}}))
    one = verify_run_log(RunLog.open(log), Path(log), segment_workers=1)
    two = verify_run_log(RunLog.open(log), Path(log), segment_workers=2)
    assert one.ok and two.ok and two.frames == 4 and two.cpu_s["segment_ahead"] > 0
    rewrite(log, "atoms", 2, lambda d: d["classes"].__setitem__(0, d["classes"][0] + 1))
    rep = verify_run_log(RunLog.open(log), Path(log), segment_workers=2)
    assert not rep.ok and rep.differing == 1 and "observation 2 (frame of frame 2): atoms.classes[0]" in rep.divergences[0].describe()
