import numpy as np
import pytest

from stemagent.agent.safety import SafetyGate
from stemagent.agent.state import ALLOWED, AgentState, IllegalTransition, StateMachine
from stemagent.config import SafetyConfig
from stemagent.types import Blank, Park, ScanGeometry, ScanRegion


def gate(**kw) -> SafetyGate:
    return SafetyGate(SafetyConfig(**{"area_half_width_A": 50.0, "max_fov_A": 40.0, **kw}), beam_current_pA=20.0)


def scan(center=(0.0, 0.0), fov=20.0, px=64, dwell=1e-6) -> ScanRegion:
    return ScanRegion(ScanGeometry(center_A=center, fov_A=(fov, fov), shape_px=(px, px), dwell_s=dwell))


def test_allows_a_sane_scan_and_blank():
    g = gate()
    assert g.check(scan(), 0.0).allowed
    assert g.check(Blank(), 0.0).allowed


@pytest.mark.parametrize(
    "cmd, rule",
    [
        (scan(center=(45.0, 0.0)), "area"),
        (scan(fov=45.0), "fov"),
        (scan(px=4096), "pixels"),
        (scan(dwell=1.0), "dwell"),
        (Park((60.0, 0.0), 0.1), "area"),
        (Park((0.0, 0.0), 100.0), "park_dwell"),
    ],
)
def test_refusals_name_their_rule(cmd, rule):
    v = gate().check(cmd, 0.0)
    assert not v.allowed and v.rule == rule and v.detail


def test_rotated_scan_corner_outside_is_refused():
    # a 40 Å field centred 28 Å out fits unrotated (corner at 48 Å) but not rotated by 45°
    inside = ScanRegion(ScanGeometry(center_A=(28.0, 0.0), fov_A=(40.0, 40.0), shape_px=(64, 64)))
    rotated = ScanRegion(ScanGeometry(center_A=(28.0, 0.0), fov_A=(40.0, 40.0), shape_px=(64, 64), rotation_rad=np.pi / 4))
    g = gate()
    assert g.check(inside, 0.0).allowed
    assert g.check(rotated, 0.0).rule == "area"


def test_dose_budget_accumulates_where_the_beam_went():
    g = gate(dose_budget_e_per_A2=1e6)
    s = scan(dwell=1e-4)  # 20 pA, 100 µs over (20/64 Å)^2 -> about 1.28e5 e/Å² per frame
    n = 0
    while g.check(s, float(n)).allowed:
        g.record(s, float(n))
        n += 1
        assert n < 100
    assert n == 7
    assert g.check(s, 100.0).rule == "dose"
    # a field elsewhere is still allowed: the budget is local
    assert g.check(scan(center=(-30.0, -30.0)), 100.0).allowed
    g.set_dose_budget(1e7)
    assert g.check(s, 100.0).allowed
    with pytest.raises(ValueError, match="dose budget"):
        g.set_dose_budget(-1.0)


def test_park_dose_counts_at_its_position():
    g = gate(dose_budget_e_per_A2=1e8)
    p = Park((10.0, 10.0), 0.5)  # 20 pA * 0.5 s / e over 1 Å² = 6.2e7 e/Å²
    assert g.check(p, 0.0).allowed
    g.record(p, 0.0)
    assert g.check(p, 1.0).rule == "dose"
    assert g.check(Park((-10.0, 10.0), 0.5), 1.0).allowed


def test_rate_limit_uses_the_injected_time():
    g = gate(max_commands_per_s=3.0, dose_budget_e_per_A2=1e30)
    s = scan()
    for t in (0.0, 0.1, 0.2):
        assert g.check(s, t).allowed
        g.record(s, t)
    assert g.check(s, 0.3).rule == "rate"
    assert g.check(s, 1.05).allowed


def test_huge_area_keeps_the_dose_map_small():
    g = SafetyGate(SafetyConfig(area_half_width_A=1e6), beam_current_pA=20.0)
    assert max(g.map.shape) <= 1024


def test_state_table():
    sm = StateMachine()
    sm.to(AgentState.RUNNING, "go")
    sm.to(AgentState.PAUSED, "op")
    sm.to(AgentState.RUNNING, "op")
    sm.to(AgentState.FAULTED, "lost")
    sm.to(AgentState.RUNNING, "back")
    sm.to(AgentState.STOPPING, "done")
    with pytest.raises(IllegalTransition):
        sm.to(AgentState.RUNNING, "no way back")
    sm.to(AgentState.STOPPED, "done")
    assert sm.finished
    assert [h[1] for h in sm.history][-1] == AgentState.STOPPED
    # terminal states go nowhere; every state can be aborted from unless terminal
    assert not ALLOWED[AgentState.STOPPED] and not ALLOWED[AgentState.ABORTED]
    for s, targets in ALLOWED.items():
        if s not in (AgentState.STOPPED, AgentState.ABORTED):
            assert AgentState.ABORTED in targets
