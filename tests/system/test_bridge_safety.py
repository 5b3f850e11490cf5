"""The bridge keeps the beam safe on its own (issue 10, defects 3 and 12)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from stemagent.codec import encode_geometry
from stemagent.drivers.bridge import Bridge, BridgeLimits
from stemagent.types import ScanGeometry

from transport_fakes import FakeMicroscope, free_port

pytestmark = pytest.mark.system

GEOM = encode_geometry(ScanGeometry(center_A=(3.0, -2.0), fov_A=(20.0, 10.0), shape_px=(32, 64), dwell_s=1e-6))
_ids = itertools.count()


class Raw:
    """A bare DEALER client: sends any JSON it is given, as any client id."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    async def send(self, op: str, client: str | None = "a", **fields: Any) -> dict[str, Any]:
        req = {"v": 2, "id": f"r{next(_ids)}", "op": op, **fields}
        if client is not None:
            req["client"] = client
        await self.sock.send_multipart([json.dumps(req).encode()])
        return await self.reply()

    async def reply(self) -> dict[str, Any]:
        parts = await asyncio.wait_for(self.sock.recv_multipart(), timeout=5)
        return json.loads(parts[0])

    def close(self) -> None:
        self.sock.close(linger=0)


async def started(scope: FakeMicroscope, **kw: Any) -> tuple[Bridge, asyncio.Task[None]]:
    bridge = Bridge(scope, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", **kw)
    await bridge.start()
    return bridge, asyncio.ensure_future(bridge.serve())


async def stopped(bridge: Bridge, task: asyncio.Task[None]) -> None:
    bridge.stop()
    await asyncio.wait_for(task, timeout=5)
    await bridge.close()


@pytest.mark.parametrize(
    "op, fields, why",
    [
        ("acquire", {"geometry": {**GEOM, "center_A": [1e300, 0.0]}}, "center_A"),
        ("acquire", {"geometry": {**GEOM, "rotation_rad": 1e308}}, "rotation_rad"),
        ("acquire", {"geometry": {**GEOM, "center_A": [400.0, 0.0]}}, "area"),
        ("acquire", {"geometry": {**GEOM, "fov_A": [300.0, 300.0]}}, "max_fov_A"),
        ("acquire", {"geometry": {**GEOM, "shape_px": [8000, 8000], "fov_A": [80.0, 80.0]}}, "max_shape_px"),
        ("acquire", {"geometry": {**GEOM, "dwell_s": 0.5}}, "dwell_s"),
        ("acquire", {"geometry": {**GEOM, "shape_px": [2048, 2048], "fov_A": [80.0, 80.0], "dwell_s": 1e-5}}, "max_scan_s"),
        ("park", {"position_A": [5000.0, 5000.0], "dwell_s": 0.1}, "area"),
        ("park", {"position_A": [0.0, 0.0], "dwell_s": 3600.0}, "max_park_s"),
        ("stream_start", {"stream": "s1", "geometry": {**GEOM, "center_A": [-400.0, 0.0]}, "n_frames": 1}, "area"),
    ],
)
async def test_the_bridge_refuses_commands_past_its_own_limits(op, fields, why):
    """Issue 10 defect 3: an acquire at 1e300 Å with rotation 1e308 and a park at (5000, 5000) Å
    went through; a 3600 s park grew the twin to 9 GB."""
    scope = FakeMicroscope()
    limits = BridgeLimits(area_half_width_A=200.0, max_fov_A=256.0, max_shape_px=4096, max_scan_s=30.0, max_park_s=10.0)
    bridge, task = await started(scope, limits=limits)
    raw = Raw(bridge.control_endpoint)
    try:
        reply = await raw.send(op, **fields)
        assert reply["ok"] is False and why in reply["error"]["message"], reply
        assert not ({"acquire", "park", "stream"} & set(scope.calls)) and scope.beam_blanked
        ok = await raw.send("acquire", geometry=GEOM)  # a sane command still runs
        assert ok["ok"] is True
    finally:
        raw.close()
        await stopped(bridge, task)


async def test_limits_follow_the_device_capabilities():
    scope = FakeMicroscope()  # reports max_fov_A 512 and dwell 1e-7..1e-2
    bridge, task = await started(scope, limits=BridgeLimits(max_fov_A=1e4, min_dwell_s=1e-9, max_dwell_s=1.0))
    try:
        assert (bridge.limits.max_fov_A, bridge.limits.min_dwell_s, bridge.limits.max_dwell_s) == (512.0, 1e-7, 1e-2)
    finally:
        await stopped(bridge, task)


async def test_only_the_controlling_client_feeds_the_watchdog():
    """Issue 10 defect 3: any message, even another client's status poll, held the watchdog off."""
    scope = FakeMicroscope()
    scope_gate = scope.hold("acquire")  # the acquire hangs with the beam on until released
    bridge, task = await started(scope, client_timeout_s=0.3)
    agent, other = Raw(bridge.control_endpoint), Raw(bridge.control_endpoint)
    try:
        await agent.sock.send_multipart([json.dumps({"v": 2, "id": "scan1", "client": "agent", "op": "acquire",
                                                     "geometry": GEOM}).encode()])
        while not bridge._beam_maybe_on:
            await asyncio.sleep(0.01)
        refused = await other.send("park", client="other", position_A=[0.0, 0.0], dwell_s=0.01)
        assert refused["ok"] is False and "another client" in refused["error"]["message"]
        t0 = time.monotonic()
        while bridge.stats["watchdog_blanks"] == 0:  # the other client polls; garbage arrives; the agent is silent
            await other.send("status", client="other")
            await other.sock.send_multipart([b"garbage"])
            assert time.monotonic() - t0 < 5.0, "the watchdog never fired"
            await asyncio.sleep(0.05)
        assert scope.beam_blanked and time.monotonic() - t0 > 0.25  # not before the controller's timeout
        reply = await agent.reply()
        assert reply["id"] == "scan1" and reply["error"]["type"] == "Cancelled"
        # control is free again: the other client may take the beam now
        scope_gate.set()
        assert (await other.send("acquire", client="other", geometry=GEOM))["ok"] is True
    finally:
        agent.close()
        other.close()
        await stopped(bridge, task)


async def test_the_controllers_heartbeats_keep_a_long_scan_going():
    scope = FakeMicroscope()
    scope_gate = scope.hold("acquire")
    bridge, task = await started(scope, client_timeout_s=0.3)
    agent = Raw(bridge.control_endpoint)
    try:
        await agent.sock.send_multipart([json.dumps({"v": 2, "id": "long", "client": "agent", "op": "acquire",
                                                     "geometry": GEOM}).encode()])
        for _ in range(12):  # 0.6 s of heartbeats: twice the timeout
            assert (await agent.send("heartbeat", client="agent"))["ok"]
            await asyncio.sleep(0.05)
        assert bridge.stats["watchdog_blanks"] == 0
        scope_gate.set()
        assert (await agent.reply())["ok"] is True
    finally:
        agent.close()
        await stopped(bridge, task)


async def test_rejections_are_logged_a_few_then_counted(caplog):
    scope = FakeMicroscope()
    bridge, task = await started(scope)
    raw = Raw(bridge.control_endpoint)
    try:
        with caplog.at_level(logging.WARNING, logger="stemagent.drivers.bridge"):
            for i in range(2000):
                await raw.sock.send_multipart([b"junk %d" % i])
            assert (await raw.send("status"))["ok"]
        assert bridge.stats["rejected"] == 2000
        lines = [r for r in caplog.records if "rejected" in r.getMessage()]
        assert 10 <= len(lines) <= 13 and all(r.levelno == logging.WARNING for r in lines)
    finally:
        raw.close()
        await stopped(bridge, task)


# --- the bridge process -------------------------------------------------------------------------


def bridge_process(tmp_path: Path, body: str) -> tuple[subprocess.Popen[str], Path]:
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(body)
    proc = subprocess.Popen([sys.executable, "-m", "stemagent.agent.app.cli", "bridge", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, cfg


def test_the_bridge_says_what_it_serves_and_blanks_on_sigterm_during_a_park(tmp_path):
    port, fport = free_port(), free_port()
    proc, _ = bridge_process(tmp_path, f"control_endpoint: tcp://127.0.0.1:{port}\nframes_endpoint: tcp://127.0.0.1:{fport}\n"
                                       "driver: {kind: twin, specimen_size_A: 60.0, pace: realtime}\n")
    try:
        first = proc.stderr.readline()  # printed at start, without -v
        assert "backend TwinDriver" in first and f"tcp://127.0.0.1:{port}" in first and "park ≤ 10.0 s" in first
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://127.0.0.1:{port}")
        s.send_json({"v": 2, "id": "p1", "client": "t", "op": "park", "position_A": [0.0, 0.0], "dwell_s": 8.0})
        time.sleep(0.5)  # parked, beam on
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert time.monotonic() - t0 < 5.0 and proc.returncode == 0
        assert "beam blanked (SIGTERM)" in err and "stopped (SIGTERM); beam blanked" in err
        s.close(linger=0)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("problem", ["port in use", "malformed endpoint"])
def test_bridge_endpoint_errors_are_one_line(tmp_path, problem):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        endpoint = f"tcp://127.0.0.1:{port}" if problem == "port in use" else "tcp://no-such-host-xyz:99"
        proc, cfg = bridge_process(tmp_path, f"control_endpoint: {endpoint}\nframes_endpoint: tcp://127.0.0.1:{free_port()}\n")
        out, err = proc.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error:") and "control_endpoint" in lines[0] and endpoint in lines[0]
