"""The package's test double, and the `async with` lifetimes of the bridge, the ZeroMQ driver and the agent."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stemagent import dose
from stemagent.clock import VirtualClock
from stemagent.driver import Driver, DriverFault
from stemagent.drivers.bridge import Bridge
from stemagent.drivers.scripted import ScriptedDriver
from stemagent.drivers.zmq_driver import ZmqDriver
from stemagent.types import ScanGeometry

G = ScanGeometry(fov_A=(12.8, 12.8), shape_px=(32, 32), dwell_s=1e-5)


async def test_frames_parks_and_the_call_log():
    clock = VirtualClock()
    drv = ScriptedDriver(clock=clock, seed=1)
    assert isinstance(drv, Driver)
    await drv.connect()
    f = await drv.acquire(G)
    assert f.image.shape == (32, 32) and f.index == 0 and drv.beam_blanked is False
    assert f.dose_e_per_A2 == pytest.approx(dose.scan_dose_e_per_A2(20.0, G))
    assert clock.monotonic() == pytest.approx(G.frame_time_s)  # a scan takes its time on the virtual clock
    p = await drv.park((1.0, 2.0), 0.01)
    assert len(p.signal) == 10 and p.sample_interval_s == pytest.approx(1e-3) and p.start_time_s == pytest.approx(G.frame_time_s)
    await drv.blank()
    frames = [fr async for fr in drv.stream(G, 3)]
    assert [fr.index for fr in frames] == [1, 2, 3]
    assert drv.calls == ["connect", "acquire", "park", "blank", "stream"]
    assert [c.number for c in drv.log] == [1, 1, 1, 1, 1] and drv.log[2].args == ((1.0, 2.0), 0.01)
    same = ScriptedDriver(clock=VirtualClock(), seed=1)
    await same.connect()
    assert np.array_equal((await same.acquire(G)).image, f.image)  # seeded


async def test_faults_hangs_hooks_and_holds():
    drv = ScriptedDriver(clock=VirtualClock())
    seen: list[int] = []
    drv.fail("acquire", DriverFault("lost"), at=2).on("acquire", None, lambda: seen.append(drv.count("acquire")))
    await drv.connect()
    await drv.acquire(G)
    with pytest.raises(DriverFault, match="lost"):
        await drv.acquire(G)
    await drv.acquire(G)
    assert seen == [1, 2, 3]
    drv.hang("park", 1)
    task = asyncio.ensure_future(drv.park((0.0, 0.0), 0.01))
    await asyncio.sleep(0)
    assert not task.done() and drv.beam_blanked is False  # the beam is on while the park hangs
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    release = drv.hold("blank")
    blank = asyncio.ensure_future(drv.blank())
    await asyncio.sleep(0)
    assert not blank.done()
    release.set()
    await blank
    assert drv.beam_blanked
    drv.recover("acquire")
    await drv.close()
    with pytest.raises(DriverFault, match="not connected"):
        await drv.acquire(G)
    with pytest.raises(ValueError, match="op="):
        drv.fail("teleport", RuntimeError())


async def test_bridge_and_zmq_driver_live_behind_async_with():
    scope = ScriptedDriver()
    async with Bridge(scope, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0") as bridge:
        serving = asyncio.ensure_future(bridge.serve())
        async with ZmqDriver(bridge.control_endpoint, bridge.frames_endpoint, heartbeat_interval_s=0.05, seed=0) as drv:
            assert (await drv.capabilities()).name == "scripted"
            assert (await drv.acquire(G)).image.shape == (32, 32)
            service = drv._service
            assert service is not None and not service.done()
        assert service.done() and not drv.link_up  # every task of the driver ended with it
        bridge.stop("test")
        await asyncio.wait_for(serving, timeout=10)
        assert bridge._tasks is None  # serve() leaves no task behind
    assert scope.beam_blanked and scope.calls[-2:] == ["blank", "close"]


async def test_an_agent_built_but_never_run_closes_behind_async_with(tmp_path):
    from stemagent.agent.app.factory import build_agent
    from stemagent.config import config_from_dict
    from stemagent.runlog import RunLog

    cfg = config_from_dict({"scan": {"fov_A": 12.8, "shape_px": 32, "dwell_s": 1e-5},
                            "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0}, "log": {"fsync": False}})
    clock = VirtualClock()
    drv = ScriptedDriver(clock=clock)
    async with await build_agent(cfg, run_dir=tmp_path / "run", driver=drv, clock=clock) as agent:
        assert agent.sm.state.value == "idle"
    assert drv.beam_blanked and not drv.connected
    log = RunLog.open(tmp_path / "run")
    assert log.stop["exit_status"] == "abort" and "closed before its run ended" in log.stop["reason"]
