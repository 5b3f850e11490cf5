"""The Nion backend on a headless Nion simulated microscope (nionswift-usim) rendering the twin.

One usim microscope serves the whole module (Nion's start-up is paid once); each test builds its
own backend and bridge on it. Frames go through Nion's real acquisition path
(``record_immediate`` of the scan hardware source), then the bridge and the ZeroMQ client; the
twin behind usim holds the ground truth. Checked: calibration and orientation (a known lattice
spacing and the Si dopants as an asymmetric marker, at two centres and a rotation), parks put
Nion's probe at the commanded normalised position, blank blanks (also mid-scan), usim stopped
mid-run (the agent faults, blanks and resumes when usim is back), and the bridge started as from
Swift's console.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import numpy as np
import pytest
import yaml
from scipy import ndimage
from scipy.spatial import cKDTree

pytest.importorskip("nion.usim_device", reason="the Nion packages are not installed: pip install 'stemagent[nion]'")

from stemagent.config import TwinConfig, config_from_dict  # noqa: E402
from stemagent.driver import DriverFault  # noqa: E402
from stemagent.drivers.bridge import Bridge, BridgeConfig  # noqa: E402
from stemagent.drivers.nion.backend import NionDriver  # noqa: E402
from stemagent.drivers.nion.config import NionConfig, UsimConfig  # noqa: E402
from stemagent.drivers.nion.swift import start_bridge  # noqa: E402
from stemagent.drivers.zmq_driver import ZmqDriver  # noqa: E402
from stemagent.errors import InputError  # noqa: E402
from stemagent.runlog import RunLog  # noqa: E402
from stemagent.segmentation.classical import LoGFinder  # noqa: E402
from stemagent.segmentation.metrics import match  # noqa: E402
from stemagent.types import Frame, ScanGeometry  # noqa: E402

pytestmark = [pytest.mark.system, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CC_BOND_A = 1.42  # graphene's C-C distance in the twin
CFG = NionConfig(
    mode="usim",
    usim=UsimConfig(seed=5, twin=TwinConfig(specimen="graphene", specimen_size_A=120.0, n_si=80, beam_current_pA=30.0,
                                            dynamics=False)),
    call_timeout_s=20.0,
)


@pytest.fixture(scope="module")
def usim() -> Iterator[Any]:
    """The module's usim microscope (a UsimMicroscope whose generator is the twin)."""
    microscope = NionDriver.from_config(CFG).microscope
    microscope.start()
    yield microscope
    microscope.stop()


def backend_on(usim: Any) -> NionDriver:
    return NionDriver(CFG, usim, own_microscope=False)


@pytest.fixture
async def served(usim: Any) -> AsyncIterator[tuple[ZmqDriver, NionDriver]]:
    """A bridge on the module's usim, and a connected ZeroMQ client."""
    backend = backend_on(usim)
    bridge = Bridge(backend, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", client_timeout_s=10.0)
    await bridge.start()
    serve = asyncio.ensure_future(bridge.serve())
    drv = ZmqDriver(bridge.control_endpoint, bridge.frames_endpoint, heartbeat_interval_s=0.1, request_timeout_s=20.0, seed=1)
    await drv.connect()
    try:
        yield drv, backend
    finally:
        await drv.close()
        bridge.stop()
        await asyncio.wait_for(serve, timeout=10)
        await bridge.close()


def specimen_atoms(usim: Any) -> tuple[np.ndarray, np.ndarray]:
    """The twin's atoms (sample frame, Å) and their atomic numbers: the ground truth."""
    sp = usim.generator.twin.specimen
    return sp.positions_A[sp.present, :2], sp.numbers[sp.present]


def check_frame_against_truth(frame: Frame, usim: Any) -> dict[str, float]:
    """Atoms found in ``frame`` (placed by the frame's own geometry) against the twin's atoms."""
    g = frame.geometry
    found = LoGFinder(sigma_A=0.45, threshold=0.15, min_separation_A=1.0).find(frame).positions_A
    xy, z = specimen_atoms(usim)
    inside_t, inside_p = g.contains(xy, margin_A=1.5), g.contains(found, margin_A=1.5)
    res = match(found, np.zeros(len(found)), xy[inside_t], np.zeros(inside_t.sum()), 0.5,
                count_pred=inside_p)
    d = found[res.pred_idx] - xy[inside_t][res.true_idx]
    # lattice spacing: mean distance to the three nearest neighbours (the nearest alone is biased low by noise)
    nn = cKDTree(found).query(found[inside_p], k=4)[0][:, 1:].mean(axis=1)
    # the asymmetric marker: Si (Z=14, ~4.6x brighter than C) must sit where the truth has Si
    rc = np.rint(g.sample_to_pixel(xy[inside_t])).astype(int)
    rc = np.clip(rc, 0, np.array(g.shape_px) - 1)
    img = np.asarray(frame.image, dtype=np.float64)
    smooth = ndimage.gaussian_filter(img, 1.0)
    at = smooth[rc[:, 0], rc[:, 1]]
    si, c = z[inside_t] == 14, z[inside_t] == 6
    return {
        "f1": res.f1(0),
        "rmse_A": float(np.sqrt(np.mean(np.sum(d**2, axis=1)))) if len(d) else float("nan"),
        "bond_A": float(np.median(nn)),
        "n_si": int(si.sum()),
        "si_over_c": float(at[si].mean() / at[c].mean()) if si.any() else float("nan"),
    }


@pytest.mark.parametrize("center_A,rotation_rad", [((3.0, -2.0), 0.0), ((-6.5, 4.0), 0.6)])
async def test_frames_have_the_right_calibration_and_orientation(served: tuple[ZmqDriver, NionDriver], usim: Any,
                                                                 center_A: tuple[float, float], rotation_rad: float) -> None:
    drv, backend = served
    g = ScanGeometry(center_A=center_A, fov_A=(25.6, 25.6), shape_px=(256, 256), rotation_rad=rotation_rad, dwell_s=2e-6)
    frame = await drv.acquire(g)
    assert frame.geometry == g and frame.detector == "HAADF" and frame.source == "nion-usim"
    assert frame.meta["nion_pixel_time_us"] == pytest.approx(2.0)
    # time stamps: Nion's, on the bridge's monotonic clock; the twin rendered the frame as it started
    truth = usim.generator.frame_truth(len(usim.generator.frame_indices) - 1)
    assert truth is not None and truth.geometry == g
    assert frame.start_time_s == pytest.approx(truth.start_s, abs=0.1)
    assert np.allclose(np.diff(frame.line_times_s), g.line_time_s)
    assert frame.dose_e_per_A2 == pytest.approx(truth.dose_e_per_A2, rel=1e-9)
    m = check_frame_against_truth(frame, usim)
    assert m["f1"] > 0.95 and m["rmse_A"] < 0.15, m
    assert m["bond_A"] == pytest.approx(CC_BOND_A, rel=0.02), m  # calibration: Å per pixel
    assert m["n_si"] >= 2 and m["si_over_c"] > 2.0, m  # orientation: no flip, no wrong rotation
    # the same image read with an axis flip, swapped axes or the opposite rotation misplaces the marker
    wrong = [Frame(frame.image[:, ::-1].copy(), g, frame.line_times_s, 0, 0.0),
             Frame(frame.image.T.copy(), g, frame.line_times_s, 0, 0.0)]
    if rotation_rad:
        flipped = ScanGeometry(center_A=center_A, fov_A=g.fov_A, shape_px=g.shape_px, rotation_rad=-rotation_rad, dwell_s=g.dwell_s)
        wrong.append(Frame(frame.image, flipped, frame.line_times_s, 0, 0.0))
    for w in wrong:
        bad = check_frame_against_truth(w, usim)
        assert not (bad["f1"] > 0.95 and bad["si_over_c"] > 2.0), bad


async def test_parks_move_the_probe_to_the_commanded_position(served: tuple[ZmqDriver, NionDriver], usim: Any) -> None:
    drv, backend = served
    with pytest.raises(InputError, match="no frame acquired yet"):
        await backend_on(usim).park((0.0, 0.0), 1e-3)
    g = ScanGeometry(center_A=(10.0, -5.0), fov_A=(25.6, 25.6), shape_px=(128, 128), dwell_s=2e-6)
    await drv.acquire(g)
    inst = usim.instrument
    for x, y in ((10.0, -5.0), (0.3, -15.0), (21.0, 6.5)):
        result = await drv.park((x, y), 5e-3)
        # Nion's normalised position, origin top left, (y, x): worked out by hand for rotation 0
        assert inst.probe_state == "parked"
        assert inst.probe_position.x == pytest.approx((x - (10.0 - 12.8)) / 25.6, abs=1e-9)
        assert inst.probe_position.y == pytest.approx((y - (-5.0 - 12.8)) / 25.6, abs=1e-9)
        assert not inst.GetVal("C_Blank")
        # the twin parked where usim's probe is, read back through Nion's scan context
        entry = usim.generator.twin.ground_truth.beam_log[-1]
        assert entry.state == "park" and entry.position_A == pytest.approx((x, y), abs=1e-6)
        assert result.signal.shape == (5,) and result.sample_interval_s == pytest.approx(1e-3)
        assert result.signal.sum() > 0 and result.dose_e_per_A2 > 0
    # in a rotated field the probe follows the rotation
    gr = ScanGeometry(center_A=(0.0, 0.0), fov_A=(20.0, 20.0), shape_px=(100, 100), rotation_rad=np.pi / 2, dwell_s=2e-6)
    await drv.acquire(gr)
    await drv.park((0.0, 5.0), 2e-3)  # +y is the fast axis (+x fraction) of a scan turned by 90°
    assert inst.probe_position.x == pytest.approx(0.75, abs=1e-9) and inst.probe_position.y == pytest.approx(0.5, abs=1e-9)
    assert usim.generator.twin.ground_truth.beam_log[-1].position_A == pytest.approx((0.0, 5.0), abs=1e-6)
    # outside the last field Nion would clamp the position: refused before it reaches the console
    with pytest.raises(InputError, match="outside the last scanned field"):
        await drv.park((30.0, 0.0), 1e-3)
    assert inst.probe_position.x == pytest.approx(0.75, abs=1e-9)


async def test_blank_blanks_also_mid_scan(served: tuple[ZmqDriver, NionDriver], usim: Any) -> None:
    drv, backend = served
    inst, twin = usim.instrument, usim.generator.twin
    await drv.acquire(ScanGeometry(fov_A=(20.0, 20.0), shape_px=(64, 64), dwell_s=2e-6))
    assert not inst.GetVal("C_Blank") and not twin.beam_blanked
    await drv.blank()
    assert inst.GetVal("C_Blank") == 1.0 and twin.beam_blanked
    # a long scan (512 x 512 x 20 µs = 5.2 s) is cut short by a blank
    long_scan = asyncio.ensure_future(drv.acquire(ScanGeometry(fov_A=(40.0, 40.0), shape_px=(512, 512), dwell_s=2e-5)))
    deadline = time.monotonic() + 10
    while inst.GetVal("C_Blank") and time.monotonic() < deadline:  # the scan has unblanked the beam
        await asyncio.sleep(0.02)
    assert not inst.GetVal("C_Blank")
    t0 = time.monotonic()
    await drv.blank()
    assert inst.GetVal("C_Blank") == 1.0 and time.monotonic() - t0 < 2.0
    with pytest.raises(DriverFault, match="[Cc]ancel"):
        await long_scan
    hs = backend._hardware_source()
    deadline = time.monotonic() + 5
    while hs.is_recording and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not hs.is_recording  # the recording was aborted, not left running behind a blanked beam
    frame = await drv.acquire(ScanGeometry(fov_A=(20.0, 20.0), shape_px=(64, 64), dwell_s=2e-6))  # and scanning goes on
    assert frame.image.shape == (64, 64) and not inst.GetVal("C_Blank")
    await drv.blank()


async def test_usim_stopped_mid_run_blanks_and_resumes(usim: Any, tmp_path: Path) -> None:
    from stemagent.agent.app.factory import build_agent

    backend = backend_on(usim)
    bridge = Bridge(backend, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", client_timeout_s=10.0)
    await bridge.start()
    serve = asyncio.ensure_future(bridge.serve())
    raw = yaml.safe_load((ROOT / "configs" / "zmq-nion-usim.yaml").read_text())
    raw["driver"].update(control_endpoint=bridge.control_endpoint, frames_endpoint=bridge.frames_endpoint,
                         heartbeat_interval_s=0.1, connect_timeout_s=5.0)
    raw.update(max_frames=10, log={"directory": str(tmp_path / "runs"), "fsync": False}, agent={"retry_s": 0.2})
    raw["scan"].update(shape_px=128, dwell_s=2e-6)
    agent = await build_agent(config_from_dict(raw), run_dir=tmp_path / "runs" / "r1")
    run = asyncio.ensure_future(agent.run())
    beam_log = usim.generator.twin.ground_truth.beam_log
    try:
        async def until(pred: Any, what: str, timeout_s: float = 30.0) -> None:
            deadline = time.monotonic() + timeout_s
            while not pred():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                assert not run.done(), run.result()
                await asyncio.sleep(0.02)

        await until(lambda: agent.summary.frames >= 2, "two frames")
        usim.stop()  # as if Swift's usim plug-in stopped: the scan device is gone mid-run
        await until(lambda: agent.sm.state.value == "faulted", "the agent to fault")
        frames_at_fault = agent.summary.frames
        await asyncio.sleep(1.0)  # it keeps trying while the device is gone
        n_log = len(beam_log)
        usim.start()
        await asyncio.wait_for(run, timeout=60)
    finally:
        if usim.instrument is None:
            usim.start()
        bridge.stop()
        await asyncio.wait_for(serve, timeout=10)
        await bridge.close()
    summary = run.result()
    assert summary.exit_status == "success" and summary.frames == 10 > frames_at_fault, summary
    assert summary.faults >= 1 and summary.beam_blanked_at_end
    kinds = [e["data"]["kind"] for e in RunLog.open(summary.log_path).events("interruptions")]
    assert "fault" in kinds and "recovered" in kinds and kinds.index("recovered") > kinds.index("fault")
    assert "blank_failed" in kinds[kinds.index("fault"):]  # the device was gone: the blank could not reach it
    # the agent scanned again after usim came back, and only after its recovery blank had worked
    # ("recovered" is logged once the blank succeeded; the twin's beam log records a blank only
    # when usim's blanker changes, and usim comes back already blanked, so it is not checked there)
    after = [e.state for e in beam_log[n_log:]]
    assert "scan" in after, after
    log_ = RunLog.open(summary.log_path)
    t_recovered = next(e["data"]["t_s"] for e in log_.events("interruptions") if e["data"]["kind"] == "recovered")
    sent_after = [e["data"]["t_s"] for e in log_.events("commands") if e["data"]["outcome"] == "sent" and e["data"]["t_s"] >= t_recovered]
    assert sent_after, "no command was sent after the device came back"
    assert usim.instrument.GetVal("C_Blank") == 1.0


async def test_bridge_started_as_from_swifts_console(usim: Any) -> None:
    cfg = BridgeConfig(control_endpoint="tcp://127.0.0.1:0", frames_endpoint="tcp://127.0.0.1:0",
                       adapter="stemagent.drivers.nion:make_driver",
                       adapter_options={"mode": "swift", "scan_device_id": "usim_scan_device", "probe_fwhm_A": 0.9})
    handle = await asyncio.to_thread(start_bridge, cfg)  # Swift's console thread is not the bridge's
    try:
        assert handle.running and handle.bridge is not None
        drv = ZmqDriver(handle.bridge.control_endpoint, handle.bridge.frames_endpoint, heartbeat_interval_s=0.1, seed=2)
        await drv.connect()
        try:
            caps = await drv.capabilities()
            assert caps.name == "nion:usim_scan_device" and caps.beam_current_pA == pytest.approx(30.0)
            assert caps.beam_energy_keV == pytest.approx(60.0) and caps.probe_fwhm_A == pytest.approx(0.9)
            g = ScanGeometry(fov_A=(20.0, 20.0), shape_px=(64, 64), dwell_s=2e-6)
            frame = await drv.acquire(g)
            assert frame.geometry == g and not usim.instrument.GetVal("C_Blank")
            park = await drv.park((1.0, 1.0), 2e-3)
            assert park.signal.shape == (0,)  # attached to Swift's instrument: Nion offers no ADF read-out of a park
        finally:
            await drv.close()
    finally:
        await asyncio.to_thread(handle.stop)
    assert not handle.running and usim.instrument.GetVal("C_Blank") == 1.0  # stopping blanked first
