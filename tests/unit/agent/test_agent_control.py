"""Operator control is strict, logged with its values, always answered (issue 10, defect 7)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stemagent.agent.control import ControlMessage
from stemagent.agent.app.factory import build_agent, build_clock
from stemagent.agent.telemetry import MqttTelemetry
from stemagent.config import TelemetryConfig, config_from_dict
from stemagent.driver import DriverFault
from stemagent.errors import ConfigError
from stemagent.runlog import RunLog
from stemagent.simulators.minimal import MinimalTwinDriver

CFG = {
    "name": "ctl", "max_frames": 3,
    "scan": {"fov_A": 12.8, "shape_px": 32, "dwell_s": 1e-5},
    "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0, "dose_budget_e_per_A2": 1e8},
    "log": {"fsync": False},
}


async def agent_and_sink(tmp_path, **over):
    cfg = config_from_dict({**CFG, **over})
    clock = build_clock(cfg)
    sink = MqttTelemetry(TelemetryConfig(host="127.0.0.1"), run_name=cfg.name, run_id="test")  # never connected
    agent = await build_agent(cfg, run_dir=tmp_path / "run", driver=MinimalTwinDriver(cfg.driver, clock=clock),
                              clock=clock, telemetry=sink)
    sink.attach(agent)
    return agent, sink


@pytest.mark.parametrize(
    "body, field",
    [
        ({"command": "set_target", "target_A": [5000, 5000]}, "outside the allowed area"),
        ('{"command": "set_target", "target_A": [NaN, Infinity]}', "target_A"),
        ({"command": "set_target", "target_A": ["NaN", 1]}, "target_A"),
        ({"command": "set_dose_budget", "value": True}, "value"),
        ({"command": "set_dose_budget", "value": "1e3"}, "value"),
        ('{"command": "set_dose_budget", "value": 1e400}', "value"),
        ({"command": "set_dose_budget"}, "value"),
        ({"command": "pause", "confirm": 1}, "confirm"),
    ],
)
async def test_bad_values_are_refused_with_a_reason(tmp_path, body, field):
    agent, sink = await agent_and_sink(tmp_path)
    raw = body if isinstance(body, str) else json.dumps(body)
    ack = sink.handle_control(raw.encode())
    assert ack.accepted is False and field in ack.detail
    assert agent.target_A is None and agent.gate.dose_budget_e_per_A2 == 1e8
    await agent.run()


async def test_a_budget_below_the_delivered_dose_needs_confirmation_and_the_log_keeps_the_value(tmp_path):
    agent, sink = await agent_and_sink(tmp_path)
    agent.gate.map.values[3, 3] = 5e4  # as if 5e4 e/Å² had been delivered somewhere
    low = json.dumps({"command": "set_dose_budget", "value": 1e3, "id": "b1"}).encode()
    ack = sink.handle_control(low)
    assert not ack.accepted and "already delivered" in ack.detail and "confirm" in ack.detail
    ack = sink.handle_control(json.dumps({"command": "set_dose_budget", "value": 1e3, "confirm": True, "id": "b2"}).encode())
    assert ack.accepted and agent.gate.dose_budget_e_per_A2 == 1e3
    ack = sink.handle_control(json.dumps({"command": "set_target", "target_A": [3.0, -4.0], "id": "t1"}).encode())
    assert ack.accepted and agent.target_A == (3.0, -4.0)
    summary = await agent.run()  # every scan is now refused: the run ends and says so
    assert summary.exit_status == "fail" and "refused" in summary.reason
    log = RunLog.open(summary.log_path)
    controls = {c["id"]: c for c in log.event_data("controls")}
    assert controls["b1"]["accepted"] is False and controls["b1"]["arguments"] == {"value": 1e3}
    assert controls["b2"]["accepted"] is True and controls["b2"]["arguments"] == {"value": 1e3, "confirm": True}
    assert controls["t1"]["arguments"] == {"target_A": [3.0, -4.0]}
    reasons = {e["kind"]: e["reason"] for e in log.event_data("interruptions") if e["kind"].startswith("control:")}
    assert "value=1000.0" in reasons["control:set_dose_budget"]


async def test_acks_are_never_dropped_behind_telemetry(tmp_path):
    agent, sink = await agent_and_sink(tmp_path)
    for i in range(1000):
        sink.publish("frame", {"frame_index": i})  # a flood of telemetry
        sink.handle_control(json.dumps({"command": "resume", "id": f"r{i}"}).encode())
    acks = [json.loads(body) for _, body, _, _ in sink._acks]
    assert [a["id"] for a in acks] == [f"r{i}" for i in range(1000)]
    assert sink.stats["dropped"] > 0  # telemetry did overflow; acks did not
    await agent.run()


class DeadBridge(MinimalTwinDriver):
    """Lost after the first frame; every reconnect attempt hangs for a long time."""

    async def acquire(self, g):
        if self.frames_acquired >= 1:
            raise DriverFault("bridge lost")
        return await super().acquire(g)

    async def connect(self):
        if self.frames_acquired:
            await asyncio.sleep(30.0)  # e.g. the ZeroMQ driver's connect timeout
        await super().connect()


async def test_abort_interrupts_a_reconnect_attempt(tmp_path):
    cfg = config_from_dict({**CFG, "max_frames": 100, "agent": {"retry_s": 0.01}})
    clock = build_clock(cfg)
    twin = DeadBridge(cfg.driver, clock=clock)
    agent = await build_agent(cfg, run_dir=tmp_path / "run", driver=twin, clock=clock)
    task = asyncio.ensure_future(agent.run())
    while agent.sm.state.value != "faulted":
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.05)  # inside the hanging reconnect
    t0 = time.monotonic()
    agent.control(ControlMessage(command="abort", reason="operator"))
    summary = await asyncio.wait_for(task, timeout=5.0)
    assert time.monotonic() - t0 < 2.0  # not the 30 s the reconnect would have taken
    assert summary.exit_status == "abort" and twin.beam_blanked


def test_topics_carry_the_run_id_and_prefixes_are_checked():
    cfg = TelemetryConfig(host="127.0.0.1")
    a = MqttTelemetry(cfg, run_name="same", run_id="20260101-000000-aaaaaa")
    b = MqttTelemetry(cfg, run_name="same", run_id="20260101-000000-bbbbbb")
    assert a.control_topic != b.control_topic and a.control_topic.endswith("/same/20260101-000000-aaaaaa/control")
    for bad in ("lab/+/x", "lab/#", "/lab", "lab//x", "lab x", "lab/"):
        with pytest.raises(ConfigError, match="telemetry.topic_prefix"):
            config_from_dict({"telemetry": {"topic_prefix": bad}})


# --- property: random messages ---------------------------------------------------------------

values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=8), st.lists(st.one_of(st.floats(-1e4, 1e4), st.text(max_size=3), st.booleans()), max_size=3))
messages = st.fixed_dictionaries(
    {},
    optional={
        "command": st.one_of(st.sampled_from(["pause", "resume", "stop", "set_target", "set_dose_budget", "abort"]), st.text(max_size=6)),
        "id": st.one_of(st.text(max_size=200), st.integers()),
        "value": values, "target_A": values, "confirm": values, "reason": st.one_of(st.text(max_size=600), st.integers()),
        "version": st.one_of(st.just(1), values), "extra": values,
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(messages, min_size=1, max_size=8))
def test_random_control_messages_are_always_answered(tmp_path_factory, batch):
    async def go():
        agent, sink = await agent_and_sink(tmp_path_factory.mktemp("r"))
        for m in batch:
            before = len(sink._acks)
            ack = sink.handle_control(json.dumps(m).encode())
            assert len(sink._acks) == before + 1  # exactly one acknowledgement, on the ack queue
            assert ack.accepted or ack.detail  # a refusal always says why
        agent.control(ControlMessage(command="abort"))
        summary = await agent.run()
        assert summary.beam_blanked_at_end and agent.driver.beam_blanked
        RunLog.open(summary.log_path)  # the log stays readable

    asyncio.run(go())
