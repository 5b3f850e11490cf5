from pathlib import Path

import pytest

from stemagent.config import RunConfig, config_from_dict, load_config
from stemagent.errors import ConfigError

# run configs; configs/train-*.yaml and configs/bridge-*.yaml have their own schemas and tests
CONFIGS = sorted(
    p
    for p in Path(__file__).resolve().parents[3].joinpath("configs").glob("*.yaml")
    if not p.name.startswith(("train-", "bridge-"))
)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_defaults_are_a_valid_run():
    cfg = config_from_dict({})
    assert cfg.driver.kind == "minimal-twin"
    assert cfg.scan.geometry().shape_px == cfg.scan.shape_px == (256, 256)
    assert config_from_dict({"scan": {"fov_A": 12.8, "shape_px": [64, 32]}}).scan.geometry().fov_A == (12.8, 12.8)


@pytest.mark.parametrize(
    "data, field, value",
    [
        ({"max_frames": 0}, "max_frames", 0),
        ({"scan": {"fovA": 3}}, "scan.fovA", 3),
        ({"scan": {"dwell_s": -1e-6}}, "scan.dwell_s", -1e-6),
        ({"driver": {"kind": "warp-drive"}}, "driver.kind", "warp-drive"),
        ({"driver": {"lattice_A": 2.0}}, "driver.kind", "<missing>"),
        ({"driver": {"kind": "replay"}}, "driver.path", "<missing>"),
        ({"driver": {"kind": "minimal-twin", "lattice_A": "wide"}}, "driver.lattice_A", "wide"),
        ({"policy": {"kind": "raster", "overlap": 2.0}}, "policy.overlap", 2.0),
        ({"name": "has spaces"}, "name", "has spaces"),
        ({"unknown_section": {}}, "unknown_section", {}),
    ],
)
def test_bad_config_names_field_and_value(data, field, value):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, source="run.yaml")
    e = err.value
    assert e.path == "run.yaml"
    assert e.field == field
    assert e.value == value
    text = str(e)
    assert "\n" not in text
    assert text.startswith("run.yaml: ") and field in text


def test_yaml_errors_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scan: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: line") as err:
        load_config(bad)
    assert "not valid YAML" in str(err.value)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "missing.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(top)


def test_cross_field_check():
    with pytest.raises(ConfigError, match="min_dwell_s"):
        config_from_dict({"safety": {"min_dwell_s": 1e-3, "max_dwell_s": 1e-4}})
