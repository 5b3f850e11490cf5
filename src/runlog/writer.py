"""Append-only, crash-safe run log.

Layout of one run directory::

    <run>/documents.jsonl   one JSON document per line: ["start", {...}], ["descriptor", {...}], ...
    <run>/frames.zarr/      Zarr v3 group in HyperSpy's zspy layout (``frames_store.py``): one
                            calibrated stack (n_frames, rows, cols) per frame shape and pixel size
    <run>/stop.json         a reserved block holding the stop document when the document file
                            could not take it (a full disk); absent after a normal close

Documents follow the bluesky event-model shapes (start / descriptor / event / stop, with
resource / datum documents pointing at frames stored out of band), so a run log is a valid
bluesky document stream.

Crash safety: a frame is written to the array store first (Zarr's local store writes every
chunk and metadata file to a temporary name and renames it into place, so each file is either
old or new, never torn), then its datum and event documents are appended to the document file,
flushed and fsynced. A reader trusts only complete document lines, and an event only points at
a frame whose chunk was already on disk, so a process killed at any moment leaves a log
readable up to the last completed frame. A write that fails (a full disk, a file size limit)
is cut back to the last complete line, and the stop document then goes into ``stop.json``,
whose space was taken when the run started, so even a log that filled the disk ends with its
exit status and reason.

Frames are numbered by the log itself: every ``frames`` event carries ``log_index`` (0, 1, 2, ...
in the order written) beside the frame's own ``frame_index``.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stemagent.codec import encode_atoms, encode_command, encode_decision, encode_frame_meta, encode_park_result
from stemagent.errors import InputError
from stemagent.runlog.frames_store import FrameStore
from stemagent.types import Atoms, BeamCommand, Decision, Frame, ParkResult

#: 2: zspy frame store, log_index, parks with dose, controls, stop.json;
#: 3: the pipeline stream (per observation: stage timings, records, errors), drops, commands with
#: frames and stage conversions, the pipeline's stages in the start document; later in version 3
#: (readers need nothing new): ``motifs`` (the encoding stage's per-atom labels), ``pipeline``
#: events of ``observation: refused`` (the policy asked again after a refusal), ``latents`` (the rVAE
#: stage's per-atom latents)
LOG_FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
DOCUMENTS_FILE = "documents.jsonl"
FRAMES_STORE = "frames.zarr"
STOP_RESERVE = "stop.json"
STOP_RESERVE_BYTES = 16384
FRAME_SPEC = "STEMAGENT_ZARR_FRAME"

STREAMS = ("frames", "atoms", "decisions", "commands", "safety", "interruptions", "parks", "controls", "pipeline", "drops",
           "drift", "motifs", "latents")


def _jsonable(value: Any) -> Any:
    """Convert numpy values and containers to plain JSON types; non-finite floats become strings."""
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else repr(v)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


#: the conversion every logged value goes through (public: ``replay --verify`` compares through it)
jsonable = _jsonable


def _numpy_plain(value: Any) -> Any:
    """``json.dumps``'s ``default`` in :func:`fast_jsonable`: numpy values as :func:`_jsonable` converts them."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


#: keys ``json.dumps`` writes differently from ``str(key)`` (True, False, None) show as one of these
_ODD_KEYS = ('"true":', '"false":', '"null":')


def fast_jsonable(value: Any) -> Any:
    """:func:`_jsonable`'s result, through ``json.dumps`` (C) instead of a Python walk of every
    element (a 1000-atom frame's atoms and motifs took ~10 ms per frame on the loop's thread).
    Whatever the fast path could write differently falls back to :func:`_jsonable`: non-finite
    floats (``allow_nan=False`` raises), keys that are not str/int/float, and True/False/None keys."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False, default=_numpy_plain)
    except (TypeError, ValueError):
        return _jsonable(value)
    if any(k in text for k in _ODD_KEYS):
        return _jsonable(value)
    return json.loads(text)


def _dtype_of(value: Any) -> tuple[str, list[int]]:
    if isinstance(value, bool):
        return "boolean", []
    if isinstance(value, int):
        return "integer", []
    if isinstance(value, float):
        return "number", []
    if isinstance(value, str):
        return "string", []
    if isinstance(value, (list, tuple)):
        return "array", [len(value)]
    return "string", []


class RunLogWriter:
    """Writes one run. Not thread-safe: call it from one thread (the agent's writer task)."""

    def __init__(
        self,
        directory: str | Path,
        metadata: dict[str, Any] | None = None,
        *,
        fsync: bool = True,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(directory)
        try:
            self.path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise InputError("log directory", str(self.path), "already exists; a run log is never written over") from None
        except OSError as exc:
            raise InputError("log directory", str(self.path), f"cannot be created ({exc.strerror or exc})") from None
        self._fsync = fsync
        self._wall = wall_clock
        # unbuffered: every document is one write, and a failed write is cut back to the last whole line
        self._doc_file = open(self.path / DOCUMENTS_FILE, "ab", buffering=0)
        self._good_bytes = 0
        self._reserve_stop()
        self._frames = FrameStore(self.path / FRAMES_STORE)
        self._resources: dict[str, str] = {}
        self._descriptors: dict[str, str] = {}
        self._seq: dict[str, int] = {}
        self._frames_written = 0
        self._closed = False
        self.run_uid = str(uuid.uuid4())
        start = {
            "uid": self.run_uid,
            "time": self._wall(),
            "stemagent_log_version": LOG_FORMAT_VERSION,
            "streams": list(STREAMS),
        }
        start.update(_jsonable(metadata or {}))
        self._emit("start", start)
        self._sync()

    # --- low level ----------------------------------------------------------------------
    def _reserve_stop(self) -> None:
        """Take the space the stop document needs now, while the disk has room."""
        with open(self.path / STOP_RESERVE, "wb") as fh:
            fh.write(b" " * STOP_RESERVE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())

    def _emit(self, name: str, doc: dict[str, Any]) -> None:
        line = (json.dumps([name, doc], separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        try:
            view = memoryview(line)
            while view:
                n = self._doc_file.write(view)
                if not n:
                    raise OSError(28, "No space left on device (short write)")
                view = view[n:]
        except OSError:
            self._cut_back()
            raise
        self._good_bytes += len(line)

    def _cut_back(self) -> None:
        """Remove a partly written line, so the file always ends with a whole document."""
        try:
            os.ftruncate(self._doc_file.fileno(), self._good_bytes)
        except OSError:
            pass  # the reader ignores a torn last line anyway

    def _sync(self) -> None:
        if self._fsync:
            os.fsync(self._doc_file.fileno())

    def _descriptor(self, stream: str, data: dict[str, Any], external: set[str], json_keys: set[str]) -> str:
        if stream in self._descriptors:
            return self._descriptors[stream]
        keys: dict[str, Any] = {}
        for k, v in data.items():
            dtype, shape = _dtype_of(v)
            entry: dict[str, Any] = {"source": "stemagent", "dtype": dtype, "shape": shape}
            if k in external:
                entry.update(dtype="array", shape=[], external="FILESTORE:")
            if k in json_keys:
                entry["stemagent_json"] = True
            keys[k] = entry
        uid = str(uuid.uuid4())
        self._emit("descriptor", {"uid": uid, "run_start": self.run_uid, "time": self._wall(), "name": stream, "data_keys": keys})
        self._descriptors[stream] = uid
        self._seq[stream] = 0
        return uid

    def write_event(
        self, stream: str, data: dict[str, Any], *, sync: bool = False, external: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        """Append one event to ``stream``. The first event of a stream defines its descriptor.

        Values that are mappings are stored as JSON text (event-model has no object dtype) and
        marked ``stemagent_json`` in the descriptor so :class:`RunLog` decodes them again.
        """
        if self._closed:
            raise RuntimeError("run log is closed")
        plain = fast_jsonable(data)
        json_keys = {k for k, v in plain.items() if isinstance(v, dict)}
        plain = {k: (json.dumps(v, separators=(",", ":"), allow_nan=False) if k in json_keys else v) for k, v in plain.items()}
        desc = self._descriptor(stream, plain, set(external), json_keys)
        self._seq[stream] += 1
        now = self._wall()
        doc = {
            "uid": str(uuid.uuid4()),
            "descriptor": desc,
            "seq_num": self._seq[stream],
            "time": now,
            "data": plain,
            "timestamps": {k: now for k in plain},
            "filled": {k: False for k in external},
        }
        self._emit("event", doc)
        if sync:
            self._sync()
        return doc

    # --- streams ------------------------------------------------------------------------
    def write_frame(self, frame: Frame) -> dict[str, Any]:
        """Store the image out of band, then log its datum and event (fsynced).

        The event carries ``log_index``, this log's own count of frames, beside the frame's
        ``frame_index``."""
        if self._closed:
            raise RuntimeError("run log is closed")
        image = np.ascontiguousarray(np.asarray(frame.image, dtype=np.float32))
        resource_path, index, new = self._frames.append(image, frame.geometry.pixel_size_A, frame.detector)
        if new:
            res_uid = str(uuid.uuid4())
            self._resources[resource_path] = res_uid
            rows, cols = image.shape
            self._emit(
                "resource",
                {
                    "uid": res_uid,
                    "spec": FRAME_SPEC,
                    "root": str(self.path.resolve()),
                    "resource_path": resource_path,
                    "resource_kwargs": {"shape": [rows, cols], "dtype": "float32"},
                    "path_semantics": "posix",
                    "run_start": self.run_uid,
                },
            )
        res_uid = self._resources[resource_path]
        datum_id = f"{res_uid}/{index}"
        self._emit("datum", {"datum_id": datum_id, "resource": res_uid, "datum_kwargs": {"index": index}})
        fields = encode_frame_meta(frame)
        data = {
            "image": datum_id,
            "log_index": self._frames_written,
            "frame_index": fields.pop("index"),
            **fields,
        }
        doc = self.write_event("frames", data, sync=True, external=frozenset({"image"}))
        self._frames_written += 1
        return doc

    def write_atoms(self, atoms: Atoms) -> dict[str, Any]:
        return self.write_event("atoms", encode_atoms(atoms))

    def write_decision(self, decision: Decision, frame_index: int, observation: str = "frame") -> dict[str, Any]:
        """One ``decisions`` event; ``observation`` says what it was decided on: ``frame``, ``park``,
        or ``refused`` (asked again after a refusal, on the last frame)."""
        return self.write_event("decisions", {"frame_index": int(frame_index), "observation": observation,
                                              **encode_decision(decision)})

    def write_command(self, command: BeamCommand, *, outcome: str, t_s: float, detail: str = "", frames: int = 1,
                      converted: dict[str, Any] | None = None) -> dict[str, Any]:
        """One ``commands`` event: the command as sent to the device, its outcome, how many frames
        a streamed scan asked for, and what each pipeline stage converted (e.g. drift: sample to beam)."""
        return self.write_event("commands", {"command": encode_command(command), "outcome": outcome, "t_s": float(t_s),
                                             "detail": detail, "frames": int(frames), "converted": dict(converted or {})},
                                sync=True)

    def write_park(self, result: ParkResult, **extra: Any) -> dict[str, Any]:
        """One ``parks`` event: the park result's document, its signal and ``extra`` (e.g. the
        predicted dose), fsynced."""
        fields, signal = encode_park_result(result)
        return self.write_event("parks", {**fields, **extra, "signal": np.asarray(signal, dtype=np.float64)}, sync=True)

    def write_safety(self, *, verdict: str, rule: str, detail: str, t_s: float) -> dict[str, Any]:
        return self.write_event("safety", {"verdict": verdict, "rule": rule, "detail": detail, "t_s": float(t_s)}, sync=True)

    def write_interruption(self, *, kind: str, reason: str, state: str, t_s: float) -> dict[str, Any]:
        return self.write_event("interruptions", {"kind": kind, "reason": reason, "state": state, "t_s": float(t_s)}, sync=True)

    def close(self, exit_status: str = "success", reason: str = "") -> None:
        """Write the stop document (into ``stop.json`` if the document file cannot take it)."""
        if self._closed:
            return
        if exit_status not in ("success", "abort", "fail"):
            raise ValueError(f"exit_status={exit_status!r}: must be 'success', 'abort' or 'fail'")
        stop = {
            "uid": str(uuid.uuid4()),
            "run_start": self.run_uid,
            "time": self._wall(),
            "exit_status": exit_status,
            "reason": reason,
            "num_events": dict(self._seq),
        }
        self._closed = True
        try:
            self._emit("stop", stop)
            self._sync()
        except OSError as exc:
            self._stop_into_reserve(stop, exc)
            raise
        finally:
            self._doc_file.close()
        try:
            (self.path / STOP_RESERVE).unlink()
        except OSError:
            pass

    def _stop_into_reserve(self, stop: dict[str, Any], exc: OSError) -> None:
        why = f"{stop['reason']}"[:2000] + f"; the stop document went to {STOP_RESERVE}: {exc.strerror or exc}"
        body = json.dumps(["stop", {**stop, "reason": why}], separators=(",", ":"), allow_nan=False).encode("utf-8")
        fd = os.open(self.path / STOP_RESERVE, os.O_WRONLY)
        try:
            os.pwrite(fd, body.ljust(STOP_RESERVE_BYTES), 0)  # overwrites the reserved bytes: no new space
            os.fsync(fd)
        finally:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "RunLogWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("success" if exc_type is None else "fail", "" if exc is None else repr(exc))
