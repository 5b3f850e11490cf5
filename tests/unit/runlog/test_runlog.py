import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import event_model
import numpy as np
import pytest

from stemagent import Atoms, Frame, Park, ScanGeometry
from stemagent.errors import InputError
from stemagent.runlog import RunLog, RunLogWriter
from stemagent.types import Decision, ScanRegion


def _frame(i: int, shape=(32, 48), seed=0) -> Frame:
    g = ScanGeometry(center_A=(i * 1.5, -2.0), fov_A=(9.6, 6.4), shape_px=shape, dwell_s=1e-6, rotation_rad=0.1)
    img = np.random.default_rng(seed + i).random(shape).astype(np.float32)
    return Frame(img, g, g.line_start_times_s(0.1 * i), i, 123.4 + i, source="test", meta={"k": i, "nested": {"a": [1, 2]}})


def test_round_trip_is_exact_and_valid_event_model(tmp_path):
    frames = [_frame(i) for i in range(3)] + [_frame(3, shape=(16, 16))]
    rng = np.random.default_rng(5)
    atoms = [
        Atoms(rng.normal(size=(7, 2)) * 1e3, rng.integers(0, 2, 7), rng.random(7), i, ("C", "Si"), rng.random(7) * 1e-3, rng.random(7))
        for i in range(4)
    ]
    with RunLogWriter(tmp_path / "run", {"seed": 42, "config": {"a": 1}}) as w:
        for f, a in zip(frames, atoms):
            w.write_frame(f)
            w.write_atoms(a)
            w.write_decision(Decision(ScanRegion(f.geometry), "raster", "why", {"s": 0.5}), f.index)
            w.write_command(Park((1.0, 2.0), 0.5), outcome="sent", t_s=1.0)
        w.write_safety(verdict="refused", rule="dose", detail="too much", t_s=2.0)
        w.write_interruption(kind="pause", reason="operator", state="running", t_s=3.0)
    log = RunLog.open(tmp_path / "run")
    assert not log.truncated
    assert log.start["seed"] == 42
    assert log.stop is not None and log.stop["exit_status"] == "success"
    assert set(log.streams()) == {"frames", "atoms", "decisions", "commands", "safety", "interruptions"}
    assert [d["log_index"] for d in log.event_data("frames")] == [0, 1, 2, 3]
    for name, doc in log.documents:
        event_model.schema_validators[getattr(event_model.DocumentNames, name)].validate(doc)
    back = list(log.frames())
    assert len(back) == 4
    for f, b in zip(frames, back):
        assert b.image.dtype == np.float32
        np.testing.assert_array_equal(b.image, f.image)
        np.testing.assert_array_equal(b.line_times_s, f.line_times_s)
        assert b.geometry == f.geometry
        assert (b.index, b.dose_e_per_A2, b.source, b.meta) == (f.index, f.dose_e_per_A2, f.source, f.meta)
    for a, b in zip(atoms, log.atoms()):
        np.testing.assert_array_equal(a.positions_A, b.positions_A)
        np.testing.assert_array_equal(a.classes, b.classes)
        np.testing.assert_array_equal(a.confidence, b.confidence)
        np.testing.assert_array_equal(a.uncertainty_A, b.uncertainty_A)
        assert a.class_names == b.class_names
    decisions = log.event_data("decisions")
    assert decisions[0]["command"]["kind"] == "scan" and decisions[0]["scores"] == {"s": 0.5}


def test_documents_are_exactly_what_was_written(tmp_path):
    w = RunLogWriter(tmp_path / "run", {"seed": 1})
    doc = w.write_event("safety", {"verdict": "allowed", "rule": "", "detail": "x", "t_s": 0.1})
    w.close()
    log = RunLog.open(tmp_path / "run")
    events = log.events("safety")
    assert events == [json.loads(json.dumps(doc))]


def test_frames_store_opens_with_plain_zarr(tmp_path):
    import zarr

    with RunLogWriter(tmp_path / "run") as w:
        for i in range(3):
            w.write_frame(_frame(i))
    arr = zarr.open_array(str(tmp_path / "run" / "frames.zarr" / "Experiments" / "32x48_0.2A" / "data"), mode="r")
    assert arr.shape == (3, 32, 48)
    np.testing.assert_array_equal(arr[2], _frame(2).image)


def test_torn_last_line_is_ignored(tmp_path):
    w = RunLogWriter(tmp_path / "run")
    w.write_frame(_frame(0))
    w.write_frame(_frame(1))
    w._doc_file.write(b'["event", {"uid": "x", "des')  # a crash mid-line
    log = RunLog.open(tmp_path / "run")
    assert log.truncated
    assert log.stop is None
    assert [f.index for f in log.frames()] == [0, 1]


def test_reader_rejects_non_logs(tmp_path):
    with pytest.raises(InputError, match="not a run log"):
        RunLog.open(tmp_path)
    (tmp_path / "documents.jsonl").write_text('["event", {}]\n')
    with pytest.raises(InputError, match="start document"):
        RunLog.open(tmp_path)
    (tmp_path / "documents.jsonl").write_text("not json\n")
    with pytest.raises(InputError, match="line 1"):
        RunLog.open(tmp_path)
    (tmp_path / "documents.jsonl").write_text('["start", {"uid": "u", "time": 0, "stemagent_log_version": 99}]\n')
    with pytest.raises(InputError, match="version"):
        RunLog.open(tmp_path)


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    from stemagent import Frame, ScanGeometry, Atoms
    from stemagent.runlog import RunLogWriter
    w = RunLogWriter(sys.argv[1], {"seed": 0})
    g = ScanGeometry(shape_px=(128, 128))
    i = 0
    while True:
        img = np.full((128, 128), float(i), dtype=np.float32)
        w.write_frame(Frame(img, g, g.line_start_times_s(i), i, 1.0))
        w.write_atoms(Atoms(np.full((3, 2), float(i)), [0, 0, 0], [1, 1, 1], i))
        i += 1
    """
)


def test_killed_writer_leaves_a_log_readable_to_the_last_frame(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(run)])
    try:
        docs = run / "documents.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until the writer is well into its loop
            if docs.exists() and docs.read_bytes().count(b'"datum_kwargs"') >= 25:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the writer process made no progress")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    log = RunLog.open(run)
    assert log.stop is None  # it never closed
    frames = list(log.frames())
    assert len(frames) >= 24
    for k, f in enumerate(frames):  # every logged frame is complete and in order
        assert f.index == k
        assert np.all(f.image == float(k))
    atoms = log.atoms()
    assert len(atoms) >= len(frames) - 1
    for a in atoms:
        assert np.all(a.positions_A == float(a.frame_index))
