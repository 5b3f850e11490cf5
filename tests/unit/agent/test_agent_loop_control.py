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
