"""The survey policy as the ordinary run builds it (``policy.kind: survey``): bad survey configs are
one-line errors naming field and value before anything runs; in the loop it stops, is stopped,
runs out of budget, and its decisions reach the run log through the codec — always ending blanked
with the log closed. Fast: the minimal twin and the classical finder (class ``atom``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stemagent.agent.app.cli import app
from stemagent.agent.app.factory import build_agent, build_clock
from stemagent.agent.control import ControlMessage
from stemagent.codec import decode_decision
from stemagent.config import config_from_dict
from stemagent.dose import scan_dose_e_per_A2
from stemagent.runlog import RunLog
from stemagent.simulators.minimal import MinimalTwinDriver
from stemagent.types import ScanGeometry

#: 60 Å overview at 0.25 Å/px, then 12 Å sub-scans (5 x 5 candidates) counting new atoms
BASE = {
    "name": "survey-unit", "seed": 3, "max_frames": 12,
    "driver": {"kind": "minimal-twin", "specimen_size_A": 80.0},
    "scan": {"fov_A": 60.0, "shape_px": 240, "dwell_s": 2e-6},
    "pipeline": {"segmenter": {"kind": "log"}},
    "policy": {"kind": "survey", "subscan_fov_A": 12.0, "subscan_shape_px": 48, "subscan_dwell_s": 1e-5, "overlap": 0.0,
               "objective": {"kind": "class_count", "classes": ["atom"]}, "n_initial": 2, "min_subscans_before_stop": 2,
               "fit_maxiter": 15, "refit_every": 2},
    "safety": {"area_half_width_A": 30.0, "max_fov_A": 100.0},
    "log": {"fsync": False},
}


def config(**over: dict) -> dict:
    out = yaml.safe_load(yaml.safe_dump(BASE))
    for section, values in over.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def validate(tmp_path: Path, data: dict) -> tuple[int, list[str]]:
    p = tmp_path / "survey.yaml"
    p.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["validate", str(p)])
    return result.exit_code, [ln for ln in result.stderr.splitlines() if ln.strip()]


@pytest.mark.parametrize(("over", "field", "value"), [
    ({"policy": {"subscan_fov_A": 90.0}}, "policy.subscan_fov_A", "90.0"),  # does not fit the allowed square
    ({"policy": {"subscan_fov_A": -4}}, "policy.subscan_fov_A", "-4"),
    ({"policy": {"subscan_dwell_s": 0.5}}, "policy.subscan_dwell_s", "0.5"),  # the gate's max_dwell_s
    ({"policy": {"subscan_shape_px": 4096}}, "policy.subscan_shape_px", "4096"),  # the gate's max_shape_px
    ({"safety": {"max_fov_A": 11.0, "area_half_width_A": 30.0}}, "fov", "11"),  # overview or sub-scan over max_fov_A
    ({"safety": {"dose_budget_e_per_A2": 100.0}}, "dose", "100"),  # one sub-scan alone is over the budget
    ({"policy": {"min_subscans_before_stop": 1, "n_initial": 3}}, "policy.min_subscans_before_stop", "1"),
    ({"policy": {"acquisition": "ei"}}, "policy.acquisition", "ei"),
    ({"policy": {"travel_length_A": "inf"}}, "policy.travel_length_A", "inf"),
    ({"policy": {"objective": {"kind": "class_count", "classes": []}}}, "policy.objective.classes", "[]"),
    ({"policy": {"subscan_fov_A": 12.0, "overlap": 0.0, "extra": 1}}, "policy.extra", "1"),
])
def test_bad_survey_configs_are_one_line_errors_naming_field_and_value(tmp_path, over, field, value) -> None:
    data = config()
    for section, values in over.items():
        data[section].update(values)
    code, lines = validate(tmp_path, data)
    assert code == 2, lines
    assert len(lines) == 1 and field in lines[0] and value in lines[0], lines


def test_the_shipped_survey_config_validates(tmp_path) -> None:
    root = Path(__file__).resolve().parents[3]
    result = CliRunner().invoke(app, ["validate", str(root / "configs" / "twin-survey.yaml")])
    assert result.exit_code == 0, result.stderr


async def test_a_class_the_segmenter_never_reports_is_refused_at_start_with_the_log_closed(tmp_path) -> None:
    cfg = config_from_dict(config(policy={"objective": {"kind": "class_count", "classes": ["Si"]}}))
    clock = build_clock(cfg)
    drv = MinimalTwinDriver(cfg.driver, seed=cfg.seed, clock=clock)
    with pytest.raises(Exception) as exc:
        await build_agent(cfg, run_dir=tmp_path / "run", driver=drv, clock=clock)
    assert "policy.objective.classes" in str(exc.value) and "Si" in str(exc.value) and "atom" in str(exc.value)
    assert not drv.connected and drv.beam_blanked
    log = RunLog.open(tmp_path / "run")
    assert log.stop is not None and log.stop["exit_status"] == "fail"


async def run(tmp_path: Path, data: dict, schedule=None):
    cfg = config_from_dict(data)
    clock = build_clock(cfg)
    drv = MinimalTwinDriver(cfg.driver, seed=cfg.seed, clock=clock)
    agent = await build_agent(cfg, run_dir=tmp_path / "run", driver=drv, clock=clock, schedule=schedule)
    summary = await agent.run()
    return summary, drv, RunLog.open(summary.log_path)


async def test_the_survey_ends_the_run_itself_blanked_with_its_decisions_in_the_log(tmp_path) -> None:
    summary, drv, log = await run(tmp_path, config(policy={"max_subscans": 4}))
    assert summary.reason.startswith("the policy finished: reached max_subscans=4"), summary.reason
    assert summary.frames == 5 and drv.beam_blanked and not drv.connected
    assert log.stop is not None and log.stop["exit_status"] == "success"
    decisions = [decode_decision(d) for d in log.event_data("decisions")]
    assert [d.details["phase"] for d in decisions if d.details] == ["initial", "initial", "model", "model", "stop"]
    assert all(len(d.details["candidates_A"]) == 25 for d in decisions if d.details)
    assert decisions[-1].command.kind == "blank" and decisions[-1].details["stop"]


async def test_an_operator_stop_mid_survey_ends_blanked_with_the_log_closed(tmp_path) -> None:
    summary, drv, log = await run(tmp_path, config(), schedule=[(3, ControlMessage(command="stop", reason="test"))])
    assert summary.state == "stopped" and summary.frames == 3 and summary.reason == "operator stop"
    assert drv.beam_blanked and not drv.connected and summary.beam_blanked_at_end
    assert log.stop is not None and log.stop["exit_status"] == "success"


async def test_an_abort_mid_survey_ends_blanked_with_the_log_closed(tmp_path) -> None:
    summary, drv, log = await run(tmp_path, config(), schedule=[(2, ControlMessage(command="abort", reason="test"))])
    assert summary.state == "aborted" and drv.beam_blanked and not drv.connected
    assert log.stop is not None and log.stop["exit_status"] == "abort"


async def test_the_survey_plans_within_the_gates_dose_budget_and_stops_when_it_is_spent(tmp_path) -> None:
    # the overview plus one sub-scan fit under the budget in any one place; a second sub-scan over
    # the same place (or over the edge cells it shares with an abutting one, on the gate's model)
    # would not: each place once at most, never a refusal, then the survey says it is done
    data = config(policy={"min_expected_gain": 0.0, "overlap": 0.0})
    cfg = config_from_dict(data)
    ov = scan_dose_e_per_A2(cfg.driver.beam_current_pA, cfg.scan.geometry())
    sub = scan_dose_e_per_A2(cfg.driver.beam_current_pA, ScanGeometry(fov_A=(12.0, 12.0), shape_px=(48, 48), dwell_s=1e-5))
    data["safety"]["dose_budget_e_per_A2"] = 1.5 * sub + ov
    data["max_frames"] = 40
    summary, drv, log = await run(tmp_path, data)
    assert summary.reason.startswith("the policy finished: no candidate left under the local dose budget"), summary.reason
    assert summary.commands_refused == 0  # it never asked the gate for what the budget forbids
    chosen = [d["details"]["chosen"] for d in log.event_data("decisions") if d["command"]["kind"] == "scan"]
    assert 2 <= len(chosen) == summary.frames - 1 < 25 and len(set(chosen)) == len(chosen) and drv.beam_blanked
    assert log.stop is not None and log.stop["exit_status"] == "success"
