"""Done-when test of issue 4: the closed loop with the twin behind ``stemagent bridge`` in another
process, the agent connected over ZeroMQ on loopback, operator control over a real mosquitto.

pause, resume and stop over MQTT work and are logged; killing the bridge mid-run makes the agent
blank (best effort: the console is gone, so the attempt is logged as failed), log the fault and
hold in ``faulted``; restarting the bridge lets the run resume on its own.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import aiomqtt
import pytest

from stemagent.agent.app.factory import build_agent
from stemagent.agent.app.telemetry_factory import open_telemetry
from stemagent.config import config_from_dict
from stemagent.runlog import RunLog

from transport_fakes import free_port

pytestmark = [pytest.mark.system, pytest.mark.slow]

RUN = "bridgeloop"
RUN_ID = "t1"


class Collector:
    """Every MQTT document under ``stemagent/<run>/#``, with a way to await one."""

    def __init__(self) -> None:
        self.docs: list[tuple[str, dict[str, Any]]] = []
        self._new = asyncio.Event()

    async def pump(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            self.docs.append((str(m.topic).rsplit("/", 1)[-1], json.loads(m.payload)))  # type: ignore[arg-type]
            self._new.set()

    async def wait(self, pred: Callable[[str, dict[str, Any]], bool], start: int = 0, timeout_s: float = 30.0) -> int:
        """Index (after ``start``) of the first document matching ``pred``."""

        async def scan() -> int:
            i = start
            while True:
                while i < len(self.docs):
                    if pred(*self.docs[i]):
                        return i
                    i += 1
                self._new.clear()
                await self._new.wait()

        return await asyncio.wait_for(scan(), timeout=timeout_s)


def status_is(state: str) -> Callable[[str, dict[str, Any]], bool]:
    return lambda kind, d: kind == "status" and d.get("state") == state


def ack_for(cid: str) -> Callable[[str, dict[str, Any]], bool]:
    return lambda kind, d: kind == "ack" and d.get("id") == cid


def start_bridge(config: Path, log: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("stemagent")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "stemagent.agent.app.cli"]
    with open(log, "ab") as out:
        return subprocess.Popen([*cmd, "bridge", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)


async def test_closed_loop_over_bridge_with_mqtt_control(mosquitto: int, tmp_path: Path) -> None:
    control_port, frames_port = free_port(), free_port()
    bridge_cfg = tmp_path / "bridge.yaml"
    bridge_cfg.write_text(
        f"control_endpoint: tcp://127.0.0.1:{control_port}\n"
        f"frames_endpoint: tcp://127.0.0.1:{frames_port}\n"
        "client_timeout_s: 5.0\n"
        "driver: {kind: minimal-twin, pace: fast}\n"
    )
    cfg = config_from_dict(
        {
            "name": RUN,
            "seed": 3,
            "max_frames": 100000,  # ended by the operator's stop
            "driver": {
                "kind": "zmq",
                "control_endpoint": f"tcp://127.0.0.1:{control_port}",
                "frames_endpoint": f"tcp://127.0.0.1:{frames_port}",
                "heartbeat_interval_s": 0.1,
                "heartbeat_timeout_s": 0.5,
                "reconnect_min_s": 0.05,
                "reconnect_max_s": 0.3,
                "connect_timeout_s": 15.0,  # the bridge process may still be starting
                "request_timeout_s": 5.0,
            },
            "scan": {"fov_A": 12.8, "shape_px": 64, "dwell_s": 2e-6},
            "safety": {"max_commands_per_s": 1e6, "watchdog_s": 5.0, "area_half_width_A": 60.0},
            "telemetry": {"host": "127.0.0.1", "port": mosquitto},
            "agent": {"retry_s": 0.1},
            "log": {"directory": str(tmp_path / "runs"), "fsync": False},
        }
    )
    bridge_log = tmp_path / "bridge.log"
    bridge = start_bridge(bridge_cfg, bridge_log)
    coll = Collector()
    try:
        async with aiomqtt.Client("127.0.0.1", mosquitto, identifier="operator") as op:
            await op.subscribe(f"stemagent/{RUN}/{RUN_ID}/#", qos=1)
            pump = asyncio.ensure_future(coll.pump(op))

            async def send(cid: str, command: str, **fields: Any) -> int:
                body = json.dumps({"command": command, "id": cid, **fields})
                await op.publish(f"stemagent/{RUN}/{RUN_ID}/control", body, qos=1)
                i = await coll.wait(ack_for(cid))
                assert coll.docs[i][1]["accepted"] is True, coll.docs[i][1]
                return i

            try:
                async with open_telemetry(cfg, RUN_ID) as telemetry:
                    assert telemetry is not None
                    agent = await build_agent(cfg, run_dir=tmp_path / "runs" / "r1", telemetry=telemetry)
                    telemetry.attach(agent)
                    run = asyncio.ensure_future(agent.run())

                    i = await coll.wait(status_is("running"))
                    i = await coll.wait(lambda k, d: k == "frame", i)

                    # pause and resume over MQTT
                    i = await send("p1", "pause")
                    i = await coll.wait(status_is("paused"), i)
                    frames_when_paused = agent.summary.frames
                    i = await send("r1", "resume")
                    i = await coll.wait(status_is("running"), i)
                    i = await coll.wait(lambda k, d: k == "frame", i)
                    assert agent.summary.frames > frames_when_paused

                    # the bridge dies mid-run: the agent faults, blanks (best effort) and holds
                    bridge.send_signal(signal.SIGKILL)
                    bridge.wait(timeout=10)
                    i = await coll.wait(lambda k, d: k == "fault", i)
                    i = await coll.wait(status_is("faulted"), i)
                    frames_at_fault = agent.summary.frames

                    # a new bridge on the same endpoints: the run resumes by itself
                    bridge = start_bridge(bridge_cfg, bridge_log)
                    i = await coll.wait(status_is("running"), i)
                    i = await coll.wait(lambda k, d: k == "frame", i)
                    assert agent.summary.frames > frames_at_fault

                    await send("t1", "set_target", target_A=[1.0, 2.0])
                    await send("d1", "set_dose_budget", value=1e12)
                    assert agent.target_A == (1.0, 2.0)
                    await send("s1", "stop")
                    summary = await asyncio.wait_for(run, timeout=30)
            finally:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
    finally:
        if bridge.poll() is None:
            bridge.send_signal(signal.SIGTERM)
            try:
                bridge.wait(timeout=10)
            except subprocess.TimeoutExpired:
                bridge.kill()
                bridge.wait()

    assert summary.state == "stopped" and summary.reason == "operator stop", summary
    assert summary.faults >= 1 and summary.beam_blanked_at_end
    log = RunLog.open(summary.log_path)
    kinds = [e["data"]["kind"] for e in log.events("interruptions")]
    for expected in ("control:pause", "control:resume", "fault", "recovered", "control:set_target",
                     "control:set_dose_budget", "control:stop"):
        assert expected in kinds, (expected, kinds)
    # the agent tried to blank at the fault; with the console gone the attempt failed and says so
    assert kinds.index("fault") > kinds.index("control:resume")
    assert "blank_failed" in kinds[kinds.index("control:resume"):]
