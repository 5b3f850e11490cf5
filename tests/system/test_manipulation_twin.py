"""Closed loop on the twin: the manipulation policy moves a Si through graphene, every park through
the safety gate, and the run log shows every park, outcome and re-plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stemagent.agent.factory import build_clock, build_driver
from stemagent.agent.manipulation import main, run_from_config
from stemagent.config import config_from_dict, load_config
from stemagent.runlog import RunLog

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "twin-manipulation.yaml"

pytestmark = pytest.mark.system


async def test_the_policy_moves_the_si_to_the_target_on_the_twin_and_logs_it(tmp_path: Path) -> None:
    cfg = load_config(CONFIG)
    clock = build_clock(cfg)
    twin = build_driver(cfg, clock)
    gt = twin.ground_truth
    si = int(np.flatnonzero(gt.specimen.numbers == 14)[np.argmin(np.linalg.norm(
        gt.specimen.positions_A[gt.specimen.numbers == 14, :2] - np.asarray(cfg.policy.dopant_A), axis=1))])
    start = gt.specimen.positions_A[si, :2].copy()
    res = await run_from_config(cfg, tmp_path / "run", driver=twin, clock=clock)

    assert res.stop_reason == "target reached", res.stop_reason
    assert res.beam_blanked_at_end and twin.beam_blanked
    end = gt.specimen.positions_A[si, :2]
    assert np.linalg.norm(end - np.asarray(cfg.policy.target_A)) < 0.3  # ground truth: the Si is on the target
    assert np.linalg.norm(end - start) > 2 * 1.42  # moved at least two sites
    swaps = [e for e in gt.events if e.kind == "swap" and si in e.atoms]
    assert len(swaps) >= 3 and not [e for e in gt.events if e.kind == "knock_on"]
    other = [int(a) for a in np.flatnonzero(gt.specimen.numbers == 14) if a != si]
    assert all(np.linalg.norm(gt.specimen.positions_A[o, :2] - gt.initial.positions_A[o, :2]) < 0.1 for o in other)

    log = RunLog.open(res.log_path)
    parks = log.event_data("parks")
    assert len(parks) == res.stats["parks"] >= 3
    assert all(len(p["signal"]) > 10 for p in parks)
    outcomes = log.event_data("outcomes")
    assert [o["kind"] for o in outcomes].count("intended") >= 3
    plans = log.event_data("plans")
    replans = [p for p in plans if p.get("event") == "plan"]
    assert len(replans) >= 3  # the first plan and one per observed hop
    assert plans[-1]["event"] == "stop" and plans[-1]["reason"] == "target reached"
    sent = log.event_data("commands")
    assert sum(1 for c in sent if c["command"]["kind"] == "park") == len(parks)
    decisions = log.event_data("decisions")
    assert any("knowledge_gradient_per_s" in d["scores"] for d in decisions)
    assert log.stop["exit_status"] == "success"


def test_the_experiment_command_refuses_a_config_without_the_manipulation_policy(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "twin-graphene-si.yaml").read_text())
    assert main(["--config", str(bad)]) == 2
    assert "policy.kind" in capsys.readouterr().err


async def test_a_park_the_safety_gate_refuses_ends_the_experiment_blanked(tmp_path: Path) -> None:
    data = load_config(CONFIG).model_dump(mode="json")
    data["safety"]["max_park_s"] = 0.05  # shorter than any dwell the policy chooses
    cfg = config_from_dict(data)
    res = await run_from_config(cfg, tmp_path / "run")
    assert res.refused and "park_dwell" in res.stop_reason and res.beam_blanked_at_end
    log = RunLog.open(res.log_path)
    assert [s["rule"] for s in log.event_data("safety")] == ["park_dwell"]
    assert "parks" not in log.streams() or log.event_data("parks") == []


async def test_a_driver_fault_mid_experiment_ends_it_blanked_with_the_log_closed(tmp_path: Path) -> None:
    from stemagent.driver import DriverFault

    cfg = load_config(CONFIG)
    clock = build_clock(cfg)
    twin = build_driver(cfg, clock)
    real_park = twin.park
    calls = {"n": 0}

    async def flaky_park(position_A, dwell_s):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise DriverFault("console lost during a park")
        return await real_park(position_A, dwell_s)

    twin.park = flaky_park  # type: ignore[method-assign]
    res = await run_from_config(cfg, tmp_path / "run", driver=twin, clock=clock)
    assert res.failed and "console lost" in res.stop_reason
    assert res.beam_blanked_at_end and twin.beam_blanked
    log = RunLog.open(res.log_path)
    assert log.stop["exit_status"] == "fail" and "console lost" in log.stop["reason"]
    assert len(log.event_data("parks")) == 2
