"""Reading real acquisition formats (written here with the formats' own writers) into frames."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stemagent.driver import EndOfData
from stemagent.drivers.files import FileDriver, read_acquisitions
from stemagent.errors import InputError
from stemagent.types import ScanGeometry

rsciio = pytest.importorskip("rsciio")


def signal(data: np.ndarray, scale_nm: float = 0.02, units: str = "nm", title: str = "HAADF") -> dict[str, Any]:
    axes = []
    if data.ndim == 3:
        axes.append({"name": "t", "size": data.shape[0], "scale": 1.0, "offset": 0.0, "units": "s", "navigate": True})
    rows, cols = data.shape[-2:]
    axes += [
        {"name": "y", "size": rows, "scale": scale_nm, "offset": 1.0, "units": units, "navigate": False},
        {"name": "x", "size": cols, "scale": scale_nm / 2, "offset": -0.5, "units": units, "navigate": False},
    ]
    return {"data": data, "axes": axes, "metadata": {"General": {"title": title}, "Signal": {"signal_type": ""}},
            "original_metadata": {}, "tmp_parameters": {}, "attributes": {"_lazy": False},
            "package_info": {"name": "hyperspy", "version": "2.0"}, "learning_results": {}, "models": {}}


def image(rows: int = 16, cols: int = 24) -> np.ndarray:
    return np.random.default_rng(0).random((rows, cols)).astype(np.float32)


def check_calibration(acq: Any, rows: int = 16, cols: int = 24) -> None:
    assert acq.image.shape == (rows, cols) and acq.image.dtype == np.float32
    assert acq.pixel_size_A == pytest.approx((0.1, 0.2))  # 0.01 nm and 0.02 nm in Å
    assert acq.center_A == pytest.approx((-5.0 + (cols - 1) / 2 * 0.1, 10.0 + (rows - 1) / 2 * 0.2))


def test_ncem_emd(tmp_path: Path) -> None:
    from rsciio.emd import file_writer

    p = tmp_path / "scan.emd"
    data = image()
    file_writer(str(p), signal(data))
    (acq,) = read_acquisitions(p)
    check_calibration(acq)
    np.testing.assert_allclose(acq.image, data)


def test_tiff(tmp_path: Path) -> None:
    pytest.importorskip("tifffile")
    from rsciio.tiff import file_writer

    p = tmp_path / "scan.tif"
    file_writer(str(p), signal(image()))
    (acq,) = read_acquisitions(p)
    assert acq.image.shape == (16, 24)
    assert acq.pixel_size_A == pytest.approx((0.1, 0.2), rel=1e-4)


def test_hspy_stack_becomes_frames(tmp_path: Path) -> None:
    from rsciio.hspy import file_writer

    p = tmp_path / "series.hspy"
    data = np.stack([image() + i for i in range(3)])
    file_writer(str(p), signal(data))
    acqs = read_acquisitions(p)
    assert len(acqs) == 3
    for i, a in enumerate(acqs):
        check_calibration(a)
        np.testing.assert_allclose(a.image, data[i])


def nion_properties() -> dict[str, Any]:
    return {
        "title": "HAADF",
        "spatial_calibrations": [{"offset": 1.0, "scale": 0.02, "units": "nm"}, {"offset": -0.5, "scale": 0.01, "units": "nm"}],
        "metadata": {"hardware_source": {"pixel_time_us": 4.0}},
    }


def test_nion_ndata(tmp_path: Path) -> None:
    p = tmp_path / "scan.ndata"
    data = image()
    buf = io.BytesIO()
    np.save(buf, data, allow_pickle=False)
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("metadata.json", json.dumps(nion_properties()))
        z.writestr("data.npy", buf.getvalue())
    (acq,) = read_acquisitions(p)
    check_calibration(acq)
    assert acq.dwell_s == pytest.approx(4e-6)


def test_nion_h5(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    p = tmp_path / "scan.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("data", data=image())
        f["data"].attrs["properties"] = json.dumps(nion_properties())
    (acq,) = read_acquisitions(p)
    check_calibration(acq)


def test_uncalibrated_file_is_refused_unless_overridden(tmp_path: Path) -> None:
    from rsciio.emd import file_writer

    p = tmp_path / "raw.emd"
    file_writer(str(p), signal(image(), units="px"))
    with pytest.raises(InputError, match="units"):
        read_acquisitions(p)
    (acq,) = read_acquisitions(p, pixel_size_A=0.5)
    assert acq.pixel_size_A == (0.5, 0.5)


def test_not_a_file_of_images(tmp_path: Path) -> None:
    p = tmp_path / "junk.dm3"
    p.write_bytes(b"\x00\x00\x00\x03 definitely not a DM3 file")
    with pytest.raises(InputError, match="RosettaSciIO"):
        read_acquisitions(p)
    q = tmp_path / "junk.ndata"
    q.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="Nion"):
        read_acquisitions(q)


async def test_file_driver_plays_images_as_frames(tmp_path: Path) -> None:
    from rsciio.hspy import file_writer

    p = tmp_path / "series.hspy"
    file_writer(str(p), signal(np.stack([image(), image()])))
    drv = FileDriver(p, pace="recorded", dwell_s=2e-6, beam_current_pA=10.0)
    await drv.connect()
    caps = await drv.capabilities()
    assert caps.can_park is False and caps.beam_current_pA == 10.0
    first = await drv.acquire(ScanGeometry())
    second = await drv.acquire(first.geometry)
    assert (first.index, second.index) == (0, 1)
    assert first.geometry.fov_A == pytest.approx((2.4, 3.2)) and first.geometry.dwell_s == 2e-6
    assert second.start_time_s == pytest.approx(first.geometry.frame_time_s)
    assert drv.clock.monotonic() == pytest.approx(2 * first.geometry.frame_time_s)  # recorded pace
    # no dwell in the file, but the user gave dwell and current: the dose is known (issue 12 item 7)
    assert first.dose_e_per_A2 > 0 and first.meta["dose_known"] is True
    assert drv.mismatched_geometries == 1
    bare = FileDriver(p, beam_current_pA=10.0)  # no dwell from the file or the user: dose unknown
    assert bare.frame(0).dose_e_per_A2 == 0.0 and bare.frame(0).meta["dose_known"] is False
    with pytest.raises(EndOfData):
        await drv.acquire(first.geometry)


@pytest.mark.parametrize("version", [3, 4])
def test_gatan_dm3_dm4(tmp_path: Path, version: int) -> None:
    from dm_writer import write_dm

    p = tmp_path / f"scan.dm{version}"
    data = image()
    write_dm(p, data, scale=(0.01, 0.02), offset=(-0.5, 1.0), version=version,
             image_tags=[("DigiScan", [("Sample Time", 4.0)]), ("Microscope Info", [("Probe Current (nA)", 0.02)])])
    (acq,) = read_acquisitions(p)
    check_calibration(acq)
    np.testing.assert_array_equal(acq.image, data)
    assert acq.dwell_s == pytest.approx(4e-6)  # DigiScan "Sample Time" is in µs
    assert acq.beam_current_pA == pytest.approx(20.0)
    frame = FileDriver(p).frame(0)
    assert frame.dose_e_per_A2 > 0 and frame.meta["dose_known"] is True


def test_cli_replay_runs_the_pipeline_on_a_dm4_file(tmp_path: Path) -> None:
    import json as _json

    from dm_writer import write_dm
    from typer.testing import CliRunner

    from stemagent.agent.app.cli import app
    from stemagent.config import MinimalTwinConfig
    from stemagent.simulators.minimal import MinimalTwinDriver

    n, fov_A = 128, 25.6
    g = ScanGeometry(fov_A=(fov_A, fov_A), shape_px=(n, n))
    img = np.asarray(MinimalTwinDriver(MinimalTwinConfig()).noiseless_image(g), dtype=np.float32)
    p = tmp_path / "graphene.dm4"
    write_dm(p, img, scale=(fov_A / 10 / n, fov_A / 10 / n), offset=(-fov_A / 20, -fov_A / 20), version=4,
             image_tags=[("DigiScan", [("Sample Time", 2.0)])])
    result = CliRunner().invoke(app, ["replay", str(p), "--json", "--log-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    summary = _json.loads(result.output.strip().splitlines()[-1])
    assert summary["frames"] == 1 and 150 < summary["atoms_per_frame"] < 350


def test_velox_emd_stack(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    from velox_writer import write_velox

    p = tmp_path / "velox.emd"
    data = (image() * 1000).astype(np.uint16)
    write_velox(p, np.stack([data, data + 1]), pixel_m=(1e-11, 2e-11), offset_m=(-5e-10, 1e-9), dwell_s=3e-6)
    acqs = read_acquisitions(p)
    assert len(acqs) == 2
    check_calibration(acqs[0])
    np.testing.assert_array_equal(acqs[1].image, data + 1)
    assert acqs[0].dwell_s == pytest.approx(3e-6)
