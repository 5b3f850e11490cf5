"""Closed loop on the twin through the ordinary agent run (``policy.kind: manipulation``): the policy
moves a Si through graphene, every park through the safety gate, and the run log shows every park,
outcome and re-plan. Hostile cases: the operator's bad targets, a refused park, the Si lost, a
driver fault in the middle of a park."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stemagent.agent.app.factory import build_agent, build_clock, build_driver
from stemagent.agent.app.report import write_report
from stemagent.agent.control import ControlMessage
from stemagent.config import RunConfig, config_from_dict, load_config
from stemagent.driver import Driver, DriverFault
from stemagent.runlog import RunLog
from stemagent.simulators.twin import TwinDriver

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "twin-manipulation.yaml"

pytestmark = pytest.mark.system


def _config(**policy: Any) -> RunConfig:
    data = load_config(CONFIG).model_dump(mode="json")
    data["policy"].update(policy)
    return config_from_dict(data)


def _si_near(twin: TwinDriver, where_A: Any) -> int:
    sp = twin.ground_truth.specimen
    si = np.flatnonzero(sp.numbers == 14)
    return int(si[np.argmin(np.linalg.norm(sp.positions_A[si, :2] - np.asarray(where_A), axis=1))])


async def _run(cfg: RunConfig, tmp_path: Path, twin: TwinDriver | None = None, clock: Any = None,
               schedule: list[tuple[int, ControlMessage]] | None = None) -> tuple[Any, TwinDriver, RunLog]:
    clock = clock or build_clock(cfg)
    twin = twin or build_driver(cfg, clock)  # type: ignore[assignment]
    assert isinstance(twin, TwinDriver)
    agent = await build_agent(cfg, run_dir=tmp_path / "run", driver=twin, clock=clock, schedule=schedule)
    summary = await agent.run()
    return summary, twin, RunLog.open(summary.log_path)


async def test_the_policy_moves_the_si_to_the_target_on_the_twin_and_logs_it(tmp_path: Path) -> None:
    cfg = load_config(CONFIG)
    clock = build_clock(cfg)
    twin = build_driver(cfg, clock)
    assert isinstance(twin, TwinDriver)
    gt = twin.ground_truth
    si = _si_near(twin, cfg.policy.dopant_A)  # type: ignore[union-attr]
    start = gt.specimen.positions_A[si, :2].copy()
    summary, twin, log = await _run(cfg, tmp_path, twin, clock)

    assert summary.reason == "the policy finished: target reached", summary.reason
    assert summary.exit_status == "success" and log.stop["exit_status"] == "success"
    assert summary.beam_blanked_at_end and twin.beam_blanked
    end = gt.specimen.positions_A[si, :2]
    assert np.linalg.norm(end - np.asarray(cfg.policy.target_A)) < 0.3  # type: ignore[union-attr]  # ground truth: on the target
    assert np.linalg.norm(end - start) > 2 * 1.42  # moved at least two sites
    swaps = [e for e in gt.events if e.kind == "swap" and si in e.atoms]
    assert len(swaps) >= 3 and not [e for e in gt.events if e.kind == "knock_on"]
    other = [int(a) for a in np.flatnonzero(gt.specimen.numbers == 14) if a != si]
    assert all(np.linalg.norm(gt.specimen.positions_A[o, :2] - gt.initial.positions_A[o, :2]) < 0.1 for o in other)

    # every park: the loop's own parks stream (signals), the policy's parks_seen (steps found), and
    # every park is a command that passed the gate
    parks = log.event_data("parks")
    assert len(parks) == summary.parks >= 3 and all(len(p["signal"]) > 10 for p in parks)
    seen = log.event_data("parks_seen")
    assert [s["park"] for s in seen] == list(range(len(parks)))
    sent = [c for c in log.event_data("commands") if c["outcome"] == "sent"]
    assert sum(1 for c in sent if c["command"]["kind"] == "park") == len(parks)
    # every outcome, every re-plan, the stop with the policy's counters
    outcomes = log.event_data("outcomes")
    assert [o["kind"] for o in outcomes].count("intended") >= 3
    plans = log.event_data("plans")
    replans = [p for p in plans if p.get("event") == "plan"]
    assert len(replans) >= 3 and replans[0]["why"] == "new target"  # the first plan and one per observed hop
    assert plans[-1]["event"] == "stop" and plans[-1]["reason"] == "target reached" and plans[-1]["parks"] == len(parks)
    assert replans[-1]["path"][-1] == replans[-1]["target_node"]
    decisions = log.event_data("decisions")
    assert any("knowledge_gradient_per_s" in d["scores"] for d in decisions)
    assert {d["observation"] for d in decisions} >= {"frame", "park"}  # the loop's park hook decided too
    # the confirmation scans are small frames around the dopant, not re-surveys
    fovs = [f.geometry.fov_A[0] for f in log.frames()]
    assert fovs[0] == pytest.approx(25.6) and all(f == pytest.approx(9.0) for f in fovs[1:])
    # the run report counts the hops and re-plans and draws the hop history
    rep, _, md = write_report(log, tmp_path / "report")
    hops = rep["hops"]
    assert hops["hops_intended"] == [o["kind"] for o in outcomes].count("intended") and hops["parks_checked"] == len(outcomes)
    assert hops["replans"] == sum(1 for p in replans if p["why"].startswith("re-planned")) >= 2
    assert hops["end"] == "target reached" and f"- hops: {hops['hops_intended']} along the plan" in md
    assert (tmp_path / "report" / "report_hops.png").stat().st_size > 1000


def test_the_readme_command_runs_a_manipulation_experiment(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "stemagent.agent.app.cli", "run", "--config", str(CONFIG),
                          "--log-dir", str(tmp_path), "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["reason"] == "the policy finished: target reached" and summary["beam_blanked_at_end"]
    log = RunLog.open(summary["log_path"])
    assert {"parks", "parks_seen", "outcomes", "plans"} <= set(log.streams())


async def test_operator_targets_the_lattice_cannot_use_are_refused_and_a_good_one_is_taken(tmp_path: Path) -> None:
    """No target in the config: the policy waits; set_target over the control path. Outside the
    allowed area: the agent refuses it; off-lattice, occupied (the other Si), off the surveyed
    field: the policy refuses it with the planner's reason and keeps waiting; then a good one."""
    cfg = _config(target_A=None)
    good = load_config(CONFIG).policy.target_A  # type: ignore[union-attr]
    msgs = [
        (1, ControlMessage(command="set_target", target_A=(500.0, 0.0), id="outside")),
        (1, ControlMessage(command="set_target", target_A=(-3.0, -1.0), id="off-lattice")),
        (2, ControlMessage(command="set_target", target_A=(-1.23, -16.33), id="occupied")),
        (3, ControlMessage(command="set_target", target_A=(12.0, 10.0), id="off-field")),
        (4, ControlMessage(command="set_target", target_A=tuple(good), id="good")),  # type: ignore[arg-type]
    ]
    summary, twin, log = await _run(cfg, tmp_path, schedule=msgs)
    acks = {c["id"]: c for c in log.event_data("controls")}
    assert not acks["outside"]["accepted"] and "outside the allowed area" in acks["outside"]["detail"]
    refused = [p for p in log.event_data("plans") if p.get("event") == "target_refused"]
    reasons = " | ".join(p["reason"] for p in refused)
    assert len(refused) == 3, reasons
    assert "off-lattice" in refused[0]["reason"]
    assert "occupied by another dopant" in refused[1]["reason"]
    assert "out-of-field" in refused[2]["reason"]
    assert summary.reason == "the policy finished: target reached" and twin.beam_blanked
    si = _si_near(twin, good)
    assert np.linalg.norm(twin.ground_truth.specimen.positions_A[si, :2] - np.asarray(good)) < 0.3
    # no park before the good target: the policy waited blanked, looking at the field
    first_park = min(i for i, c in enumerate(log.event_data("commands")) if c["command"]["kind"] == "park")
    assert sum(1 for c in log.event_data("commands")[:first_park] if c["command"]["kind"] == "scan") >= 5


@pytest.mark.parametrize("safety, rule", [({"max_park_s": 0.05}, "park_dwell"),  # shorter than any dwell the policy chooses
                                          ({"dose_budget_e_per_A2": 1e6}, "dose")])  # the survey fits, no park does
async def test_a_park_the_safety_gate_refuses_ends_the_run_failed_blanked_with_the_gate_reason(
        tmp_path: Path, safety: dict[str, float], rule: str) -> None:
    data = load_config(CONFIG).model_dump(mode="json")
    data["safety"].update(safety)
    summary, twin, log = await _run(config_from_dict(data), tmp_path)
    # a refusal is never progress: not a success, and the reason is the gate's
    assert summary.exit_status == "fail" and log.stop["exit_status"] == "fail", summary.reason
    assert summary.reason.startswith(f"refused: {rule}: ") and log.stop["reason"] == summary.reason
    assert summary.reason.endswith("(the policy finished: the safety gate refused the last command)")
    assert summary.beam_blanked_at_end and twin.beam_blanked
    assert [s["rule"] for s in log.event_data("safety")] == [rule]
    assert summary.parks == 0 and not log.event_data("parks") and not log.event_data("outcomes")
    assert log.event_data("plans")[-1]["parks"] == 0  # the policy counted no park either


class FaultingPark:
    """A :class:`~stemagent.driver.Driver` around the twin whose every park raises (a console that
    answers but fails the park); everything else is the twin's. Records the clock time of each park."""

    def __init__(self, twin: TwinDriver, clock: Any) -> None:
        self.twin, self.clock = twin, clock
        self.park_times_s: list[float] = []
        self.connects = 0

    async def connect(self) -> None:
        self.connects += 1
        await self.twin.connect()

    async def close(self) -> None:
        await self.twin.close()

    async def capabilities(self) -> Any:
        return await self.twin.capabilities()

    async def acquire(self, geometry: Any) -> Any:
        return await self.twin.acquire(geometry)

    def stream(self, geometry: Any, n_frames: int | None = None) -> Any:
        return self.twin.stream(geometry, n_frames)

    async def park(self, position_A: tuple[float, float], dwell_s: float) -> Any:
        self.park_times_s.append(self.clock.monotonic())
        raise DriverFault("the console failed the park")

    async def blank(self) -> None:
        await self.twin.blank()


async def test_a_park_that_always_faults_is_retried_a_bounded_number_of_times_then_fails_blanked(tmp_path: Path) -> None:
    data = load_config(CONFIG).model_dump(mode="json")
    data["agent"] = {"retry_s": 0.5, "max_fault_retries": 3}
    cfg = config_from_dict(data)
    clock = build_clock(cfg)
    twin = build_driver(cfg, clock)
    assert isinstance(twin, TwinDriver)
    driver = FaultingPark(twin, clock)
    assert isinstance(driver, Driver)
    agent = await build_agent(cfg, run_dir=tmp_path / "run", driver=driver, clock=clock)
    summary = await asyncio.wait_for(agent.run(), timeout=300)  # the old loop retried without end
    assert summary.exit_status == "fail" and summary.reason.startswith("gave up: 4 faults in a row"), summary.reason
    assert len(driver.park_times_s) == 4 and summary.faults == 4 and driver.connects == 1 + 1 + 3  # the build, the run, 3 recoveries
    assert np.diff(driver.park_times_s) == pytest.approx([0.0, 0.5, 1.0], abs=1e-6)  # backoff on the injected clock
    assert summary.beam_blanked_at_end and twin.beam_blanked
    log = RunLog.open(summary.log_path)
    assert not log.truncated and log.stop["exit_status"] == "fail" and log.stop["reason"] == summary.reason
    kinds = [i["kind"] for i in log.event_data("interruptions")]
    assert kinds.count("fault") == 4 and kinds.count("retry") == 2 and "gave_up" in kinds
    assert summary.parks == 0 and not log.event_data("parks") and not log.event_data("outcomes")
    sent = [c for c in log.event_data("commands") if c["command"]["kind"] == "park"]
    assert len(sent) == 4 and all(c["outcome"] == "sent" for c in sent)


async def test_the_si_lost_mid_run_stops_the_policy_on_damage_after_a_second_look(tmp_path: Path) -> None:
    cfg = load_config(CONFIG)
    clock = build_clock(cfg)
    twin = build_driver(cfg, clock)
    assert isinstance(twin, TwinDriver)
    si = _si_near(twin, cfg.policy.dopant_A)  # type: ignore[union-attr]
    real_park = twin.park
    calls = {"n": 0}

    async def park_then_lose_the_si(position_A, dwell_s):  # type: ignore[no-untyped-def]
        out = await real_park(position_A, dwell_s)
        calls["n"] += 1
        if calls["n"] == 2:
            twin.ground_truth.specimen.present[si] = False  # sputtered away (the park signal shows no step)
        return out

    twin.park = park_then_lose_the_si  # type: ignore[method-assign]
    summary, twin, log = await _run(cfg, tmp_path, twin, clock)
    assert summary.reason.startswith("goal not reached (the policy finished: damage"), summary.reason
    assert summary.beam_blanked_at_end and twin.beam_blanked  # a stop short of the target is not a success
    assert summary.exit_status == "fail" and log.stop["exit_status"] == "fail"
    scans = [c for c in log.event_data("decisions") if "confirmation scan" in c["reason"]]
    assert any("re-check" in c["reason"] for c in scans)  # believed only after a second look
    assert log.event_data("outcomes")[-1]["kind"] == "damage"


async def test_a_driver_fault_mid_park_blanks_the_beam_and_the_run_recovers_with_the_log_closed(tmp_path: Path) -> None:
    cfg = load_config(CONFIG)
    clock = build_clock(cfg)
    twin = build_driver(cfg, clock)
    assert isinstance(twin, TwinDriver)
    real_park = twin.park
    calls = {"n": 0, "blanked_after_fault": None}

    async def flaky_park(position_A, dwell_s):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise DriverFault("console lost during a park")
        return await real_park(position_A, dwell_s)

    twin.park = flaky_park  # type: ignore[method-assign]
    real_blank = twin.blank

    async def watch_blank():  # type: ignore[no-untyped-def]
        await real_blank()
        if calls["n"] == 3 and calls["blanked_after_fault"] is None:
            calls["blanked_after_fault"] = True

    twin.blank = watch_blank  # type: ignore[method-assign]
    summary, twin, log = await _run(cfg, tmp_path, twin, clock)
    assert calls["blanked_after_fault"] and summary.faults == 1
    kinds = [i["kind"] for i in log.event_data("interruptions")]
    assert "fault" in kinds and "recovered" in kinds
    assert summary.reason == "the policy finished: target reached" and summary.beam_blanked_at_end and twin.beam_blanked
    assert log.stop["exit_status"] == "success"
    assert len(log.event_data("parks")) == summary.parks == len(log.event_data("parks_seen"))
