"""The live page against hostile and broken input (issue 22): tokens, malformed control requests,
targets outside the field, truncated and corrupt run logs, a page that goes away mid-run, a port
already in use. Real sockets, a real agent on the minimal twin, real run logs.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiohttp
import yaml
from typer.testing import CliRunner

from view_doubles import start_live_agent, until
from stemagent.agent.app.cli import app
from stemagent.agent.view.replay import ReplaySource
from stemagent.agent.view.server import TOKEN_HEADER, ViewServer
from stemagent.runlog import RunLog

CFG = {
    "name": "view-hostile", "seed": 4, "max_frames": 400,
    "scan": {"fov_A": 12.8, "shape_px": 32, "dwell_s": 1e-5},
    "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0, "dose_budget_e_per_A2": 1e9},
    "log": {"fsync": False},
}


async def live_agent(tmp_path, **over):
    return await start_live_agent(tmp_path, {**CFG, **over})


async def raw_post(port: int, token: bytes, body: bytes) -> int:
    """A control request with header bytes no client library would send; the response status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /api/control HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + TOKEN_HEADER.encode() + b": " + token
                 + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    head = await reader.readline()
    writer.close()
    return int(head.split()[1])


MALFORMED = {  # body: what the refusal must name
    b"{not json": "not valid JSON",
    b"": "not valid JSON",
    b"\xff\xfe": "not valid JSON",
    b"[]": "Input should be an object",
    b'"pause"': "Input should be an object",
    b'{"command": "warp"}': "command='warp'",
    b'{"command": "pause", "extra": 1}': "extra",
    b'{"command": "set_target", "target_A": [NaN, 1.0]}': "target_A.0=nan",
    b'{"command": "set_target", "target_A": [1e400, 1.0]}': "target_A.0=inf",
    b'{"command": "set_target", "target_A": [1.0]}': "target_A.1",
    b'{"command": "set_target", "target_A": "here"}': "target_A='here'",
    b'{"command": "pause", "id": "' + b"a" * 70000 + b'"}': "exceeds 65536",
}


async def test_bad_tokens_and_malformed_requests_are_refused_and_the_agent_goes_on(tmp_path):
    agent, source = await live_agent(tmp_path)
    async with ViewServer(source, "127.0.0.1", 0, min_interval_s=0.0) as server, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{server.port}"
        run = asyncio.ensure_future(agent.run())
        await until(lambda: agent.summary.frames >= 2)

        async def post(body, token):
            headers = {} if token is None else {TOKEN_HEADER: token}
            async with s.post(f"{base}/api/control", data=body, headers=headers) as r:
                return r.status, await r.json()

        pause = json.dumps({"command": "abort"}).encode()
        assert (await post(pause, None))[0] == 401
        for wrong in ("", "wrong", server.token[:-1], server.token + "x"):
            assert (await post(pause, wrong))[0] == 403, wrong
        # header bytes that are not UTF-8: refused like any wrong token (was a 500 and a traceback)
        assert await raw_post(server.port, b"\xff\xfe\xe9", pause) == 403
        assert server.stats["refused_token"] == 6
        for body, named in MALFORMED.items():
            status, ack = await post(body, server.token)
            assert status == 400 and ack["accepted"] is False and named in ack["detail"], (body[:40], ack)
        # outside the allowed area, and far outside the field: the agent's own check refuses it
        for target in ([500.0, 0.0], [0.0, -1e9]):
            status, ack = await post(json.dumps({"command": "set_target", "target_A": target, "id": "t"}).encode(), server.token)
            assert status == 409 and "outside the allowed area" in ack["detail"]
        assert agent.sm.state.value == "running" and agent.target_A is None and not agent._pause_requested
        frames = agent.summary.frames
        await until(lambda: agent.summary.frames > frames + 2)  # still acquiring
        # every refusal of a malformed request is on the page's event list (as the agent's acks are)
        async with s.get(f"{base}/api/snapshot?after=-1") as r:
            doc = await r.json()
        refused = [e["text"] for e in doc["events"] if e["kind"] == "ack" and "refused" in e["text"]]
        assert len(refused) == len(MALFORMED) + 2 and any("command='warp'" in t for t in refused)
        status, _ = await post(json.dumps({"command": "stop", "id": "s"}).encode(), server.token)
        assert status == 200
        summary = await asyncio.wait_for(run, 30)
    assert summary.reason == "operator stop" and summary.exit_status == "success"
    controls = RunLog.open(summary.log_path).event_data("controls")
    assert [(c["command"], c["accepted"]) for c in controls] == [("set_target", False), ("set_target", False), ("stop", True)]


async def test_a_page_that_goes_away_mid_run_leaves_the_agent_and_the_server_running(tmp_path):
    agent, source = await live_agent(tmp_path, max_frames=30)
    async with ViewServer(source, "127.0.0.1", 0, min_interval_s=0.0, poll_s=5.0) as server:
        base = f"http://127.0.0.1:{server.port}"
        run = asyncio.ensure_future(agent.run())
        await until(lambda: agent.summary.frames >= 2)
        for _ in range(5):  # pages closing with a long poll pending, and while a document is being built
            session = aiohttp.ClientSession()
            poll = asyncio.ensure_future(session.get(f"{base}/api/snapshot?after={source.seq}"))
            await asyncio.sleep(0.01)
            poll.cancel()
            await session.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # a half-sent request, then gone
        writer.write(b"GET /api/snapshot?after=-1 HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        writer.close()
        summary = await asyncio.wait_for(run, 60)
        async with aiohttp.ClientSession() as s, s.get(f"{base}/api/snapshot?after=-1") as r:
            doc = await r.json()
    assert summary.exit_status == "success" and summary.frames == 30
    assert r.status == 200 and doc["state"] == "stopped" and doc["frames_done"] == 30


def _logged_run(tmp_path: Path, frames: int = 3) -> Path:
    async def go():
        agent, _ = await live_agent(tmp_path, max_frames=frames)
        return (await agent.run()).log_path

    return Path(asyncio.run(go()))


def _view(log: Path):
    return CliRunner().invoke(app, ["view", str(log), "--at", "127.0.0.1:0", "--seconds", "0.1"])


def test_view_of_a_truncated_or_corrupt_log_is_one_clear_error(tmp_path):
    log = _logged_run(tmp_path)
    docs = log / "documents.jsonl"
    whole = docs.read_bytes()
    # cut inside its first line: the log was cut short before its start document was whole
    docs.write_bytes(whole[:100])
    shown = _view(log)
    assert shown.exit_code == 2 and "Traceback" not in shown.output and "cut short" in shown.output
    # cut inside a later line: the complete part is shown
    docs.write_bytes(whole[: len(whole) - 40])
    assert _view(log).exit_code == 0
    # bytes that are not UTF-8 (was an "unexpected error" from the codec)
    docs.write_bytes(whole + b"\xff\xfe garbage\n")
    shown = _view(log)
    assert shown.exit_code == 2 and "is not UTF-8" in shown.output and str(docs) in shown.output
    # JSON of the wrong shape in a frame's document (was a bare ValueError)
    lines = whole.decode().splitlines(keepends=True)
    frames_uid = next(json.loads(ln)[1]["uid"] for ln in lines if json.loads(ln)[0] == "descriptor"
                      and json.loads(ln)[1]["name"] == "frames")
    bad = []
    for ln in lines:
        name, doc = json.loads(ln)
        if name == "event" and doc["descriptor"] == frames_uid:
            doc["data"]["frame_index"] = "first"
        bad.append(json.dumps([name, doc]) + "\n")
    docs.write_text("".join(bad))
    shown = _view(log)
    assert shown.exit_code == 2 and "Traceback" not in shown.output and "frames[0]" in shown.output


async def test_a_corrupt_frame_is_answered_with_its_error_and_the_rest_of_the_log_still_shows(tmp_path):
    async def go():
        agent, _ = await live_agent(tmp_path, max_frames=3)
        return (await agent.run()).log_path

    log = Path(await go())
    chunk = next((log / "frames.zarr").rglob("data/c/0/0/0"))  # frame 0's pixels
    chunk.write_bytes(b"\x00not a chunk")
    source = ReplaySource.open(log)
    async with ViewServer(source, "127.0.0.1", 0, min_interval_s=0.0) as server, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{server.port}"
        async with s.get(f"{base}/api/snapshot?after=-1") as r:
            assert r.status == 500 and "frame" in (await r.json())["error"]
        async with s.post(f"{base}/api/step", json={"index": 2}) as r:
            assert r.status == 200
        async with s.get(f"{base}/api/snapshot?after=-1") as r:
            doc = await r.json()
    assert r.status == 200 and doc["frame"]["index"] == 2


def test_run_with_view_on_a_port_in_use_is_one_clear_error_before_the_agent_starts(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**CFG, "max_frames": 2}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = CliRunner().invoke(app, ["run", "--config", str(cfg), "--view-at", f"127.0.0.1:{port}", "--no-report",
                                       "--log-dir", str(tmp_path / "runs")])
    assert ran.exit_code == 2 and "Traceback" not in ran.output
    assert f"--view='127.0.0.1:{port}'" in ran.output and "address already in use" in ran.output
    # the page is opened before the agent is built: no driver, no scan, no log (the beam never left blank)
    assert not (tmp_path / "runs").exists()
