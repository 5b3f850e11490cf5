"""Done-when of issue 20: ``stemagent bridge --config configs/bridge/nion-usim.yaml`` serves a
headless Nion simulated microscope and ``stemagent run --config configs/zmq-nion-usim.yaml`` runs
a closed loop against it, each in its own process, as shipped (only ports and log folder changed)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("nion.usim_device", reason="the Nion packages are not installed: pip install 'stemagent[nion]'")

from stemagent.runlog import RunLog  # noqa: E402

from transport_fakes import free_port  # noqa: E402

pytestmark = [pytest.mark.system, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("stemagent")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "stemagent.agent.app.cli"]


def test_bridge_and_run_from_the_shipped_configs(tmp_path: Path) -> None:
    control, frames = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    bridge_cfg = yaml.safe_load((ROOT / "configs" / "bridge" / "nion-usim.yaml").read_text())
    bridge_cfg.update(control_endpoint=control, frames_endpoint=frames)
    (tmp_path / "bridge.yaml").write_text(yaml.safe_dump(bridge_cfg))
    run_cfg = yaml.safe_load((ROOT / "configs" / "zmq-nion-usim.yaml").read_text())
    run_cfg["driver"].update(control_endpoint=control, frames_endpoint=frames)
    run_cfg["log"] = {"directory": str(tmp_path / "runs")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_cfg))

    bridge = subprocess.Popen([*cli(), "bridge", "--config", str(tmp_path / "bridge.yaml")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # the agent waits for the bridge (connect_timeout_s 60): no need to wait for its banner here
        run = subprocess.run([*cli(), "run", "--config", str(tmp_path / "run.yaml")], capture_output=True, text=True,
                             timeout=240)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    finally:
        if bridge.poll() is None:
            bridge.send_signal(signal.SIGTERM)
        try:
            _, err = bridge.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            bridge.kill()
            _, err = bridge.communicate()
    assert bridge.returncode == 0, err
    assert "backend NionDriver (nion-usim, 30 pA)" in err and "stopped (SIGTERM); beam blanked" in err, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    log = RunLog.open(run_dir)
    assert log.stop is not None and log.stop["exit_status"] == "success"
    frames = list(log.frames())
    assert len(frames) == run_cfg["max_frames"]
    assert all(f.source == "nion-usim" and f.image.shape == (256, 256) for f in frames)
    assert len({f.geometry.center_A for f in frames}) > 1  # the raster policy moved the field through Nion
    assert all(len(a) > 100 for a in log.atoms())  # graphene seen in every frame
