"""``replay --verify`` with the later stages ahead (``staged``): drift and encoding each on a thread
of its own after the segmenter, parks and the commands' conversions interleaved with the frames
as the log holds them. The report of a tampered log is the one the serial replay gives; the
comparison's fast path (:func:`same_values`) never calls equal what the field-by-field walk does not."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_pipeline_verify import rewrite

from stemagent.agent.app.factory import build_agent, build_clock, build_pipeline
from stemagent.agent.app.replay_log import logged_capabilities, replay_config
from stemagent.config import config_from_dict
from stemagent.drift.loop_stage import DriftLoopStage
from stemagent.pipeline.stages import EncodingAdapter, PolicyStage
from stemagent.pipeline.verify import ahead_chain, first_difference, plain, same_values, verify_log
from stemagent.runlog import RunLog
from stemagent.stages import Observation
from stemagent.types import Decision, Park, ScanRegion

CFG: dict[str, Any] = {
    "name": "staged", "seed": 5, "max_frames": 7,
    "driver": {"kind": "twin", "specimen": "graphene", "specimen_size_A": 60.0, "n_si": 4, "pace": "fast",
               "drift_velocity_A_per_s": [0.05, -0.04]},
    "scan": {"fov_A": 25.6, "shape_px": 128, "dwell_s": 1e-4},
    "pipeline": {"segmenter": {"kind": "log"}, "drift": {}, "encoding": {"n_max": 6, "pool_size": 400}},
    "policy": {"kind": "raster"},
    "safety": {"area_half_width_A": 20.0, "max_fov_A": 60.0},
    "log": {"fsync": False},
}


class ParkEveryOther:
    """Parks on the atom nearest the field's centre after every other frame, then scans the field
    again; its reasons say how many parks the frame's observation carried (what the walk hands the
    policy) and what the park observation held."""

    name = "park-every-other"

    def decide(self, obs: Observation) -> Decision:
        if obs.frame_index % 2 == 0 and len(obs.atoms):
            p = obs.atoms.positions_A
            k = int(np.argmin(np.linalg.norm(p - np.asarray(obs.geometry.center_A), axis=1)))
            return Decision(Park((float(p[k, 0]), float(p[k, 1])), 0.01), self.name, f"{len(obs.parks)} parks before")
        return Decision(ScanRegion(obs.geometry), self.name, f"{len(obs.parks)} parks before")

    def observe_park(self, obs: Observation) -> Decision | None:
        assert obs.park is not None
        motifs = int(np.count_nonzero(obs.atom_features.get("motif", np.zeros(0)) >= 0))
        return Decision(ScanRegion(obs.geometry), self.name, f"after the park: {len(obs.atoms)} atoms, {motifs} with motifs")


@pytest.fixture(scope="module")
def parked_log(tmp_path_factory) -> str:
    async def run() -> str:
        cfg = config_from_dict(CFG)
        agent = await build_agent(cfg, run_dir=tmp_path_factory.mktemp("staged") / "run", clock=build_clock(cfg))
        agent.policy = ParkEveryOther()
        summary = await agent.run()
        assert summary.exit_status == "success", summary.reason
        return summary.log_path

    return asyncio.run(run())


def _replay(log: str, overlap: bool, staged: bool, calls: list[tuple[str, int, str]]) -> dict[str, Any]:
    """verify_log's report (less its timings) with the log's pipeline and ParkEveryOther, and what
    the drift and encoding stages were handed, in order: (what, frame or field, thread name)."""
    original = RunLog.open(log)
    cfg = replay_config(original, Path(log), "fast")
    pipeline = build_pipeline(cfg, np.random.default_rng(cfg.seed), logged_capabilities(original))
    pipeline.stages[-1] = PolicyStage(ParkEveryOther())
    process, convert, encode = DriftLoopStage.process, DriftLoopStage.replay_conversion, EncodingAdapter.process

    def spy_process(self, obs):  # type: ignore[no-untyped-def]
        calls.append(("drift", obs.frame_index, threading.current_thread().name))
        return process(self, obs)

    def spy_convert(self, record):  # type: ignore[no-untyped-def]
        calls.append(("convert", round(float(record["command"]["geometry"]["center_A"][0]), 6)
                      if "geometry" in record.get("command", {}) else -1, threading.current_thread().name))
        return convert(self, record)

    def spy_encode(self, obs):  # type: ignore[no-untyped-def]
        calls.append(("encoding", obs.frame_index, threading.current_thread().name))
        return encode(self, obs)

    DriftLoopStage.process, DriftLoopStage.replay_conversion = spy_process, spy_convert  # type: ignore[method-assign]
    EncodingAdapter.process = spy_encode  # type: ignore[method-assign]
    try:
        rep = verify_log(original, pipeline, overlap=overlap, staged=staged).to_dict()
    finally:
        DriftLoopStage.process, DriftLoopStage.replay_conversion, EncodingAdapter.process = process, convert, encode  # type: ignore[method-assign]
        pipeline.close()
    assert ("drift" in rep["cpu_s"]) == (overlap and staged)
    return {k: v for k, v in rep.items() if k not in ("elapsed_s", "x_real_time", "cpu_s")}


def test_the_chain_is_the_stages_between_the_segmenter_and_the_policy(parked_log):
    original = RunLog.open(parked_log)
    cfg = replay_config(original, Path(parked_log), "fast")
    pipeline = build_pipeline(cfg, np.random.default_rng(cfg.seed), logged_capabilities(original))
    try:
        assert pipeline.names == ["segment", "drift", "encoding", "policy"]
        assert ahead_chain(pipeline) == ("drift", "encoding")
    finally:
        pipeline.close()


def test_stages_ahead_verify_a_run_with_parks_and_hand_back_conversions_in_the_serial_order(parked_log):
    log = RunLog.open(parked_log)
    assert len(log.event_data("parks")) >= 2 and len(log.event_data("drift")) == 7
    assert any(isinstance((d.get("converted") or {}).get("drift"), dict) for d in log.event_data("commands"))
    calls: dict[tuple[bool, bool], list[tuple[str, int, str]]] = {}
    reports = {}
    for variant in ((False, False), (True, False), (True, True)):
        calls[variant] = []
        reports[variant] = _replay(parked_log, *variant, calls[variant])
    rep = reports[(True, True)]
    assert rep["ok"] and rep["parks"] >= 2 and rep["frames"] == 7, rep
    assert reports[(True, True)] == reports[(True, False)] == reports[(False, False)]
    # each stage got the same conversions and frames in the same order, on its own thread
    for stage in (("drift", "convert"), ("encoding",)):
        serial = [(what, at) for what, at, _ in calls[(False, False)] if what in stage]
        staged = [(what, at) for what, at, _ in calls[(True, True)] if what in stage]
        assert staged == serial and len(serial) >= 7
    assert sum(w == "convert" for w, _, _ in calls[(True, True)]) >= 3
    threads = {what: {t for w, _, t in calls[(True, True)] if w == what} for what in ("drift", "convert", "encoding")}
    assert all(len(t) == 1 for t in threads.values()), threads
    assert threads["drift"] == threads["convert"] and next(iter(threads["drift"])).startswith("verify-drift")
    assert next(iter(threads["encoding"])).startswith("verify-encoding")


def test_stages_ahead_report_what_one_thread_reports_on_a_tampered_log(parked_log, tmp_path):
    import shutil

    log = str(tmp_path / "copy")
    shutil.copytree(parked_log, log)
    rewrite(log, "atoms", 1, lambda d: d["positions_A"][0].__setitem__(0, d["positions_A"][0][0] + 1e-9))
    rewrite(log, "drift", 2, lambda d: d.update(band95_A=(d["band95_A"] or 0.0) + 1.0))
    rewrite(log, "motifs", 3, lambda d: d["motif"].__setitem__(0, d["motif"][0] + 1))
    rewrite(log, "decisions", 5, lambda d: d.update(reason=d["reason"] + " (changed)"))
    rewrite(log, "frames", 6, lambda d: d.update(image="no-such-datum"))
    reports = {variant: _replay(log, *variant, []) for variant in ((False, False), (True, False), (True, True))}
    assert reports[(True, True)] == reports[(True, False)] == reports[(False, False)]
    rep = reports[(True, True)]
    assert not rep["ok"] and rep["frames_unreadable"] == 1 and "no-such-datum" in rep["unreadable"][0]
    found = " | ".join(rep["divergences"])
    for expected in ("(frame of frame 1): atoms.positions_A[0][0]", "(frame of frame 2): drift.band95_A",
                     "(frame of frame 3): motifs.motif[0]", "frame 6"):
        assert expected in found, (expected, found)
    assert "decision.reason" in found


@pytest.mark.parametrize("cores, staged", [(2, False), (3, False), (4, True), (16, True)])
def test_stages_run_ahead_by_default_only_where_each_thread_has_a_core(parked_log, monkeypatch, cores, staged):
    # LoG (one segmenting worker) + drift + encoding + the main thread: four threads
    from stemagent.pipeline import verify as verify_module

    monkeypatch.setattr(verify_module.os, "cpu_count", lambda: cores)
    original = RunLog.open(parked_log)
    cfg = replay_config(original, Path(parked_log), "fast")
    pipeline = build_pipeline(cfg, np.random.default_rng(cfg.seed), logged_capabilities(original))
    pipeline.stages[-1] = PolicyStage(ParkEveryOther())
    try:
        rep = verify_log(original, pipeline)
    finally:
        pipeline.close()
    assert rep.ok and ("drift" in rep.cpu_s and "encoding" in rep.cpu_s) == staged


@pytest.mark.parametrize("logged, replayed, fast", [
    ({"a": [[0.1, 0.2], [0.3, 0.4]]}, {"a": np.array([[0.1, 0.2], [0.3, 0.4]])}, True),
    ([0.1, 0.2], np.array([0.1, 0.2], dtype=np.float32), False),  # the float32's own value is not 0.1
    ([float(np.float32(0.1))], np.array([0.1], dtype=np.float32), True),  # ... it is its float64, written and read back
    ([[0.5, None], [None, 0.25]], [[0.5, None], [None, 0.25]], True),  # latents: null where not encoded
    ([[0.5, None]], [[0.5, float("nan")]], False),
    ([0.5, "nan"], [0.5, float("nan")], False),  # equal to the walk (NaN is logged as a string): the walk decides
    ([1, 2, 3], [1.0, 2.0, 3.0], False),
    ([2**53 + 1], [float(2**53)], False),
    ({"1": 2}, {1: 2}, False),
    ({"a": 1, "b": 2}, {"b": 2, "a": 1}, True),
    ([True, False], [1, 0], True),
    ({"v": [1e-300, -0.0]}, {"v": [1e-300, 0.0]}, True),
    ({"v": [0.1] * 50 + [0.2]}, {"v": [0.1] * 50 + [0.2 + 2**-55]}, False),  # one ulp in the last of 51
    ({"v": ["x", "y"]}, {"v": ["x", "z"]}, False),
    ({"v": [[1, 2], [3]]}, {"v": [[1, 2], [3]]}, True),  # ragged: element by element
    ({"v": [[1, 2], [3]]}, {"v": [[1, 2], [4]]}, False),
    ({"v": 1}, {"v": np.float32(1.0)}, True),
    ({"v": 0.1}, {"v": np.float32(0.1)}, False),
    ({"v": [0.1, 0.2]}, {"v": [np.float32(0.1), np.float32(0.2)]}, False),
    ({"v": [0.1, 0.2]}, {"v": (0.1, 0.2)}, True),
    ({"v": [0.5]}, {"v": np.asarray(0.5)}, False),  # a 0-d array is a number to the log
])
def test_same_values_is_equal_only_where_the_walk_finds_no_difference(logged, replayed, fast):
    # logged: as the log holds it (plain JSON); replayed: as a stage gives it
    walk = first_difference(plain(logged), plain(replayed)) is None
    assert same_values(plain(logged), replayed) == fast
    assert not fast or walk  # the fast path's equal is the walk's
