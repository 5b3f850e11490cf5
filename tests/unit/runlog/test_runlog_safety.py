"""Run logs others can read, and logs that stay whole when the disk fills or a chunk rots (issue 10)."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

from stemagent import Frame, ScanGeometry
from stemagent.errors import InputError
from stemagent.runlog import RunLog, RunLogWriter


def _frame(i: int, shape=(24, 32), fov=(6.4, 4.8)) -> Frame:
    g = ScanGeometry(center_A=(i * 2.0, 1.0), fov_A=fov, shape_px=shape, dwell_s=1e-6)
    img = np.random.default_rng(i).poisson(20.0, shape).astype(np.float32)
    return Frame(img, g, g.line_start_times_s(0.1 * i), 7, 100.0 + i, source="test")  # a device counter stuck at 7


def _write(run: Path, n: int = 3) -> list[Frame]:
    frames = [_frame(i) for i in range(n)] + [_frame(n, shape=(16, 16), fov=(8.0, 8.0))]
    with RunLogWriter(run, {"seed": 1}) as w:
        for f in frames:
            w.write_frame(f)
    return frames


def test_rosettasciio_reads_the_frames_with_calibration(tmp_path):
    """Issue 10 defect 12: the frames open in HyperSpy's zspy reader, calibrated in Å."""
    zspy = pytest.importorskip("rsciio.zspy")
    frames = _write(tmp_path / "run")
    signals = {s["metadata"]["General"]["title"]: s for s in zspy.file_reader(str(tmp_path / "run" / "frames.zarr"))}
    assert set(signals) == {"24x32_0.2A", "16x16_0.5A"}
    s = signals["24x32_0.2A"]
    assert s["data"].shape == (3, 24, 32)
    np.testing.assert_array_equal(s["data"][2], frames[2].image)
    frame_ax, y_ax, x_ax = s["axes"]
    assert frame_ax["navigate"] is True and frame_ax["size"] == 3
    assert (y_ax["name"], y_ax["units"], y_ax["size"]) == ("y", "Å", 24) and y_ax["scale"] == pytest.approx(0.2)
    assert (x_ax["name"], x_ax["units"], x_ax["size"]) == ("x", "Å", 32) and x_ax["scale"] == pytest.approx(0.2)
    assert signals["16x16_0.5A"]["axes"][2]["scale"] == pytest.approx(0.5)


def test_frames_carry_the_logs_own_index(tmp_path):
    """Issue 10 defect 6: the log numbers its frames itself, whatever the device's counter says."""
    _write(tmp_path / "run")
    data = RunLog.open(tmp_path / "run").event_data("frames")
    assert [d["log_index"] for d in data] == [0, 1, 2, 3]
    assert [d["frame_index"] for d in data] == [7, 7, 7, 7]


class FullDisk:
    """The document file of a writer once the disk is full: every write fails with ENOSPC."""

    def __init__(self, real, after_bytes: int) -> None:
        self.real, self.left = real, after_bytes

    def write(self, data) -> int:
        if len(data) > self.left:
            self.real.write(bytes(data[: self.left]))  # a torn line, as a real short write leaves
            self.left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_full_disk_still_leaves_a_whole_log_with_its_stop(tmp_path):
    w = RunLogWriter(tmp_path / "run", {"seed": 1})
    w.write_frame(_frame(0))
    w._doc_file = FullDisk(w._doc_file, after_bytes=50)
    with pytest.raises(OSError):
        w.write_frame(_frame(1))
    with pytest.raises(OSError):
        w.close("fail", "disk full")
    log = RunLog.open(tmp_path / "run")
    assert not log.truncated  # the torn line was cut back
    assert log.stop_from_reserve and log.stop["exit_status"] == "fail" and "disk full" in log.stop["reason"]
    assert len(list(log.frames())) == 1


def test_a_normal_close_leaves_no_reserve(tmp_path):
    _write(tmp_path / "run")
    assert not (tmp_path / "run" / "stop.json").exists()
    assert not RunLog.open(tmp_path / "run").stop_from_reserve


def test_a_corrupt_chunk_is_an_input_error_naming_the_frame(tmp_path):
    _write(tmp_path / "run")
    chunk = next((tmp_path / "run" / "frames.zarr" / "Experiments" / "24x32_0.2A" / "data" / "c").rglob("1/0/0"))
    chunk.write_bytes(b"\x00garbage" * 10)
    log = RunLog.open(tmp_path / "run")
    frames = log.event_data("frames")
    assert log.frame_from_data(frames[0]).image.shape == (24, 32)
    with pytest.raises(InputError, match=r"24x32_0.2A/data\[1\].*cannot be read"):
        log.frame_from_data(frames[1])


@pytest.mark.parametrize("damage", ["missing store", "bad zarr.json"])
def test_a_broken_store_fails_at_open(tmp_path, damage):
    _write(tmp_path / "run")
    store = tmp_path / "run" / "frames.zarr"
    if damage == "missing store":
        import shutil

        shutil.rmtree(store)
    else:
        (store / "Experiments" / "24x32_0.2A" / "data" / "zarr.json").write_text("{not json")
    with pytest.raises(InputError, match="not a readable Zarr array"):
        RunLog.open(tmp_path / "run")


def test_an_unwritable_log_directory_is_an_input_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # unwritable for root too
    with pytest.raises(InputError, match="cannot be created"):
        RunLogWriter(blocker / "run")


async def test_a_run_log_of_the_agent_opens_in_rosettasciio(tmp_path):
    zspy = pytest.importorskip("rsciio.zspy")
    from stemagent.agent.app.factory import build_agent
    from stemagent.config import config_from_dict

    cfg = config_from_dict({"max_frames": 3, "scan": {"fov_A": 12.8, "shape_px": 64, "dwell_s": 1e-5},
                            "safety": {"area_half_width_A": 60.0, "max_fov_A": 100.0}, "log": {"fsync": False}})
    summary = await (await build_agent(cfg, run_dir=tmp_path / "run")).run()
    (signal,) = zspy.file_reader(str(Path(summary.log_path) / "frames.zarr"), lazy=False)
    frames = list(RunLog.open(summary.log_path).frames())
    assert signal["data"].shape == (3, 64, 64)
    for k, f in enumerate(frames):
        np.testing.assert_array_equal(signal["data"][k], f.image)
    assert [(a["name"], a["units"]) for a in signal["axes"]] == [("frame", ""), ("y", "Å"), ("x", "Å")]
    assert signal["axes"][2]["scale"] == pytest.approx(frames[0].geometry.pixel_size_A[0])
