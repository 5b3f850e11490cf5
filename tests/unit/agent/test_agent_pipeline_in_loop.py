"""The pipeline inside the loop, on the ScriptedDriver: timings logged, failing stages, stages off by config,
parks as observations (the manipulation hook), the policy finishing a run, and overlap with drops."""

from __future__ import annotations

import time

import numpy as np
from agent_doubles import Parker, Stare, scripted_agent

from stemagent.clock import VirtualClock
from stemagent.drivers.scripted import ScriptedDriver
from stemagent.pipeline import Pipeline, PolicyStage, SegmentStage
from stemagent.runlog import RunLog
from stemagent.stages import Observation
from stemagent.types import Decision, Park, ParkResult, ScanGeometry, ScanRegion


async def test_every_frame_has_per_stage_timings_in_the_log(tmp_path):
    agent, _ = await scripted_agent(tmp_path, max_frames=3)
    summary = await agent.run()
    log = RunLog.open(summary.log_path)
    rows = log.event_data("pipeline")
    assert [r["frame_index"] for r in rows] == [0, 1, 2] and all(r["observation"] == "frame" for r in rows)
    assert all(set(r["timings_ms"]) == {"segment", "policy"} and min(r["timings_ms"].values()) >= 0 for r in rows)
    assert rows[0]["records"]["segment"]["n_atoms"] == len(log.atoms()[0])
    assert log.start["pipeline"]["stages"] == ["segment", "policy"] and log.start["stemagent_log_version"] == 3
    assert summary.latency_ms_p95 >= summary.latency_ms_p50 > 0


class Explodes:
    name = "encode"

    def __init__(self, at: int) -> None:
        self.at = at

    def process(self, obs: Observation) -> Observation:
        if obs.frame_index == self.at:
            raise ValueError("no motifs today")
        obs.records[self.name] = {"ok": True}
        return obs


async def test_a_stage_that_raises_is_logged_and_skipped(tmp_path):
    agent, drv = await scripted_agent(tmp_path, max_frames=4)
    seg, pol = agent.pipeline.stage("segment"), agent.pipeline.stage("policy")
    agent.pipeline = Pipeline([seg, Explodes(at=1), pol])
    summary = await agent.run()
    assert summary.state == "stopped" and summary.frames == 4 and summary.stage_errors == 1
    log = RunLog.open(summary.log_path)
    errs = [e for e in log.event_data("interruptions") if e["kind"] == "stage_error"]
    assert len(errs) == 1 and "encode: ValueError: no motifs today" in errs[0]["reason"]
    rows = log.event_data("pipeline")
    assert rows[1]["errors"] == {"encode": "ValueError: no motifs today"} and "encode" not in rows[1]["records"]
    assert len(log.event_data("decisions")) == 4 and drv.beam_blanked  # the policy still decided


async def test_a_stage_that_must_not_fail_stops_the_run_blanked(tmp_path):
    agent, drv = await scripted_agent(tmp_path, max_frames=4)
    seg, pol = agent.pipeline.stage("segment"), agent.pipeline.stage("policy")
    from stemagent.config import StageOptions

    agent.pipeline = Pipeline([seg, Explodes(at=1), pol], {"encode": StageOptions(on_error="stop")})
    summary = await agent.run()
    assert summary.exit_status == "fail" and "stage 'encode' failed" in summary.reason and summary.frames == 1
    assert drv.beam_blanked and RunLog.open(summary.log_path).stop["exit_status"] == "fail"


async def test_stage_options_for_a_stage_the_run_does_not_have_are_a_config_error(tmp_path):
    import pytest

    from stemagent.errors import ConfigError

    with pytest.raises(ConfigError, match=r"pipeline.stages.encode='encode': names no stage of this run"):
        await scripted_agent(tmp_path, pipeline={"stages": {"encode": {"on_error": "stop"}}})
    from typer.testing import CliRunner

    from stemagent.agent.app.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline:\n  stages:\n    drift: {enabled: false}\n")
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and "pipeline.stages.drift='drift': names no stage of this run" in result.output


async def test_a_stage_off_by_config_is_not_run(tmp_path):
    agent, _ = await scripted_agent(tmp_path, max_frames=2,
                                    pipeline={"boundaries": {}, "stages": {"boundaries": {"enabled": False}}})
    assert agent.pipeline.names == ["segment", "policy"] and agent.pipeline.disabled == ["boundaries"]
    summary = await agent.run()
    log = RunLog.open(summary.log_path)
    assert log.start["pipeline"]["disabled"] == ["boundaries"]
    assert all("boundaries" not in r["timings_ms"] for r in log.event_data("pipeline"))


class Manipulator:
    """Park beside the field centre; after the park, look with a small confirmation scan; finish after two parks.
    What it finds out goes to streams of its own (``drain_events``)."""

    name = "manipulator"

    def __init__(self) -> None:
        self.parks_seen: list[ParkResult] = []
        self.stop_reason = ""
        self._events: list[tuple[str, dict]] = []

    def drain_events(self) -> list[tuple[str, dict]]:
        out, self._events = self._events, []
        return out

    def decide(self, obs: Observation) -> Decision:
        if len(self.parks_seen) >= 2:
            self.stop_reason = "two parks done"
        return Decision(Park(obs.geometry.center_A, 0.005), self.name, "park beside the dopant")

    def observe_park(self, obs: Observation) -> Decision | None:
        assert obs.kind == "park" and obs.park is not None and obs.frame is None
        self.parks_seen.append(obs.park)
        self._events.append(("outcomes", {"park": len(self.parks_seen) - 1, "hopped": True}))
        if len(self.parks_seen) == 2:
            self._events.append(("frames", {"not": "allowed"}))  # a core stream: refused, logged
        small = ScanGeometry(center_A=obs.park.position_A, fov_A=(4.0, 4.0), shape_px=(16, 16), dwell_s=1e-5)
        return Decision(ScanRegion(small), self.name, "confirm the hop", scores={"signal_mean": float(np.mean(obs.park.signal))})


async def test_parks_are_observations_and_the_policy_asks_for_a_confirmation_scan(tmp_path):
    drv = ScriptedDriver(clock=VirtualClock(), park_signal=lambda p, d, n: np.r_[np.full(n // 2, 10.0), np.full(n - n // 2, 4.0)])
    agent, _ = await scripted_agent(tmp_path, driver=drv, max_frames=20)
    policy = Manipulator()
    agent.policy = policy
    summary = await agent.run()
    assert summary.reason == "the policy finished: two parks done" and summary.exit_status == "success"
    assert [len(p.signal) for p in policy.parks_seen] == [5, 5] and policy.parks_seen[0].signal[0] == 10.0
    log = RunLog.open(summary.log_path)
    kinds = [(c["command"]["kind"], c["command"].get("geometry", {}).get("fov_A")) for c in log.event_data("commands")]
    assert kinds == [("scan", [12.8, 12.8]), ("park", None), ("scan", [4.0, 4.0]), ("park", None), ("scan", [4.0, 4.0])]
    rows = log.event_data("pipeline")
    assert [r["observation"] for r in rows] == ["frame", "park", "frame", "park", "frame"]
    assert [r["park_index"] for r in rows if r["observation"] == "park"] == [0, 1]
    decisions = log.event_data("decisions")
    assert [d["observation"] for d in decisions] == ["frame", "park", "frame", "park", "frame"]
    assert decisions[1]["reason"] == "confirm the hop" and decisions[1]["scores"]["signal_mean"] == (2 * 10.0 + 3 * 4.0) / 5
    assert len(log.park_results()) == 2 and drv.beam_blanked
    assert log.event_data("outcomes") == [{"park": 0, "hopped": True}, {"park": 1, "hopped": True}]
    assert any("'frames' is reserved" in e["reason"] for e in log.event_data("interruptions") if e["kind"] == "stage_error")


async def test_without_a_park_hook_the_last_field_is_scanned_again(tmp_path):
    agent, drv = await scripted_agent(tmp_path, max_frames=3)
    agent.policy = Parker()
    summary = await agent.run()
    log = RunLog.open(summary.log_path)
    assert [c["command"]["kind"] for c in log.event_data("commands")] == ["scan", "park", "scan", "park", "scan"]
    frames = list(log.frames())
    assert frames[0].geometry == frames[1].geometry == frames[2].geometry
    assert summary.parks == 2 and [r["observation"] for r in log.event_data("pipeline")].count("park") == 2


class Slow:
    """A segment stage that takes real (wall) time, so streaming gets ahead of it."""

    name = "segment"

    def __init__(self, inner: SegmentStage, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds

    def process(self, obs: Observation) -> Observation:
        time.sleep(self.seconds)
        return self.inner.process(obs)


async def test_overlap_streams_a_repeated_field_newest_wins_and_drops_are_logged(tmp_path):
    agent, drv = await scripted_agent(tmp_path, max_frames=6, agent={"overlap": True, "stream_burst_frames": 3})
    agent.policy = Stare()
    agent.pipeline = Pipeline([Slow(agent.pipeline.stage("segment"), 0.02), PolicyStage(agent.policy)])
    summary = await agent.run()
    assert summary.state == "stopped" and summary.frames == 6
    assert drv.count("stream") >= 2 and drv.count("acquire") == 1  # the first scan, then streamed bursts
    log = RunLog.open(summary.log_path)
    sent = [c for c in log.event_data("commands") if c["outcome"] == "sent"]
    assert sent[0]["frames"] == 1 and all(c["frames"] == 3 for c in sent[1:])
    drops = log.event_data("drops")
    assert summary.frames_dropped == len(drops) > 0
    # every acquired frame is in the log: analysed or dropped
    assert len(log.event_data("frames")) == summary.frames + summary.frames_dropped
    analysed = {r["frame_index"] for r in log.event_data("pipeline")}
    assert analysed.isdisjoint({d["frame_index"] for d in drops})
    assert drv.beam_blanked and summary.commands_sent == sum(c["frames"] for c in sent)


class MoveAfter:
    """Stares for ``n`` frames, then moves on to another field."""

    name = "move-after"

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def decide(self, obs: Observation) -> Decision:
        self.seen += 1
        g = obs.geometry
        if self.seen == self.n:
            g = ScanGeometry(center_A=(20.0, 0.0), fov_A=g.fov_A, shape_px=g.shape_px, dwell_s=g.dwell_s)
        return Decision(ScanRegion(g), self.name)


async def test_a_decision_for_another_field_ends_the_stream(tmp_path):
    agent, drv = await scripted_agent(tmp_path, max_frames=8, agent={"overlap": True, "stream_burst_frames": 2})
    agent.policy = MoveAfter(3)
    summary = await agent.run()
    assert summary.frames == 8 and summary.state == "stopped"
    centres = [f.geometry.center_A for f in RunLog.open(summary.log_path).frames()]
    moved = centres.index((20.0, 0.0))
    assert all(c == (0.0, 0.0) for c in centres[:moved]) and all(c == (20.0, 0.0) for c in centres[moved:])
    assert drv.count("acquire") == 2  # the first scan, and the first of the new field; the rest streamed



class SignalsStart:
    """A stage that marks when the pipeline has started on a frame."""

    name = "encode"

    def __init__(self) -> None:
        import threading

        self.started = threading.Event()

    def process(self, obs: Observation) -> Observation:
        self.started.set()
        time.sleep(0.02)
        return obs


async def test_the_frame_is_logged_while_the_pipeline_analyses_it_and_before_its_command(tmp_path):
    agent, drv = await scripted_agent(tmp_path, max_frames=3)
    seg, pol = agent.pipeline.stage("segment"), agent.pipeline.stage("policy")
    stage = SignalsStart()
    agent.pipeline = Pipeline([seg, stage, pol])
    write_frame = agent.writer.write_frame
    overlapped: list[bool] = []

    def write_when_analysis_runs(frame):
        # the old order (write, then analyse) never sees the analysis running: the wait times out
        overlapped.append(stage.started.wait(timeout=1.0))
        stage.started.clear()
        return write_frame(frame)

    agent.writer.write_frame = write_when_analysis_runs
    summary = await agent.run()
    assert summary.frames == 3 and overlapped == [True, True, True]
    log = RunLog.open(summary.log_path)
    assert len(log.event_data("frames")) == 3 and len(log.event_data("decisions")) == 3 and drv.beam_blanked
