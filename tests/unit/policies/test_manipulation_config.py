"""Bad manipulation configurations are one-line ConfigErrors naming the field and the value."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from stemagent.config import config_from_dict, load_config
from stemagent.errors import ConfigError

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "twin-manipulation.yaml"


@pytest.mark.parametrize(
    "path, value, says",
    [
        (("policy", "strategy"), "rl", "policy.strategy='rl'"),
        (("policy", "target_A"), [float("nan"), 0.0], "policy.target_A[0]=nan"),
        (("policy", "dopant_A"), [1.0], "policy.dopant_A"),
        (("policy", "bogus_A"), 1.0, "policy.bogus_A=1.0: is not a known field"),
        (("policy", "acquisition", "dwell_min_s"), 9.0, "dwell_min_s=9.0 exceeds dwell_max_s=8.0"),
        (("policy", "acquisition", "lookahead_batches"), [0], "policy.acquisition.lookahead_batches[0]=0"),
        (("policy", "changepoint", "windows"), [], "policy.changepoint.windows=[]"),
        (("policy", "confirm", "shape_px"), 4, "policy.confirm.shape_px=4"),
        (("policy", "stop", "dose_budget_e_per_A2"), -1.0, "policy.stop.dose_budget_e_per_A2=-1.0"),
        (("policy", "stop", "max_total_dose_e_per_A2"), 1e9, "is not a known field"),  # the old name
        (("driver", "swap_rate_model"), "magic", "driver.swap_rate_model='magic'"),
        (("driver", "swap_site_sigma"), -0.1, "driver.swap_site_sigma=-0.1"),
    ],
)
def test_a_bad_manipulation_config_names_the_field_and_the_value(path: tuple[str, ...], value: Any, says: str) -> None:
    data = copy.deepcopy(load_config(CONFIG).model_dump(mode="json"))
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, source="bad.yaml")
    assert says in str(err.value) and str(err.value).startswith("bad.yaml: ")
    assert "\n" not in str(err.value)
