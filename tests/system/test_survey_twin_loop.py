"""The survey policy in the agent's closed loop on the twin: it finds the dopants of a small field
with fewer sub-scans than the field has candidates, stops by itself, and a replay of its log
gives the same decisions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemagent.agent.factory import build_agent, build_clock, build_driver
from stemagent.config import ReplayDriverConfig, config_from_dict, load_config
from stemagent.runlog import RunLog
from stemagent.simulators.twin import TwinDriver

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.system, pytest.mark.slow]


def small_survey_config() -> dict:
    base = load_config(ROOT / "configs" / "twin-survey.yaml").model_dump(mode="json")
    base["max_frames"] = 17
    base["driver"].update(specimen_size_A=130.0, n_si=10, si_n_clusters=1, si_cluster_sigma_A=8.0, dynamics=False)
    base["scan"].update(fov_A=100.0, shape_px=512)  # the overview: same 0.2 Å/px and dose as the config's
    base["safety"]["area_half_width_A"] = 50.0
    base["policy"].update(dose_budget_field_e_per_A2=None, min_subscans_before_stop=4, n_initial=2)
    return base


async def test_survey_closed_loop_finds_the_dopants_and_replays_its_decisions(tmp_path) -> None:
    cfg = config_from_dict(small_survey_config())
    clock = build_clock(cfg)
    twin = build_driver(cfg, clock)
    assert isinstance(twin, TwinDriver)
    agent = await build_agent(cfg, run_dir=tmp_path / "run", driver=twin, clock=clock)
    summary = await agent.run()
    assert summary.state == "stopped" and summary.beam_blanked_at_end
    log = RunLog.open(summary.log_path)
    decisions = log.event_data("decisions")
    n_candidates = len(decisions[0]["details"]["candidates_A"])
    assert n_candidates == 16
    subscans = summary.frames - 1
    assert summary.reason.startswith("policy done"), summary.reason
    assert subscans < n_candidates, f"{subscans} sub-scans for {n_candidates} candidates"
    assert decisions[-1]["stop"] and decisions[-1]["command"]["kind"] == "blank"
    model_decisions = [d for d in decisions if d["details"]["phase"] == "model"]
    assert model_decisions and all(len(d["details"]["acquisition"]) == n_candidates for d in model_decisions)
    # the Si the segmenter found in the sub-scans against the twin's ground truth in the field
    sp = twin.ground_truth.specimen
    si = sp.positions_A[(sp.numbers == 14) & sp.present, :2]
    si = si[np.all(np.abs(si) < 49.0, axis=1)]
    found = [a.of_class("Si").positions_A for a in list(log.atoms())[1:]]
    found_xy = np.concatenate(found) if found else np.zeros((0, 2))
    assert len(si) >= 5
    d, _ = cKDTree(found_xy).query(si)
    assert np.mean(d < 1.0) >= 0.9, f"found {np.sum(d < 1.0)} of {len(si)} Si"
    # replay: the same frames through the same pipeline and seed give the same decisions
    data = dict(log.start["config"])
    data["driver"] = ReplayDriverConfig(path=Path(summary.log_path), pace="fast").model_dump(mode="json")
    data["name"] = "survey-replay"
    replay_cfg = config_from_dict(data)
    replay = await build_agent(replay_cfg, run_dir=tmp_path / "replay")
    rsum = await replay.run()
    again = RunLog.open(rsum.log_path).event_data("decisions")
    assert [d["details"] for d in again] == [d["details"] for d in decisions]
    assert [d["command"] for d in again] == [d["command"] for d in decisions]
