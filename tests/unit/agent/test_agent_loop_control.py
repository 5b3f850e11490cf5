"""The loop's control paths on the ScriptedDriver: pause, stop, abort during each await, faults, refusal loops."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from agent_doubles import Outside, Parker, Stare, scripted_agent, until

from stemagent.agent.control import ControlMessage
from stemagent.agent.state import AgentState
from stemagent.clock import VirtualClock
from stemagent.driver import CommandRefused, DriverFault
from stemagent.drivers.scripted import ScriptedDriver
from stemagent.pipeline import Pipeline, PolicyStage
from stemagent.runlog import RunLog
from stemagent.stages import Observation
from stemagent.types import Blank, Decision, Park, ScanRegion


def states(log: RunLog) -> list[str]:
    return [e["state"] for e in log.event_data("interruptions") if e["kind"] == "state"]


async def test_pause_during_a_scan_blanks_after_it_and_waits_for_resume(tmp_path):
    agent, drv = await scripted_agent(tmp_path, max_frames=100)
    drv.on("acquire", 2, lambda: agent.control(ControlMessage(command="pause", id="p")))
    run = asyncio.ensure_future(agent.run())
    await until(lambda: agent.sm.state == AgentState.PAUSED, "paused")
    assert drv.beam_blanked and agent.summary.frames == 2 and drv.count("acquire") == 2  # the scan in flight ends
    for _ in range(200):
        await asyncio.sleep(0)
    assert drv.count("acquire") == 2  # nothing is acquired while paused
    agent.control(ControlMessage(command="resume"))
    await until(lambda: agent.summary.frames >= 4, "frames after resume")
    agent.control(ControlMessage(command="stop"))
    summary = await run
    assert summary.state == "stopped" and summary.pauses == 1 and summary.reason == "operator stop"
    assert states(RunLog.open(summary.log_path))[:3] == ["running", "paused", "running"]


async def test_stop_during_a_scan_lets_it_finish_then_stops(tmp_path):
    agent, drv = await scripted_agent(tmp_path, max_frames=100)
    drv.on("acquire", 3, lambda: agent.control(ControlMessage(command="stop")))
    summary = await agent.run()
    assert summary.state == "stopped" and summary.exit_status == "success" and summary.frames == 3
    assert drv.beam_blanked and not drv.connected and drv.calls[-2:] == ["blank", "close"]


class Blocking:
    """An analysis stage that blocks its (executor) thread until released."""

    name = "segment"

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def process(self, obs: Observation) -> Observation:
        self.started.set()
        self.release.wait(30)
        return obs


@pytest.mark.parametrize("where", ["connect", "acquire", "park", "reconnect", "blank", "analysis", "stream"])
async def test_abort_during_each_await_ends_the_run_at_once_blanked(tmp_path, where):
    clock = VirtualClock()
    drv = ScriptedDriver(clock=clock)
    agent, _ = await scripted_agent(tmp_path, driver=drv, max_frames=100, agent={"overlap": where == "stream"})
    abort = lambda: agent.control(ControlMessage(command="abort", reason=f"during {where}"))  # noqa: E731
    blocking = Blocking()
    if where == "connect":  # call 1 was build_agent's
        drv.on("connect", 2, abort).hang("connect", 2)
    elif where == "acquire":
        drv.on("acquire", 2, abort).hang("acquire", 2)
    elif where == "park":
        agent.policy = Parker()
        drv.on("park", 1, abort).hang("park", 1)
    elif where == "reconnect":
        drv.fail("acquire", DriverFault("link lost"), at=2)
        drv.on("connect", 3, abort).hang("connect", 3)
    elif where == "blank":  # the blank after the second scan: abort arrives, the blank itself is bounded
        drv.on("blank", 3, abort)
    elif where == "stream":  # the second burst of a streamed field hangs
        agent.policy = Stare()
        drv.on("stream", 2, abort).hang("stream", 2)
    else:
        agent.pipeline = Pipeline([blocking, PolicyStage(agent.policy)])
    run = asyncio.ensure_future(agent.run())
    if where == "analysis":
        await until(blocking.started.is_set, "analysis started")
        abort()
    summary = await asyncio.wait_for(run, timeout=30)
    blocking.release.set()
    assert summary.state == "aborted" and summary.exit_status == "abort" and f"during {where}" in summary.reason
    assert drv.beam_blanked and summary.beam_blanked_at_end and not drv.connected
    assert RunLog.open(summary.log_path).stop["exit_status"] == "abort"


async def test_a_lost_device_faults_blanks_and_recovers(tmp_path):
    drv = ScriptedDriver(clock=VirtualClock())
    drv.fail("acquire", DriverFault("link lost"), at=2)
    drv.fail("connect", DriverFault("still down"), at=3).fail("connect", DriverFault("still down"), at=4)
    agent, _ = await scripted_agent(tmp_path, driver=drv, max_frames=5)
    summary = await agent.run()
    assert summary.state == "stopped" and summary.frames == 5 and summary.faults == 1
    log = RunLog.open(summary.log_path)
    kinds = [e["kind"] for e in log.event_data("interruptions")]
    assert "fault" in kinds and "recovered" in kinds
    assert states(log)[:3] == ["running", "faulted", "running"] and drv.count("connect") == 5
    assert drv.beam_blanked


async def test_a_corrupt_frame_is_logged_as_bad_input_and_the_run_goes_on(tmp_path):
    def image(g, i):
        img = np.random.default_rng(i).poisson(5.0, g.shape_px).astype(np.float32)
        if i == 1:
            img[5, 5] = np.nan
        return img

    drv = ScriptedDriver(clock=VirtualClock(), image=image)
    agent, _ = await scripted_agent(tmp_path, driver=drv, max_frames=4)
    summary = await agent.run()
    assert summary.state == "stopped" and summary.frames == 4
    log = RunLog.open(summary.log_path)
    bad = [e for e in log.event_data("interruptions") if e["kind"] == "bad_input"]
    assert len(bad) == 1 and "frame.image[5,5]" in bad[0]["reason"]
    assert len(log.event_data("frames")) == 5  # the bad frame is kept in the log too


async def test_a_refusal_loop_ends_the_run_after_max_consecutive_refusals(tmp_path):
    agent, drv = await scripted_agent(tmp_path, max_frames=10, agent={"max_consecutive_refusals": 3})
    agent.policy = Outside()
    summary = await agent.run()
    assert summary.exit_status == "fail" and summary.reason == "3 commands in a row refused by the safety gate"
    assert summary.commands_refused == 3 and summary.frames == 1 and drv.count("acquire") == 1
    log = RunLog.open(summary.log_path)
    assert [e["rule"] for e in log.event_data("safety")] == ["area"] * 3
    assert [d["observation"] for d in log.event_data("decisions")] == ["frame", "refused", "refused"]
    assert drv.beam_blanked


async def test_refusals_that_are_not_in_a_row_do_not_end_the_run(tmp_path):
    agent, drv = await scripted_agent(tmp_path, max_frames=4, agent={"max_consecutive_refusals": 2})
    agent.policy = Outside(good_every=2)
    summary = await agent.run()
    assert summary.exit_status == "success" and summary.frames == 4 and summary.commands_refused == 3


async def test_the_device_refusing_counts_as_a_refusal_and_nothing_is_dosed(tmp_path):
    drv = ScriptedDriver(clock=VirtualClock())
    for n in (2, 3, 4):
        drv.fail("acquire", CommandRefused("outside the console's limits"), at=n)
    agent, _ = await scripted_agent(tmp_path, driver=drv, max_frames=10, agent={"max_consecutive_refusals": 3})
    agent.policy = Stare()  # the same field: a second scan would double the peak dose
    peak_after_one = []
    drv.on("acquire", 2, lambda: peak_after_one.append(agent.gate.peak_dose_e_per_A2))
    summary = await agent.run()
    assert summary.exit_status == "fail" and summary.commands_refused == 3
    outcomes = [c["outcome"] for c in RunLog.open(summary.log_path).event_data("commands")]
    assert outcomes == ["sent"] + ["sent", "refused_by_device"] * 3
    # while the second scan was on the device the gate counted it; refused, its dose came back out
    assert summary.peak_dose_e_per_A2 < 0.6 * peak_after_one[0]


class GiveUpWhenRefused:
    """Parks outside the allowed area; when told the park was refused, finishes (as the manipulation policy does)."""

    name = "give-up"

    def __init__(self) -> None:
        self.stop_reason = ""

    def decide(self, obs: Observation) -> Decision:
        if "refused" in obs.features:
            self.stop_reason = "the safety gate refused the last command"
            return Decision(Blank(), self.name, "done")
        return Decision(Park((1000.0, 0.0), 0.01), self.name, "park outside the area")


async def test_a_policy_that_finishes_on_a_refusal_ends_the_run_failed_with_the_gate_reason(tmp_path):
    agent, drv = await scripted_agent(tmp_path, max_frames=10)
    agent.policy = GiveUpWhenRefused()
    summary = await agent.run()
    assert summary.exit_status == "fail" and summary.state == "aborted", summary.reason
    assert summary.reason.startswith("refused: area: park position (1000.0, 0.0) Å is outside the allowed area")
    assert summary.reason.endswith("(the policy finished: the safety gate refused the last command)")
    log = RunLog.open(summary.log_path)
    assert log.stop["exit_status"] == "fail" and log.stop["reason"] == summary.reason
    assert summary.parks == 0 and drv.count("park") == 0 and drv.beam_blanked and summary.beam_blanked_at_end


async def test_a_policy_that_finishes_after_a_refused_command_was_followed_by_a_sent_one_succeeds(tmp_path):
    class RefusedOnceThenDone(GiveUpWhenRefused):
        def decide(self, obs: Observation) -> Decision:
            if "refused" in obs.features:
                return Decision(ScanRegion(obs.geometry), self.name, "the field again")
            if obs.frame_index >= 1:
                self.stop_reason = "seen enough"
                return Decision(Blank(), self.name, "done")
            return super().decide(obs)

    agent, drv = await scripted_agent(tmp_path, max_frames=10)
    agent.policy = RefusedOnceThenDone()
    summary = await agent.run()
    assert summary.exit_status == "success" and summary.reason == "the policy finished: seen enough"
    assert summary.commands_refused == 1 and summary.frames == 2


class StopsAfterOneFrame:
    name = "goal"

    def __init__(self, reached: bool | None) -> None:
        self.stop_reason = ""
        self.goal_reached: bool | None = None
        self._reached = reached

    def decide(self, obs: Observation) -> Decision:
        self.stop_reason, self.goal_reached = "out of parks", self._reached
        return Decision(Blank(), self.name, "done")


@pytest.mark.parametrize(("reached", "status", "reason"), [
    (False, "fail", "goal not reached (the policy finished: out of parks)"),
    (True, "success", "the policy finished: out of parks"),
    (None, "success", "the policy finished: out of parks"),  # a policy without a goal
])
async def test_a_policy_that_stops_short_of_its_goal_ends_the_run_failed_and_blanked(tmp_path, reached, status, reason):
    agent, drv = await scripted_agent(tmp_path, max_frames=10)
    agent.policy = StopsAfterOneFrame(reached)
    summary = await agent.run()
    assert (summary.exit_status, summary.reason) == (status, reason)
    log = RunLog.open(summary.log_path)
    assert (log.stop["exit_status"], log.stop["reason"]) == (status, reason)
    assert drv.beam_blanked and summary.beam_blanked_at_end and summary.frames == 1


async def test_a_park_that_always_faults_is_retried_with_backoff_then_fails_the_run_blanked(tmp_path):
    clock = VirtualClock()
    drv = ScriptedDriver(clock=clock).fail("park", DriverFault("park failed"))
    agent, _ = await scripted_agent(tmp_path, driver=drv, max_frames=10, agent={"retry_s": 0.5, "max_fault_retries": 3})
    agent.policy = Parker()
    summary = await asyncio.wait_for(agent.run(), timeout=60)  # the old loop retried forever
    assert summary.exit_status == "fail" and summary.faults == 4 and drv.count("park") == 4, summary.reason
    assert summary.reason == ("gave up: 4 faults in a row with no command completed between them (max_fault_retries=3); "
                              "last: DriverFault('park failed')")
    assert drv.beam_blanked and summary.beam_blanked_at_end and drv.calls[-2:] == ["blank", "close"]
    # the first retry at once, then waits of retry_s, 2 retry_s on the injected clock
    t_park = [c.t_s for c in drv.log if c.op == "park"]
    assert np.diff(t_park) == pytest.approx([0.0, 0.5, 1.0])
    log = RunLog.open(summary.log_path)
    kinds = [e["kind"] for e in log.event_data("interruptions")]
    assert kinds.count("fault") == 4 and kinds.count("recovered") == 3 and kinds.count("retry") == 2
    assert kinds[-2:] == ["gave_up", "state"] and log.stop["exit_status"] == "fail"
    assert log.stop["reason"] == summary.reason


async def test_a_device_that_never_comes_back_gets_bounded_reconnect_attempts_with_capped_backoff(tmp_path):
    clock = VirtualClock()
    drv = ScriptedDriver(clock=clock)
    drv.fail("acquire", DriverFault("link lost"), at=2)
    agent, _ = await scripted_agent(tmp_path, driver=drv, max_frames=10,
                                    agent={"retry_s": 0.01, "retry_max_s": 0.05, "max_reconnect_attempts": 5})
    drv.fail("connect", DriverFault("still down"))  # every connect from now on (call 1 was build_agent's)
    summary = await asyncio.wait_for(agent.run(), timeout=60)
    assert summary.exit_status == "fail" and summary.faults == 1, summary.reason
    assert summary.reason == ("gave up: the device did not answer 5 reconnect attempts (max_reconnect_attempts=5); "
                              "last: DriverFault('still down')")
    t_connect = [c.t_s for c in drv.log if c.op == "connect"][2:]  # the build's, the run's, then the attempts
    assert len(t_connect) == 5 and np.diff(t_connect) == pytest.approx([0.01, 0.02, 0.04, 0.05])
    assert drv.beam_blanked and summary.beam_blanked_at_end
    assert RunLog.open(summary.log_path).stop["exit_status"] == "fail"


class ReplaceFirstPark:
    """A stage whose ``to_device`` replaces the first park by a blank (as the drift stage does when
    it cannot place the beam) and passes everything else through."""

    name = "replacer"

    def __init__(self) -> None:
        self.replaced = 0

    def process(self, obs: Observation) -> Observation:
        return obs

    def to_device(self, command, start_s):  # type: ignore[no-untyped-def]
        if isinstance(command, Park) and not self.replaced:
            self.replaced += 1
            return Blank(), {"replaced": "the estimate cannot place the beam"}
        return command, {}


class SaysWhatItSaw:
    """Parks after every frame; its reason says whether the frame came after a replaced command."""

    name = "says"

    def decide(self, obs: Observation) -> Decision:
        seen = "replaced" if "replaced" in obs.features else "plain"
        return Decision(Park(obs.geometry.center_A, 0.01), self.name, f"after a {seen} command")


async def test_the_observation_after_a_replaced_command_says_so_and_the_replay_agrees(tmp_path):
    from stemagent.pipeline.verify import verify_log

    agent, drv = await scripted_agent(tmp_path, max_frames=3)
    agent.pipeline = Pipeline([ReplaceFirstPark(), PolicyStage(SaysWhatItSaw())])
    summary = await agent.run()
    assert summary.exit_status == "success" and summary.frames == 3
    log = RunLog.open(summary.log_path)
    reasons = [(d["observation"], d["reason"]) for d in log.event_data("decisions")]
    # frame 0 -> park (replaced by a blank: the field again) -> frame 1 says so; later ones do not
    assert reasons[:2] == [("frame", "after a plain command"), ("frame", "after a replaced command")]
    assert all(r == "after a plain command" for _, r in reasons[2:])
    assert drv.count("park") == summary.parks >= 1
    report = verify_log(log, Pipeline([ReplaceFirstPark(), PolicyStage(SaysWhatItSaw())]))
    # (the log's start names the config's pipeline, not the one swapped in: that difference is index -1)
    assert [d for d in report.divergences if d.index >= 0] == [] and report.compared["decision"] == len(reasons)


class CountsFrozen:
    name = "counts-frozen"

    def __init__(self) -> None:
        self.frozen: list[int] = []

    def decide(self, obs: Observation) -> Decision:
        import gc  # noqa: PLC0415 - lazy: only this double looks at the collector

        self.frozen.append(gc.get_freeze_count())
        return Decision(ScanRegion(obs.geometry), self.name, "again")


@pytest.mark.parametrize("freeze", [True, False])
async def test_the_run_freezes_what_it_was_built_with_out_of_the_collector_and_undoes_it(tmp_path, freeze):
    import gc  # noqa: PLC0415 - lazy: only this test looks at the collector

    assert gc.get_freeze_count() == 0
    agent, _ = await scripted_agent(tmp_path, max_frames=3, agent={"freeze_gc": freeze})
    policy = CountsFrozen()
    agent.policy = policy
    summary = await agent.run()
    assert summary.frames == 3 and len(policy.frozen) == 3
    assert all(n > 1000 for n in policy.frozen) if freeze else policy.frozen == [0, 0, 0]
    assert gc.get_freeze_count() == 0  # the run's objects may be collected once it ended
