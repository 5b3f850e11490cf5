"""The worked adapter example, loaded from a bridge config and driven over ZeroMQ."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from stemagent.driver import CommandRefused
from stemagent.drivers.bridge import Bridge, backend_from_config, load_bridge_config
from stemagent.drivers.zmq_driver import ZmqDriver
from stemagent.errors import ConfigError, InputError
from stemagent.types import ScanGeometry

pytestmark = pytest.mark.system


async def test_adapter_served_by_the_bridge(tmp_path: Path) -> None:
    cfg_path = tmp_path / "bridge.yaml"
    cfg_path.write_text(
        "control_endpoint: tcp://127.0.0.1:0\nframes_endpoint: tcp://127.0.0.1:0\n"
        "adapter: stemagent.drivers.adapter_example:make_driver\nadapter_options: {seed: 2, call_timeout_s: 5}\n"
    )
    cfg = load_bridge_config(cfg_path)
    backend = backend_from_config(cfg)
    bridge = Bridge(backend, cfg.control_endpoint, cfg.frames_endpoint)
    await bridge.start()
    serve = asyncio.ensure_future(bridge.serve())
    drv = ZmqDriver(bridge.control_endpoint, bridge.frames_endpoint, heartbeat_interval_s=0.05, seed=0)
    try:
        await drv.connect()
        caps = await drv.capabilities()
        assert caps.name == "toy-console" and caps.max_fov_A == 1000.0
        g = ScanGeometry(center_A=(10.0, -5.0), fov_A=(40.0, 40.0), shape_px=(32, 32), dwell_s=2e-6)
        frame = await drv.acquire(g)
        assert frame.geometry == g and frame.image.dtype == np.float32 and frame.dose_e_per_A2 > 0
        assert backend.console.field["fov_nm"] == pytest.approx(4.0)  # type: ignore[attr-defined]
        park = await drv.park((10.0, -5.0), 1e-3)
        assert park.signal.shape == (100,)
        assert backend.console.probe_fraction == pytest.approx((0.5, 0.5), abs=0.02)  # type: ignore[attr-defined]
        with pytest.raises(InputError, match="square"):
            await drv.acquire(ScanGeometry(fov_A=(40.0, 20.0), shape_px=(32, 16)))
        # past the console's own limit (its capabilities): the bridge refuses it before the console sees it
        with pytest.raises(CommandRefused, match="max_fov_A"):
            await drv.acquire(ScanGeometry(fov_A=(2000.0, 2000.0), shape_px=(8, 8)))
        assert backend.console.field["fov_nm"] == pytest.approx(4.0)  # type: ignore[attr-defined]
        await drv.blank()  # still works after failed calls
        assert backend.console.blanked  # type: ignore[attr-defined]
    finally:
        await drv.close()
        bridge.stop()
        await asyncio.wait_for(serve, timeout=5)
        await bridge.close()


def test_bad_adapter_path_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "b.yaml"
    p.write_text("adapter: no_such_module_xyz:make\n")
    with pytest.raises(ConfigError, match="cannot be imported"):
        backend_from_config(load_bridge_config(p))
    p.write_text("adapter: a:b\ndriver: {kind: minimal-twin}\n")
    with pytest.raises(ConfigError, match="not both"):
        load_bridge_config(p)
    p.write_text("frames_hwm: 0\n")
    with pytest.raises(ConfigError, match="frames_hwm"):
        load_bridge_config(p)
