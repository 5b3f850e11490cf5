"""The shipped bridge configurations validate and build their backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from stemagent.driver import Driver
from stemagent.drivers.bridge import backend_from_config, load_bridge_config

ROOT = Path(__file__).resolve().parents[2]
BRIDGE_CONFIGS = sorted((ROOT / "configs" / "bridge").glob("*.yaml"))


@pytest.mark.parametrize("path", BRIDGE_CONFIGS, ids=lambda p: p.name)
def test_shipped_bridge_configs_build(path: Path) -> None:
    cfg = load_bridge_config(path)
    assert isinstance(backend_from_config(cfg), Driver)


def test_empty_bridge_config_serves_the_minimal_twin(tmp_path: Path) -> None:
    p = tmp_path / "b.yaml"
    p.write_text("")
    cfg = load_bridge_config(p)
    assert cfg.driver == {"kind": "minimal-twin"}
    assert type(backend_from_config(cfg)).__name__ == "MinimalTwinDriver"
