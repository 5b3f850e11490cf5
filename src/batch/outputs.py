"""Batch outputs: one folder of Parquet tables per input, written then renamed, checked before a re-run.

Per input ``<out>/<name>/`` holds

- ``atoms.parquet``: one row per atom: ``frame``, ``x_A``, ``y_A`` (sample frame), ``class``
  (index into ``class_names`` of the provenance), ``class_name``, ``confidence``,
  ``uncertainty_A`` (NaN when the segmenter gives none) and one ``feature_<name>`` column per
  1-D per-atom feature a stage added (motif labels, symmetry scores, ...);
- ``frames.parquet``: one row per frame of the input: ``frame``, ``time_s``, ``n_atoms``,
  ``error`` (why the frame or a stage failed, empty when none), ``records`` and ``timings_ms``
  (each stage's record and wall time, JSON text).

Both files carry the provenance in their Parquet key-value metadata under ``stemagent``
(JSON): the stemagent version, the weights' sha256, the run configuration the input was
analysed with, the stages, the input's fingerprint (size and modification time) and the row
counts. The folder is written under a temporary name beside its final place and renamed into
place once both files are closed, so a killed batch never leaves a folder that looks complete.
:func:`is_complete` is what a re-run trusts: both files readable, their provenance that of the
same input as it is now, analysed with the same request, and every row there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: bump when the tables' columns change meaning
FORMAT_VERSION = 1
METADATA_KEY = b"stemagent"
ATOMS_FILE = "atoms.parquet"
FRAMES_FILE = "frames.parquet"
SUMMARY_FILE = "summary.parquet"


@dataclass
class FrameRows:
    """The per-frame and per-atom results of some frames of one input (what a task returns)."""

    atoms: dict[str, np.ndarray] = field(default_factory=dict)  # column -> (N_atoms,)
    frames: dict[str, list[Any]] = field(default_factory=dict)  # column -> one value per frame
    class_names: tuple[str, ...] = ()

    @property
    def n_frames(self) -> int:
        return len(self.frames.get("frame", []))

    @property
    def n_atoms(self) -> int:
        return len(self.atoms.get("frame", []))


def concat_rows(parts: list[FrameRows]) -> FrameRows:
    """The rows of ``parts`` in order (chunks of one input); atom columns absent from a part are NaN / -1 there."""
    out = FrameRows(class_names=next((p.class_names for p in parts if p.class_names), ()))
    atom_cols = list(dict.fromkeys(c for p in parts for c in p.atoms))
    for c in atom_cols:
        arrays = []
        for p in parts:
            if c in p.atoms:
                arrays.append(np.asarray(p.atoms[c]))
            else:
                like = next(q.atoms[c] for q in parts if c in q.atoms)
                fill = np.nan if np.asarray(like).dtype.kind == "f" else -1
                arrays.append(np.full(p.n_atoms, fill, dtype=np.asarray(like).dtype))
        out.atoms[c] = np.concatenate(arrays) if arrays else np.zeros(0)
    for c in dict.fromkeys(c for p in parts for c in p.frames):
        out.frames[c] = [v for p in parts for v in p.frames.get(c, [None] * p.n_frames)]
    return out


def fingerprint(path: Path) -> dict[str, Any]:
    """What identifies an input as it is now: its path, size and modification time (a run log:
    its documents file, which grows with every frame)."""
    p = Path(path)
    target = p / "documents.jsonl" if p.is_dir() else p
    st = target.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _table(columns: dict[str, Any], provenance: dict[str, Any]) -> pa.Table:
    table = pa.table(columns)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(provenance, sort_keys=True).encode()})


def atoms_table(rows: FrameRows, provenance: dict[str, Any]) -> pa.Table:
    a = rows.atoms
    n = rows.n_atoms
    cls = np.asarray(a.get("class", np.zeros(n, np.int64)), dtype=np.int64)
    names = rows.class_names
    cols: dict[str, Any] = {
        "frame": pa.array(np.asarray(a.get("frame", np.zeros(n)), dtype=np.int64)),
        "x_A": pa.array(np.asarray(a.get("x_A", np.zeros(n)), dtype=np.float64)),
        "y_A": pa.array(np.asarray(a.get("y_A", np.zeros(n)), dtype=np.float64)),
        "class": pa.array(cls),
        "class_name": pa.array([names[i] if 0 <= i < len(names) else "" for i in cls.tolist()], type=pa.string()),
        "confidence": pa.array(np.asarray(a.get("confidence", np.zeros(n)), dtype=np.float64)),
        "uncertainty_A": pa.array(np.asarray(a.get("uncertainty_A", np.full(n, np.nan)), dtype=np.float64)),
    }
    for k, v in a.items():
        if k.startswith("feature_"):
            cols[k] = pa.array(np.asarray(v))
    return _table(cols, provenance)


def frames_table(rows: FrameRows, provenance: dict[str, Any]) -> pa.Table:
    f = rows.frames
    n = rows.n_frames
    cols = {
        "frame": pa.array(f.get("frame", []), type=pa.int64()),
        "time_s": pa.array(f.get("time_s", [None] * n), type=pa.float64()),
        "n_atoms": pa.array(f.get("n_atoms", [0] * n), type=pa.int64()),
        "error": pa.array(f.get("error", [""] * n), type=pa.string()),
        "records": pa.array(f.get("records", ["{}"] * n), type=pa.string()),
        "timings_ms": pa.array(f.get("timings_ms", ["{}"] * n), type=pa.string()),
    }
    return _table(cols, provenance)


def write_input_outputs(folder: Path, rows: FrameRows, provenance: dict[str, Any]) -> Path:
    """Write ``folder`` (atoms and frames tables) under a temporary name, then rename it into place;
    an older folder of the same name is replaced. Returns ``folder``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    prov = {**provenance, "format_version": FORMAT_VERSION, "n_frames": rows.n_frames, "n_atoms": rows.n_atoms,
            "class_names": list(rows.class_names)}
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        pq.write_table(atoms_table(rows, prov), tmp / ATOMS_FILE)
        pq.write_table(frames_table(rows, prov), tmp / FRAMES_FILE)
        if folder.exists():  # an incomplete or stale result: out of the way first (a rename cannot replace a folder)
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_provenance(path: Path) -> dict[str, Any]:
    """The provenance stored in a batch Parquet file's metadata (``{}`` when it has none)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def is_complete(folder: Path, input_fingerprint: dict[str, Any], request: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a complete, valid result of this input as it is now for ``request``."""
    try:
        provs = []
        for name in (ATOMS_FILE, FRAMES_FILE):
            path = Path(folder) / name
            prov = read_provenance(path)
            rows = pq.read_metadata(path).num_rows
            expected = prov.get("n_atoms" if name == ATOMS_FILE else "n_frames")
            if rows != expected:
                return False
            provs.append(prov)
    except (OSError, ValueError, pa.ArrowException):
        return False
    a, f = provs
    return (a == f and a.get("format_version") == FORMAT_VERSION and a.get("input") == input_fingerprint
            and a.get("request") == request)


def write_summary(out: Path, rows: list[dict[str, Any]]) -> Path:
    """The summary table across inputs (``<out>/summary.parquet``), written then renamed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cols = ("input", "kind", "status", "frames", "atoms", "seconds", "output", "error")
    table = pa.table({c: [r.get(c) for r in rows] for c in cols})
    tmp = out / f".{SUMMARY_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp)
    os.replace(tmp, out / SUMMARY_FILE)
    return out / SUMMARY_FILE
