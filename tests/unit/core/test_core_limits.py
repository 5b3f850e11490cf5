"""Capabilities are the device's truth: the gate and the bridge merge them with the site's limits."""

from __future__ import annotations

from stemagent.agent.safety import SafetyGate
from stemagent.config import SafetyConfig
from stemagent.drivers.bridge_limits import BridgeLimits
from stemagent.limits import InstrumentLimits
from stemagent.types import Capabilities, Park, ScanGeometry, ScanRegion

SITE = SafetyConfig(area_half_width_A=500.0, max_fov_A=256.0, max_shape_px=2048, min_dwell_s=1e-7, max_dwell_s=1e-3,
                    max_park_s=10.0)
DEVICE = Capabilities(name="dev", max_fov_A=100.0, max_shape_px=(512, 1024), min_dwell_s=1e-6, max_dwell_s=1e-2,
                      max_park_s=2.0)


def scan(fov: float = 50.0, shape: tuple[int, int] = (64, 64), dwell: float = 2e-6) -> ScanRegion:
    return ScanRegion(ScanGeometry(fov_A=(fov, fov), shape_px=shape, dwell_s=dwell))


def test_the_stricter_of_site_and_device_wins_and_is_named():
    gate = SafetyGate(SITE, beam_current_pA=1.0, capabilities=DEVICE)
    assert gate.limits.max_fov_A == 100.0 and gate.limits.max_shape_px == (512, 1024)
    assert (gate.limits.min_dwell_s, gate.limits.max_dwell_s, gate.limits.max_park_s) == (1e-6, 1e-3, 2.0)
    v = gate.check(scan(fov=150.0), 0.0)
    assert not v.allowed and v.rule == "fov" and "the device's" in v.detail
    v = gate.check(scan(shape=(600, 64)), 0.0)
    assert not v.allowed and v.rule == "pixels"
    assert gate.check(scan(shape=(64, 1000)), 0.0).allowed  # cols up to the device's 1024
    v = gate.check(scan(dwell=5e-7), 0.0)
    assert not v.allowed and v.rule == "dwell" and "the device's" in v.detail
    v = gate.check(Park((0.0, 0.0), 5.0), 0.0)
    assert not v.allowed and v.rule == "park_dwell" and "the device's" in v.detail
    # without the device the site's limits apply, and say nothing of a device
    alone = SafetyGate(SITE, beam_current_pA=1.0)
    assert alone.check(scan(fov=150.0), 0.0).allowed
    v = alone.check(scan(fov=300.0), 0.0)
    assert v.rule == "fov" and v.detail == "fov_A=300.0 exceeds max_fov_A=256.0"


def test_a_device_that_cannot_park_gets_no_park():
    caps = Capabilities(name="no-park", max_fov_A=1000.0, max_shape_px=(4096, 4096), min_dwell_s=1e-9, max_dwell_s=1.0,
                        can_park=False)
    v = SafetyGate(SITE, beam_current_pA=1.0, capabilities=caps).check(Park((0.0, 0.0), 0.01), 0.0)
    assert not v.allowed and v.rule == "park"
    limits = BridgeLimits().tightened(caps)
    assert not limits.can_park and "cannot park" in (limits.check_park((0.0, 0.0), 0.01) or "")


def test_the_bridge_merges_the_same_way():
    limits = BridgeLimits(max_fov_A=1000.0, max_shape_px=4096, max_park_s=10.0).tightened(DEVICE)
    assert (limits.max_fov_A, limits.max_shape_px, limits.max_park_s) == (100.0, 512, 2.0)
    assert limits.check_park((0.0, 0.0), 3.0) is not None


def test_merge_is_field_by_field():
    a = InstrumentLimits.site(max_fov_A=10.0, max_shape_px=100, min_dwell_s=1e-6, max_dwell_s=1.0, max_park_s=1.0)
    b = InstrumentLimits.of_capabilities(DEVICE)
    m = a.stricter(b)
    assert (m.max_fov_A, m.who("max_fov_A")) == (10.0, "site")
    assert (m.max_shape_px, m.who("max_shape_px")) == ((100, 100), "site")
    assert (m.max_dwell_s, m.who("max_dwell_s")) == (1e-2, "device")
