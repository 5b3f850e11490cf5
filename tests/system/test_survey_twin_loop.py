"""The survey policy in the agent's closed loop on the twin, through the ordinary ``stemagent run``:
it finds the dopants of a small field with fewer sub-scans than the field has candidates, stops by
itself, and ``stemagent replay`` of its log gives the same decisions (candidates, acquisition
values, chosen index, model state) from the same frames."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.spatial import cKDTree

from stemagent.config import config_from_dict, load_config
from stemagent.runlog import RunLog
from stemagent.simulators.factory import twin_from_config

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.system, pytest.mark.slow]


def small_survey_config() -> dict:
    """configs/twin-survey.yaml shrunk to a 100 Å field with one cluster of 10 Si (16 candidates)."""
    base = load_config(ROOT / "configs" / "twin-survey.yaml").model_dump(mode="json")
    base["max_frames"] = 17
    base["driver"].update(specimen_size_A=130.0, n_si=10, si_n_clusters=1, si_cluster_sigma_A=8.0, dynamics=False)
    base["scan"].update(fov_A=[100.0, 100.0], shape_px=[512, 512])  # the overview: same 0.2 Å/px and dose as the config's
    base["safety"]["area_half_width_A"] = 50.0
    base["policy"].update(dose_budget_field_e_per_A2=None, min_subscans_before_stop=4, n_initial=2)
    base["log"]["directory"] = "runs"
    return base


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stemagent.agent.app.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_survey_closed_loop_through_stemagent_run_finds_the_dopants_and_replays_its_decisions(tmp_path) -> None:
    data = small_survey_config()
    cfg_path = tmp_path / "survey-small.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    r = _cli("run", "--config", str(cfg_path), "--log-dir", str(tmp_path), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["state"] == "stopped" and summary["beam_blanked_at_end"]
    assert summary["reason"].startswith("the policy finished: expected gain"), summary["reason"]
    log = RunLog.open(summary["log_path"])
    assert log.stop is not None and log.stop["exit_status"] == "success"
    decisions = log.event_data("decisions")
    n_candidates = len(decisions[0]["details"]["candidates_A"])
    assert n_candidates == 16
    subscans = summary["frames"] - 1
    assert subscans < n_candidates, f"{subscans} sub-scans for {n_candidates} candidates"
    assert decisions[-1]["details"]["stop"] and decisions[-1]["command"]["kind"] == "blank"
    model_decisions = [d for d in decisions if d["details"]["phase"] == "model"]
    assert model_decisions and all(len(d["details"]["acquisition"]) == n_candidates for d in model_decisions)
    # the Si the segmenter found in the sub-scans against the twin's ground truth in the field
    # (the same seeded specimen the run's twin was built from; dynamics off, so it never changed)
    cfg = config_from_dict(data)
    sp = twin_from_config(cfg.driver, seed=cfg.seed).ground_truth.specimen
    si = sp.positions_A[(sp.numbers == 14) & sp.present, :2]
    si = si[np.all(np.abs(si) < 49.0, axis=1)]
    found = [a.of_class("Si").positions_A for a in list(log.atoms())[1:]]
    found_xy = np.concatenate(found) if found else np.zeros((0, 2))
    assert len(si) >= 5
    d, _ = cKDTree(found_xy).query(si)
    assert np.mean(d < 1.0) >= 0.9, f"found {np.sum(d < 1.0)} of {len(si)} Si"

    # replay: the same frames through the same pipeline and seed give the same decisions
    r = _cli("replay", summary["log_path"], "--log-dir", str(tmp_path / "replay"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["atoms_identical_frames"] == rep["frames_compared"] == summary["frames"]
    again = RunLog.open(rep["log_path"]).event_data("decisions")
    assert [d["details"] for d in again] == [d["details"] for d in decisions]
    assert [d["command"] for d in again] == [d["command"] for d in decisions]

    # verified replay: every output, the decisions' details included, at the run's beam current
    # (30 pA in the config; the replay's own driver knows none, the log's capabilities say it)
    r = _cli("replay", summary["log_path"], "--verify", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["ok"] and rep["frames"] == summary["frames"] and rep["compared"]["decision"] == len(decisions)
