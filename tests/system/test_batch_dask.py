"""``stemagent batch`` on a real Dask LocalCluster of 2 worker processes (issue 21): a folder of twin run logs,
a vendor file and a corrupt file; the atoms are the single-process replay's, bit for bit; a corrupt file is
reported and the rest complete; a second run skips everything; a worker killed mid-batch does not stop it."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from stemagent.agent.app.batch import BatchOptions, open_client, run_batch
from stemagent.agent.app.cli import app
from stemagent.agent.app.factory import build_agent, build_clock
from stemagent.batch.inputs import discover
from stemagent.batch.outputs import read_provenance
from stemagent.config import MinimalTwinConfig, config_from_dict
from stemagent.drivers.files import ACQUISITION_SUFFIXES
from stemagent.runlog import RunLog
from stemagent.simulators.minimal import MinimalTwinDriver
from stemagent.types import Atoms, ScanGeometry

pytestmark = [pytest.mark.system, pytest.mark.slow]
rsciio = pytest.importorskip("rsciio")
pytest.importorskip("distributed")

#: U-Net at one torch thread, as each batch worker runs it (torch's kernels sum in an order set by the thread count)
TWIN = {
    "scan": {"fov_A": 12.8, "shape_px": 64, "dwell_s": 1e-5},
    "pipeline": {"segmenter": {"kind": "unet", "device": "cpu", "num_threads": 1}, "drift": {}},
    "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0, "dose_budget_e_per_A2": 1e9},
    "agent": {"retry_s": 0.01},
    "log": {"fsync": False},
}


async def _record(run_dir: Path, seed: int, frames: int) -> None:
    cfg = config_from_dict({**TWIN, "name": f"twin-{seed}", "seed": seed, "max_frames": frames})
    clock = build_clock(cfg)
    agent = await build_agent(cfg, run_dir=run_dir, driver=MinimalTwinDriver(cfg.driver, seed=seed, clock=clock), clock=clock)
    summary = await agent.run()
    assert summary.exit_status == "success", summary.reason


def _write_emd(path: Path, n: int = 64, fov_nm: float = 1.28) -> None:
    from rsciio.emd import file_writer

    twin = MinimalTwinDriver(MinimalTwinConfig())
    g = ScanGeometry(center_A=(0.0, 0.0), fov_A=(fov_nm * 10, fov_nm * 10), shape_px=(n, n))
    img = np.asarray(twin.noiseless_image(g), dtype=np.float32)
    rng = np.random.default_rng(5)
    stack = np.stack([img, rng.poisson(50 * img + 1).astype(np.float32)])
    axes = [{"name": a, "size": n, "scale": fov_nm / n, "offset": -fov_nm / 2, "units": "nm", "navigate": False} for a in "yx"]
    file_writer(str(path), {"data": stack, "axes": [{"name": "t", "size": 2, "scale": 1.0, "offset": 0.0, "units": "s",
                                                     "navigate": True}, *axes],
                            "metadata": {"General": {"title": "HAADF"}, "Signal": {"signal_type": ""}}, "original_metadata": {}})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batch_inputs")
    threads = torch.get_num_threads()
    try:
        for seed in (3, 4):
            asyncio.run(_record(root / "logs" / f"run-{seed}", seed, 3))
    finally:
        torch.set_num_threads(threads)
    (root / "files").mkdir()
    _write_emd(root / "files" / "graphene.emd")
    (root / "files" / "broken.dm3").write_bytes(b"\x00\x00\x00\x03not really a DigitalMicrograph file")
    return root


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with open_client(None, 2) as c:
        yield c


def _atoms_by_frame(folder: Path) -> dict[int, dict[str, np.ndarray]]:
    t = pq.read_table(folder / "atoms.parquet").to_pydict()
    frame = np.asarray(t["frame"])
    return {int(f): {k: np.asarray(v)[frame == f] for k, v in t.items()} for f in np.unique(frame)}


def _same_bits(rows: dict[str, np.ndarray], a: Atoms) -> bool:
    pos = np.stack([rows["x_A"], rows["y_A"]], axis=1) if len(a) else np.zeros((0, 2))
    unc = a.uncertainty_A if a.uncertainty_A is not None else np.full(len(a), np.nan)
    return (pos.tobytes() == a.positions_A.tobytes() and rows["class"].tobytes() == a.classes.tobytes()
            and rows["confidence"].tobytes() == a.confidence.tobytes() and np.array_equal(rows["uncertainty_A"], unc, equal_nan=True))


def _replay_of_file(path: Path, log_dir: Path) -> RunLog:
    """``stemagent replay FILE`` in this process (one torch thread), its log."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, ["replay", str(path), "--log-dir", str(log_dir)])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return RunLog.open(next(p for p in log_dir.iterdir() if p.is_dir()))


def test_batch_matches_replay_reports_corrupt_file_and_skips_on_rerun(inputs: Path, client: Any, tmp_path: Path) -> None:
    found = discover([str(inputs)], ACQUISITION_SUFFIXES)
    assert sorted(i.kind for i in found) == ["file", "file", "runlog", "runlog"]
    out = tmp_path / "out"
    report = run_batch(client, found, BatchOptions(out=out))
    by_name = {o.input.path.name: o for o in report.outcomes}
    # the corrupt file: reported with its path and the reader's error; everything else completed
    broken = by_name["broken.dm3"]
    assert broken.status == "failed" and "broken.dm3" in broken.error and "RosettaSciIO" in broken.error
    assert [by_name[n].status for n in ("run-3", "run-4", "graphene.emd")] == ["done"] * 3
    assert report.frames == 3 + 3 + 2 and report.frames_per_s > 0
    # run logs: the replay reproduces each log's atoms bit for bit (``stemagent replay`` checks it); so must the batch
    for name in ("run-3", "run-4"):
        folder = Path(by_name[name].output)
        got = _atoms_by_frame(folder)
        logged = RunLog.open(inputs / "logs" / name).atoms()
        assert len(logged) == 3 and all(len(a) > 20 for a in logged)
        assert all(_same_bits(got[a.frame_index], a) for a in logged), name
        prov = read_provenance(folder / "atoms.parquet")
        assert prov["stages"] == ["segment", "drift"] and len(prov["weights_sha256"]) == 64
        assert prov["config"]["pipeline"]["segmenter"]["kind"] == "unet" and prov["stemagent_version"]
        frames = pq.read_table(folder / "frames.parquet").to_pydict()
        assert frames["frame"] == [a.frame_index for a in logged] and frames["error"] == ["", "", ""]
    # the vendor file: the single-process file replay's atoms, bit for bit
    replayed = _replay_of_file(inputs / "files" / "graphene.emd", tmp_path / "replays").atoms()
    got = _atoms_by_frame(Path(by_name["graphene.emd"].output))
    assert len(replayed) == 2 and all(_same_bits(got[i], a) for i, a in enumerate(replayed))
    summary = pq.read_table(out / "summary.parquet").to_pydict()
    assert sorted(summary["status"]) == ["done", "done", "done", "failed"]
    # a second run: every complete output is skipped (the corrupt file is tried again and fails again)
    again = run_batch(client, found, BatchOptions(out=out))
    assert sorted(o.status for o in again.outcomes) == ["failed", "skipped", "skipped", "skipped"]
    # an output whose tables no longer match (a truncated file) is not trusted: that input runs again
    atoms_file = Path(by_name["run-3"].output) / "atoms.parquet"
    atoms_file.write_bytes(atoms_file.read_bytes()[:100])
    third = run_batch(client, found[:3], BatchOptions(out=out))
    assert {o.input.path.name: o.status for o in third.outcomes}["run-3"] == "done"


def test_local_workers_run_without_dasks_malloc_trim_threshold(client: Any) -> None:
    # with it glibc's mmap threshold stays at 128 KiB and the U-Net ran at half speed in the workers (bench_batch.py)
    assert set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {None}
    assert set(client.run(os.environ.get, "OMP_NUM_THREADS").values()) == {"1"}


def test_batch_survives_a_worker_killed_mid_task(inputs: Path, client: Any, tmp_path: Path) -> None:
    found = [i for i in discover([str(inputs)], ACQUISITION_SUFFIXES) if i.path.name != "broken.dm3"]
    killed: list[int] = []

    def kill_one_busy_worker() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            busy = [w for w, keys in client.processing().items() if any(str(k).startswith("analyse") for k in keys)]
            if busy:
                pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_busy_worker)
    killer.start()
    # frame by frame (segment only): one task per frame, so the kill lands with work still queued
    report = run_batch(client, found, BatchOptions(out=tmp_path / "out", stages=("segment",), chunk_frames=1))
    killer.join()
    assert killed, "no worker was killed: the batch ended first"
    assert [o.status for o in report.outcomes] == ["done"] * 3, [o.error for o in report.outcomes]
    assert report.frames == 8
    run3 = next(o for o in report.outcomes if o.input.path.name == "run-3")
    frames = pq.read_table(Path(run3.output) / "frames.parquet").to_pydict()
    assert len(frames["frame"]) == 3 and all(n > 20 for n in frames["n_atoms"])


def test_cli_batch_on_an_existing_scheduler_reports_failure_and_exit_code(inputs: Path, client: Any, tmp_path: Path) -> None:
    address = client.scheduler.address
    result = CliRunner().invoke(app, ["batch", str(inputs / "files"), "--out", str(tmp_path / "out"), "--scheduler", address,
                                      "--json"])
    assert result.exit_code == 1, result.output
    assert '"done": 1, "failed": 1' in result.output and "broken.dm3" in result.output
    bad = CliRunner().invoke(app, ["batch", str(inputs), "--out", str(tmp_path / "o2"), "--stages", "segment,motifs"])
    assert bad.exit_code == 2 and "--stages" in bad.output and "motifs" in bad.output
