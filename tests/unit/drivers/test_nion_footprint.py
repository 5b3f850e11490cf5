"""The Nion backend runs inside Swift's Python: in ``mode: swift`` it must not pull in the agent,
the simulators or their heavy dependencies (only Nion's own, e.g. scipy and h5py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("nion.instrumentation", reason="the Nion packages are not installed: pip install 'stemagent[nion]'")


def test_swift_mode_import_footprint() -> None:
    code = (
        "import sys, stemagent.drivers.bridge\n"
        "from stemagent.drivers.nion import make_driver\n"
        "make_driver(mode='swift', scan_device_id='superscan')\n"
        "heavy = ('torch', 'botorch', 'gpytorch', 'sklearn', 'zarr', 'aiomqtt', 'typer', 'rich', 'rsciio',\n"
        "         'stemagent.simulators', 'stemagent.agent', 'nion.usim_device')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""
