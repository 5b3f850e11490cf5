"""The live page's server (issue 22): token, control through the agent's own path, snapshots, replay.

Real sockets (the server on a free loopback port, an aiohttp client), a real agent on the
minimal twin and its real run log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import aiohttp
import numpy as np
import pytest

from view_doubles import start_live_agent, until
from stemagent.agent.view.live import LiveSource
from stemagent.agent.view.replay import ReplaySource
from stemagent.agent.view.server import TOKEN_HEADER, ViewServer, parse_address
from stemagent.agent.view.snapshot import display_image, dose_part
from stemagent.errors import InputError
from stemagent.runlog import RunLog

CFG = {
    "name": "view", "seed": 3, "max_frames": 400,
    "scan": {"fov_A": 12.8, "shape_px": 64, "dwell_s": 1e-5},
    "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0, "dose_budget_e_per_A2": 1e9},
    "log": {"fsync": False},
}


async def live_agent(tmp_path, **over):
    return await start_live_agent(tmp_path, {**CFG, **over})


async def post(session, url, body, token=None):
    headers = {} if token is None else {TOKEN_HEADER: token}
    async with session.post(url, data=body if isinstance(body, (bytes, str)) else json.dumps(body), headers=headers) as r:
        return r.status, await r.json()


async def test_control_needs_the_token_and_pauses_the_agent_through_its_own_path(tmp_path):
    agent, source = await live_agent(tmp_path)
    async with ViewServer(source, "127.0.0.1", 0, min_interval_s=0.0) as server, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{server.port}"
        assert server.url.startswith(base) and server.url.endswith(f"#token={server.token}")
        run = asyncio.ensure_future(agent.run())
        await until(lambda: agent.summary.frames >= 2)
        # refused without the token (401) and with a wrong one (403): nothing reaches the agent
        assert (await post(s, f"{base}/api/control", {"command": "pause"}))[0] == 401
        assert (await post(s, f"{base}/api/control", {"command": "pause"}, token="wrong"))[0] == 403
        assert agent.sm.state.value == "running" and not agent._pause_requested
        # invalid (same strict validation as MQTT): 400 naming the field
        status, ack = await post(s, f"{base}/api/control", {"command": "pause", "confirm": 1, "id": "bad"}, server.token)
        assert status == 400 and ack["accepted"] is False and ack["id"] == "bad" and "confirm" in ack["detail"]
        # a target outside the allowed area: the agent's own check refuses it (409)
        status, ack = await post(s, f"{base}/api/control", {"command": "set_target", "target_A": [500.0, 0.0], "id": "t0"},
                                 server.token)
        assert status == 409 and "outside the allowed area" in ack["detail"] and agent.target_A is None
        status, ack = await post(s, f"{base}/api/control", {"command": "set_target", "target_A": [1.5, -2.0], "id": "t1"},
                                 server.token)
        assert status == 200 and ack["accepted"] and agent.target_A == (1.5, -2.0)
        status, ack = await post(s, f"{base}/api/control", {"command": "pause", "id": "p1"}, server.token)
        assert status == 200 and ack == {"version": 1, "id": "p1", "command": "pause", "accepted": True, "state": "running",
                                         "detail": ""}
        await until(lambda: agent.sm.state.value == "paused")
        frames = agent.summary.frames
        async with s.get(f"{base}/api/snapshot?after=-1") as r:
            doc = await r.json()
        assert doc["state"] == "paused" and doc["target_A"] == [1.5, -2.0]
        assert any(e["kind"] == "ack" and "pause (p1) accepted" in e["text"] for e in doc["events"])
        await asyncio.sleep(0.3)
        assert agent.summary.frames == frames  # paused: no frame meanwhile
        status, ack = await post(s, f"{base}/api/control", {"command": "stop", "id": "s1"}, server.token)
        assert status == 200
        summary = await asyncio.wait_for(run, 30)
    assert summary.reason == "operator stop" and summary.pauses == 1 and summary.frames < CFG["max_frames"]
    controls = RunLog.open(summary.log_path).event_data("controls")
    assert [(c["command"], c["id"], c["accepted"]) for c in controls] == [
        ("set_target", "t0", False), ("set_target", "t1", True), ("pause", "p1", True), ("stop", "s1", True)]
    assert server.stats["refused_token"] == 2


async def test_snapshot_long_polls_and_shows_the_frame_atoms_and_next_command(tmp_path):
    agent, source = await live_agent(tmp_path, max_frames=3)
    async with ViewServer(source, "127.0.0.1", 0, min_interval_s=0.0, poll_s=0.2) as server, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{server.port}"
        async with s.get(f"{base}/api/snapshot?after={source.seq}") as r:
            assert r.status == 204  # nothing new within poll_s
        async with s.get(f"{base}/api/snapshot?after=x") as r:
            assert r.status == 400 and "after='x'" in (await r.json())["error"]
        async with s.get(f"{base}/") as r:
            assert r.status == 200 and "<canvas id=\"frame\"" in await r.text()
        async with s.get(f"{base}/view.js") as r:
            assert r.status == 200 and "/api/control" in await r.text()
        summary = await agent.run()
        async with s.get(f"{base}/api/snapshot?after=-1") as r:
            doc = await r.json()
    assert summary.frames == 3 and doc["state"] == "stopped" and doc["frames_done"] == 3
    # the shown frame's own arrival and ready times (wall clock, the browser's), in that order
    assert 0 < doc["arrived_wall_s"] <= doc["ready_wall_s"] <= time.time()
    f = doc["frame"]
    img = np.frombuffer(base64.b64decode(f["image_b64"]), dtype=np.uint8).reshape(f["height"], f["width"])
    assert img.shape == (64, 64) and img.std() > 10  # a real image, stretched to 8 bits
    last = agent.last_observation
    assert f["index"] == last.frame.index and len(doc["atoms"]["col_row"]) == len(last.atoms) > 10
    # the displayed pixels map back to the atoms' sample positions
    m = np.asarray(f["px_to_A"])
    cr = np.asarray(doc["atoms"]["col_row"])
    xy = cr @ m[:, :2].T + m[:, 2]
    assert np.abs(xy - last.atoms.positions_A).max() < 0.1
    assert doc["decision"]["command"]["kind"] == "scan" and len(doc["decision"]["command"]["corners"]) == 4
    assert doc["decision"]["policy"] and doc["dose"]["peak_e_per_A2"] > 0 and doc["dose"]["map"]["rows"] > 0
    assert any("run ended success" in e["text"] for e in doc["events"])


async def test_replay_source_steps_through_the_log(tmp_path):
    agent, _ = await live_agent(tmp_path, max_frames=4)
    summary = await agent.run()
    source = ReplaySource.open(summary.log_path)
    assert source.count == 4
    async with ViewServer(source, "127.0.0.1", 0, min_interval_s=0.0) as server, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{server.port}"
        async with s.post(f"{base}/api/step", json={"index": 2}) as r:
            assert r.status == 200 and (await r.json()) == {"index": 2}
        async with s.get(f"{base}/api/snapshot?after=0") as r:
            doc = await r.json()
        async with s.post(f"{base}/api/step", json={"index": 9}) as r:
            assert r.status == 400 and "index=9" in (await r.json())["error"]
        status, ack = await post(s, f"{base}/api/control", {"command": "pause"}, server.token)
        assert status == 409 and "cannot be controlled" in ack["detail"]
    logged = RunLog.open(summary.log_path)
    atoms = logged.atoms()[2]
    assert doc["mode"] == "replay" and doc["replay"] == {"index": 2, "count": 4} and doc["frame"]["index"] == 2
    assert len(doc["atoms"]["col_row"]) == len(atoms) and doc["decision"]["command"]["kind"] == "scan"


def test_bad_input_names_the_field_and_value():
    assert parse_address(None) == ("127.0.0.1", 8765)
    assert parse_address("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_address(":0") == ("127.0.0.1", 0)
    with pytest.raises(InputError, match="--view.*abc"):
        parse_address("host:abc")
    with pytest.raises(InputError, match="65535"):
        parse_address("99999")
    with pytest.raises(ValueError, match=r"image.shape=\(3,\)"):
        display_image(np.zeros(3))
    img, factor = display_image(np.arange(600 * 300, dtype=float).reshape(600, 300), max_px=256)
    assert factor == 3 and img.shape == (200, 100) and img.min() == 0 and img.max() == 255
    d = dose_part(np.full((100, 100), 5.0), 5.0, 10.0, max_cells=48)
    assert d["map"]["rows"] == 34 and d["map"]["fraction"][0][0] == 0.5


async def test_a_port_in_use_is_a_clear_error():
    source = LiveSource()
    async with ViewServer(source, "127.0.0.1", 0) as first:
        with pytest.raises(InputError, match=f"--view.*127.0.0.1:{first.port}"):
            async with ViewServer(source, "127.0.0.1", first.port):
                pass


async def test_the_drift_trace_holds_every_frame_with_no_page_open(tmp_path):
    agent, source = await live_agent(tmp_path, max_frames=6, pipeline={"segmenter": {"kind": "log", "sigma_A": 0.45},
                                                                      "drift": {}})
    summary = await agent.run()  # no server, no page: nothing asks for a document meanwhile
    doc = source.snapshot()
    assert summary.frames == 6
    trace = doc["drift"]["trace"]
    assert [row[0] for row in trace] == sorted({row[0] for row in trace}) and len(trace) >= 5
    assert all(len(row) == 4 and row[3] >= 0 for row in trace)
