"""Bridge and ZeroMQ client over real loopback TCP sockets, in one process."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import zmq
import zmq.asyncio

from stemagent.codec import encode_geometry
from stemagent.driver import Driver, DriverFault
from stemagent.drivers import wire
from stemagent.drivers.bridge import Bridge
from stemagent.drivers.zmq_driver import ZmqDriver
from stemagent.types import ScanGeometry

from transport_fakes import FakeMicroscope

pytestmark = pytest.mark.system

GEOM = ScanGeometry(center_A=(3.0, -2.0), fov_A=(20.0, 10.0), shape_px=(32, 64), dwell_s=1e-6, flyback_s=1e-5)


async def start_bridge(scope: FakeMicroscope, control: str = "tcp://127.0.0.1:0", frames: str = "tcp://127.0.0.1:0",
                       **kw: object) -> tuple[Bridge, asyncio.Task[None]]:
    bridge = Bridge(scope, control, frames, **kw)  # type: ignore[arg-type]
    await bridge.start()
    task = asyncio.ensure_future(bridge.serve())
    return bridge, task


async def stop_bridge(bridge: Bridge, task: asyncio.Task[None]) -> None:
    bridge.stop()
    await asyncio.wait_for(task, timeout=5)
    await bridge.close()


async def crash_bridge(bridge: Bridge, task: asyncio.Task[None]) -> None:
    """Like a killed process: sockets vanish first, nothing more is sent (then its tasks end)."""
    for sock in (bridge._router, bridge._pub):
        assert sock is not None
        sock.close(linger=0)
    bridge._router = bridge._pub = None
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def client(bridge: Bridge, **kw: object) -> ZmqDriver:
    opts: dict[str, object] = dict(heartbeat_interval_s=0.05, heartbeat_timeout_s=0.5, reconnect_min_s=0.02,
                                   reconnect_max_s=0.1, request_timeout_s=5.0, connect_timeout_s=5.0, seed=1)
    opts.update(kw)
    return ZmqDriver(bridge.control_endpoint, bridge.frames_endpoint, **opts)  # type: ignore[arg-type]


async def test_round_trip_every_command(fake_microscope: FakeMicroscope) -> None:
    bridge, task = await start_bridge(fake_microscope)
    drv = client(bridge, frame_queue=8)
    assert isinstance(drv, Driver)
    try:
        await drv.connect()
        caps = await drv.capabilities()
        assert caps.name == "fake" and caps.max_shape_px == (4096, 4096)
        frame = await drv.acquire(GEOM)
        assert frame.image.dtype == np.float32 and frame.image.shape == (32, 64)
        assert frame.geometry == GEOM
        np.testing.assert_allclose(frame.line_times_s - frame.line_times_s[0], GEOM.line_start_times_s(0.0), atol=1e-12)
        assert frame.dose_e_per_A2 == 1.5 and frame.source == "fake" and frame.meta == {"seed": 0}
        park = await drv.park((1.0, 2.0), 0.01)
        assert park.position_A == (1.0, 2.0) and park.signal.tolist() == list(range(10))
        await drv.blank()
        assert fake_microscope.beam_blanked
        frames = [f async for f in drv.stream(GEOM, n_frames=3)]
        assert [f.index for f in frames] == [1, 2, 3]
        status = await drv.status()
        assert status["bridge"]["protocol"] == wire.PROTOCOL_VERSION and status["link_up"]
    finally:
        await drv.close()
        await stop_bridge(bridge, task)
    assert fake_microscope.calls[-2:] == ["blank", "close"]  # the bridge blanks on shutdown


async def test_large_frame_goes_zero_copy(fake_microscope: FakeMicroscope) -> None:
    big = ScanGeometry(fov_A=(100.0, 100.0), shape_px=(512, 512))
    bridge, task = await start_bridge(fake_microscope)
    drv = client(bridge)
    try:
        await drv.connect()
        frame = await drv.acquire(big)
        assert frame.image.shape == (512, 512) and frame.image.flags.writeable
    finally:
        await drv.close()
        await stop_bridge(bridge, task)


async def test_lost_bridge_fails_in_flight_command_without_resending_and_reconnects() -> None:
    scope = FakeMicroscope()
    scope.hold("acquire")  # acquire hangs: the command is in flight when the bridge dies
    bridge, task = await start_bridge(scope)
    faults: list[str] = []
    lost = asyncio.Event()

    def on_fault(reason: str) -> None:
        faults.append(reason)
        lost.set()

    drv = client(bridge, on_fault=on_fault)
    try:
        await drv.connect()
        in_flight = asyncio.ensure_future(drv.acquire(GEOM))
        while "acquire" not in scope.calls:
            await asyncio.sleep(0.005)  # until the bridge has started the scan
        await crash_bridge(bridge, task)  # the bridge dies mid-command
        await asyncio.wait_for(lost.wait(), timeout=5)
        with pytest.raises(DriverFault, match="not resent"):
            await in_flight
        assert not drv.link_up and drv.fault is not None and drv.stats["unconfirmed_commands"] >= 1
        with pytest.raises(DriverFault, match="unreachable"):
            await drv.blank()  # one out-of-band try; nobody is there

        scope2 = FakeMicroscope(seed=1)
        bridge2, task2 = await start_bridge(scope2, bridge.control_endpoint, bridge.frames_endpoint)
        try:
            await drv.connect()  # waits for the supervisor to reconnect
            assert drv.stats["reconnects"] >= 1
            assert "acquire" not in scope2.calls  # the lost command was not replayed on the new bridge
            frame = await drv.acquire(GEOM)
            assert frame.index == 0 and scope2.calls.count("acquire") == 1
        finally:
            await drv.close()
            await stop_bridge(bridge2, task2)
    finally:
        await drv.close()
    assert len(faults) == 1


async def test_stream_interrupted_by_lost_bridge_raises() -> None:
    scope = FakeMicroscope(frame_delay_s=0.01)
    bridge, task = await start_bridge(scope)
    drv = client(bridge)
    await drv.connect()
    got = 0
    with pytest.raises(DriverFault, match="stream interrupted"):
        async for _ in drv.stream(GEOM, n_frames=None):
            got += 1
            if got == 2:
                await crash_bridge(bridge, task)
    await drv.close()


async def test_slow_consumer_drops_oldest_frames_and_counts_them() -> None:
    scope = FakeMicroscope()
    bridge, task = await start_bridge(scope, frames_hwm=1000)
    drv = client(bridge, frame_queue=2)
    n = 40
    try:
        await drv.connect()
        got = []
        async for frame in drv.stream(GEOM, n_frames=n):
            got.append(frame.index)
            if len(got) == 1:
                # a slow consumer: everything else arrives while we hold the first frame
                while drv.stats["frames_received"] < n:
                    await asyncio.sleep(0.005)
        dropped = drv.stats["frames_dropped_local"] + drv.stats["frames_dropped_upstream"]
        assert got[-1] == n - 1 and len(got) <= 3
        assert dropped > 0 and len(got) + dropped == n
    finally:
        await drv.close()
        await stop_bridge(bridge, task)


async def test_bridge_survives_garbage_and_answers_afterwards(fake_microscope: FakeMicroscope) -> None:
    bridge, task = await start_bridge(fake_microscope)
    ctx = zmq.asyncio.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(bridge.control_endpoint)
    try:
        bad = [
            [b"\x00\xff garbage"],
            [b"{}"],
            [json.dumps({"v": 3, "id": "a1", "op": "heartbeat"}).encode()],  # a future version
            [json.dumps({"v": 2, "id": "a2", "op": "explode"}).encode()],
            [json.dumps({"v": 2, "id": "a3", "op": "acquire", "geometry": {"center_A": [0, 0], "fov_A": [-1, 1],
                                                                          "shape_px": [4, 4], "dwell_s": 1e-6}}).encode()],
            [json.dumps({"v": 2, "id": "a4", "op": "park", "position_A": [float("nan"), 0], "dwell_s": 1}).encode()],
            [b"{}", b"two parts"],
        ]
        for msg in bad:
            await raw.send_multipart(msg)
        errors = {}
        for _ in range(4):  # the ones with a readable id are answered with an error
            parts = await asyncio.wait_for(raw.recv_multipart(), timeout=5)
            reply, _ = wire.decode_reply(parts)
            assert not reply.ok and reply.error is not None
            errors[reply.id] = reply.error.type
        assert set(errors) == {"a1", "a2", "a3", "a4"}
        await raw.send_multipart([json.dumps({"v": 2, "id": "ok1", "op": "heartbeat"}).encode()])
        reply, _ = wire.decode_reply(await asyncio.wait_for(raw.recv_multipart(), timeout=5))
        assert reply.ok and reply.id == "ok1"
        # the same id again is refused, never executed twice
        await raw.send_multipart([json.dumps({"v": 2, "id": "ok1", "op": "blank"}).encode()])
        reply, _ = wire.decode_reply(await asyncio.wait_for(raw.recv_multipart(), timeout=5))
        assert not reply.ok and reply.error is not None and reply.error.type == "DuplicateRequest"
        assert bridge.stats["rejected"] >= 6 and "acquire" not in fake_microscope.calls
    finally:
        raw.close(linger=0)
        await stop_bridge(bridge, task)


async def test_client_survives_garbage_from_a_bad_bridge() -> None:
    ctx = zmq.asyncio.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:0")
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:0")
    endpoints = (router.getsockopt(zmq.LAST_ENDPOINT).decode(), pub.getsockopt(zmq.LAST_ENDPOINT).decode())

    async def evil() -> None:
        n = 0
        while True:
            ident, body = await router.recv_multipart()
            req = json.loads(body)
            n += 1
            if req["op"] == "heartbeat":
                await router.send_multipart([ident, wire.encode_reply(req["id"], True)[0][0]])
                await pub.send_multipart([b"not json", b"x"])  # junk on the frame channel too
            elif req["op"] == "acquire":
                # a frame reply whose image is truncated
                header = {"v": 2, "index": 0, "shape": [2, 2], "dtype": "<f4", "geometry": {"center_A": [0, 0],
                          "fov_A": [1, 1], "shape_px": [2, 2], "dwell_s": 1e-6}, "line_times_s": [0, 1], "dose_e_per_A2": 0}
                rep = {"v": 2, "id": req["id"], "ok": True, "result": {"frame": header},
                       "arrays": [{"dtype": "<f4", "shape": [2, 2]}]}
                await router.send_multipart([ident, json.dumps(rep).encode(), b"\x00" * 7])
            else:
                await router.send_multipart([ident, json.dumps({"v": 9, "id": req["id"]}).encode()])

    server = asyncio.ensure_future(evil())
    drv = ZmqDriver(*endpoints, heartbeat_interval_s=0.05, heartbeat_timeout_s=1.0, request_timeout_s=0.5, seed=0)
    try:
        await drv.connect()
        with pytest.raises(DriverFault, match="malformed reply"):
            await drv.acquire(ScanGeometry(fov_A=(1.0, 1.0), shape_px=(2, 2)))
        with pytest.raises(DriverFault):
            await drv.capabilities()  # wrong version: rejected, the request fails
        while drv.stats["rejected_messages"] < 3:
            await asyncio.sleep(0.01)
        assert drv.link_up  # still talking to the (bad) bridge; nothing crashed
    finally:
        await drv.close()
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        router.close(linger=0)
        pub.close(linger=0)


async def test_bridge_watchdog_blanks_when_the_client_goes_silent(fake_microscope: FakeMicroscope) -> None:
    bridge, task = await start_bridge(fake_microscope, client_timeout_s=0.2)
    drv = client(bridge)
    try:
        await drv.connect()
        await drv.acquire(GEOM)
        assert not fake_microscope.beam_blanked
        await drv.close()  # close blanks; unblank again through a raw request to test the watchdog
        fake_microscope.beam_blanked = False
        bridge._beam_maybe_on = True
        while bridge.stats["watchdog_blanks"] == 0:
            await asyncio.sleep(0.02)
        assert fake_microscope.beam_blanked
    finally:
        await stop_bridge(bridge, task)


def _junk_messages(rng: np.random.Generator, n: int) -> list[list[bytes]]:
    """Random bytes, truncated and mutated valid requests, wrong versions, extra parts."""
    valid = json.dumps({"v": 2, "id": "x", "op": "acquire", "geometry": encode_geometry(GEOM)}).encode()
    out: list[list[bytes]] = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out.append([rng.bytes(int(rng.integers(0, 200)))])
        elif kind == 1:
            out.append([valid[: int(rng.integers(0, len(valid)))]])
        elif kind == 2:
            b = bytearray(valid)
            for _ in range(3):
                b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
            out.append([bytes(b)])
        elif kind == 3:
            out.append([valid.replace(b'"v": 2', f'"v": {int(rng.integers(3, 99))}'.encode())])
        else:
            out.append([valid, rng.bytes(16)])
    return out


async def test_bridge_and_client_survive_a_fuzzed_stream_of_junk() -> None:
    scope = FakeMicroscope()
    bridge, task = await start_bridge(scope)
    ctx = zmq.asyncio.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(bridge.control_endpoint)
    # junk on the frame channel too: a second publisher the client's SUB also listens to
    junk_pub = ctx.socket(zmq.PUB)
    junk_pub.setsockopt(zmq.LINGER, 0)
    junk_pub.bind("tcp://127.0.0.1:0")
    drv = client(bridge, frame_queue=64)
    rng = np.random.default_rng(1234)
    try:
        await drv.connect()
        assert drv._sub is not None
        drv._sub.connect(junk_pub.getsockopt(zmq.LAST_ENDPOINT).decode())

        # ZeroMQ's slow joiner: a SUB misses what a PUB sends before their connection is up, so
        # probe until the client has seen (and rejected) one junk message
        async def joined() -> None:
            while drv.stats["rejected_messages"] == 0:
                await junk_pub.send_multipart([b"probe"])
                await asyncio.sleep(0.01)

        await asyncio.wait_for(joined(), timeout=10)
        base = drv.stats["rejected_messages"]
        for msg in _junk_messages(rng, 300):
            await raw.send_multipart(msg)
            await junk_pub.send_multipart(msg)
        good_header = json.loads(wire.encode_frame(scope.make_frame(GEOM))[0][0])
        for _ in range(100):  # random corruptions of a valid frame header
            h = dict(good_header)
            key = str(rng.choice(list(h)))
            h[key] = [None, -1, "x", 1e308, {"a": 1}, [1, 2, 3]][int(rng.integers(0, 6))]
            await junk_pub.send_multipart([json.dumps(h).encode(), rng.bytes(64)])
        await raw.send_multipart([json.dumps({"v": 2, "id": "after-junk", "op": "heartbeat"}).encode()])
        while True:  # drain error replies until the heartbeat's answer
            reply, _ = wire.decode_reply(await asyncio.wait_for(raw.recv_multipart(), timeout=5))
            if reply.id == "after-junk":
                assert reply.ok
                break

        async def all_rejected() -> None:  # 300 junk + 100 corrupted headers on the frame channel
            while drv.stats["rejected_messages"] < base + 400:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(all_rejected(), timeout=30)
        frames = [f async for f in drv.stream(GEOM, n_frames=2)]
        assert len(frames) == 2 and drv.link_up
        assert bridge.stats["rejected"] >= 200
        # every junk request carries id "x": even a mutation that stayed valid runs at most once
        assert scope.calls.count("acquire") <= 1
    finally:
        raw.close(linger=0)
        junk_pub.close(linger=0)
        await drv.close()
        await stop_bridge(bridge, task)


async def test_oversized_request_is_cut_off_by_zeromq_and_the_bridge_goes_on(fake_microscope: FakeMicroscope) -> None:
    bridge, task = await start_bridge(fake_microscope)
    ctx = zmq.asyncio.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(bridge.control_endpoint)
    drv = client(bridge)
    try:
        await raw.send_multipart([b"{" + b" " * (2 * wire.MAX_JSON_BYTES)])  # over MAXMSGSIZE
        await drv.connect()
        assert (await drv.capabilities()).name == "fake"
        assert bridge.stats["requests"] >= 2 and bridge.stats["rejected"] == 0  # never reached the application
    finally:
        raw.close(linger=0)
        await drv.close()
        await stop_bridge(bridge, task)


async def test_blank_gets_through_on_a_fresh_socket_while_the_link_is_down(fake_microscope: FakeMicroscope) -> None:
    bridge, task = await start_bridge(fake_microscope)
    drv = client(bridge, heartbeat_interval_s=30.0)  # the supervisor will not bring the link back during the test
    try:
        await drv.connect()
        await drv.acquire(GEOM)
        assert not fake_microscope.beam_blanked
        drv._drop_link("simulated heartbeat loss", report=True)  # the bridge itself is fine
        await drv.blank()
        assert fake_microscope.beam_blanked
        with pytest.raises(DriverFault, match="link is down"):
            await drv.acquire(GEOM)  # everything else still refuses until the link is back
    finally:
        await drv.close()
        await stop_bridge(bridge, task)
