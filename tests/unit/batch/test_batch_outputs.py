"""Batch outputs (issue 21): tables written then renamed, provenance in the Parquet metadata, what a re-run trusts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from stemagent.batch.inputs import discover
from stemagent.batch.outputs import FrameRows, concat_rows, fingerprint, is_complete, read_provenance, write_input_outputs
from stemagent.errors import InputError

pytest.importorskip("pyarrow")


def _rows(frame: int, n: int, motif: bool) -> FrameRows:
    atoms = {"frame": np.full(n, frame), "x_A": np.arange(n) * 1.5, "y_A": np.arange(n) * -0.5, "class": np.arange(n) % 2,
             "confidence": np.full(n, 0.9), "uncertainty_A": np.full(n, 0.01)}
    if motif:
        atoms["feature_motif"] = np.arange(n, dtype=np.int64)
    return FrameRows(atoms=atoms, frames={"frame": [frame], "time_s": [0.5 * frame], "n_atoms": [n], "error": [""],
                                          "records": ["{}"], "timings_ms": ["{}"]}, class_names=("C", "Si"))


def test_written_tables_carry_provenance_and_a_rerun_trusts_only_the_same_input(tmp_path: Path) -> None:
    src = tmp_path / "a.tif"
    src.write_bytes(b"x" * 10)
    rows = concat_rows([_rows(0, 3, True), _rows(1, 2, False)])
    # a frame without the motif column gets -1 there, and the rows stay in order
    assert rows.atoms["feature_motif"].tolist() == [0, 1, 2, -1, -1] and rows.frames["frame"] == [0, 1]
    request = {"stages": None}
    folder = write_input_outputs(tmp_path / "out" / "a", rows, {"input": fingerprint(src), "request": request, "weights_sha256": "ab"})
    assert sorted(os.listdir(tmp_path / "out")) == ["a"]  # no temporary folder left beside it
    atoms = pq.read_table(folder / "atoms.parquet").to_pydict()
    assert atoms["class_name"] == ["C", "Si", "C", "C", "Si"] and atoms["x_A"][1] == 1.5
    prov = read_provenance(folder / "frames.parquet")
    assert prov["n_frames"] == 2 and prov["n_atoms"] == 5 and prov["weights_sha256"] == "ab"
    assert is_complete(folder, fingerprint(src), request)
    assert not is_complete(folder, fingerprint(src), {"stages": ["segment"]})  # another request
    src.write_bytes(b"y" * 11)  # the input changed since
    assert not is_complete(folder, fingerprint(src), request)
    assert not is_complete(tmp_path / "out" / "missing", fingerprint(src), request)


def test_discover_finds_logs_and_files_and_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "logs" / "run-1").mkdir(parents=True)
    (tmp_path / "logs" / "run-1" / "documents.jsonl").write_text("")
    (tmp_path / "logs" / "notes.txt").write_text("")
    (tmp_path / "x.dm4").write_bytes(b"")
    found = discover([str(tmp_path / "logs"), str(tmp_path / "*.dm4"), str(tmp_path / "logs" / "run-1")], (".dm4",))
    assert [(i.path.name, i.kind) for i in found] == [("run-1", "runlog"), ("x.dm4", "file")]
    assert found[0].output_name.startswith("run-1-") and len(found[0].output_name) == len("run-1-") + 8
    with pytest.raises(InputError, match="INPUTS.*nothing-here"):
        discover([str(tmp_path / "nothing-here")], (".dm4",))
    with pytest.raises(InputError, match="notes.txt"):
        discover([str(tmp_path / "logs" / "notes.txt")], (".dm4",))
