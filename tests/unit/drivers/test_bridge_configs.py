"""The shipped bridge configurations validate and build their backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from stemagent.driver import Driver
from stemagent.agent.app.factory import bridge_backend
from stemagent.drivers.bridge import backend_from_config, load_bridge_config

ROOT = Path(__file__).resolve().parents[3]
BRIDGE_CONFIGS = sorted((ROOT / "configs" / "bridge").glob("*.yaml"))


@pytest.mark.parametrize("path", BRIDGE_CONFIGS, ids=lambda p: p.name)
def test_shipped_bridge_configs_build(path: Path) -> None:
    cfg = load_bridge_config(path)
    assert isinstance(backend_from_config(cfg, bridge_backend), Driver)


def test_empty_bridge_config_serves_the_minimal_twin(tmp_path: Path) -> None:
    p = tmp_path / "b.yaml"
    p.write_text("")
    cfg = load_bridge_config(p)
    assert cfg.driver == {"kind": "minimal-twin"}
    assert type(backend_from_config(cfg, bridge_backend)).__name__ == "MinimalTwinDriver"


def test_bridge_import_footprint_is_small() -> None:
    """The bridge must run inside a vendor's Python: numpy, pyzmq, pydantic (and PyYAML for its file)."""
    import subprocess
    import sys

    code = (
        "import sys, stemagent.drivers.bridge, stemagent.drivers.adapter_example\n"
        "heavy = ('torch', 'scipy', 'botorch', 'gpytorch', 'sklearn', 'zarr', 'aiomqtt', 'typer', 'rich', 'h5py', 'rsciio')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""
