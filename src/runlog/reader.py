"""Read a run log back: documents exactly as written, frames and atoms as core types.

A log cut short by a crash is read up to its last complete document line; an incomplete last
line is ignored and reported in :attr:`RunLog.truncated`. A stop document that went to
``stop.json`` (the document file could not take it) is read from there. Nothing is unpickled:
documents are JSON, frames are Zarr arrays. A frame store that is missing or whose metadata is
unreadable is an :class:`~stemagent.errors.InputError` when the log is opened; a frame whose
chunk is corrupt is an :class:`~stemagent.errors.InputError` naming the frame when it is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from stemagent.codec import decode_atoms, decode_decision, decode_frame_meta, decode_park_result
from stemagent.errors import InputError
from stemagent.runlog.writer import DOCUMENTS_FILE, FRAME_SPEC, READABLE_VERSIONS, STOP_RESERVE
from stemagent.types import Atoms, Decision, Frame, ParkResult


@dataclass
class RunLog:
    path: Path
    documents: list[tuple[str, dict[str, Any]]]
    truncated: bool = False
    stop_from_reserve: bool = False
    _streams: dict[str, str] = field(default_factory=dict)  # descriptor uid -> stream name
    _resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    _datums: dict[str, dict[str, Any]] = field(default_factory=dict)
    _arrays: dict[str, Any] = field(default_factory=dict)
    _json_keys: dict[str, set[str]] = field(default_factory=dict)  # descriptor uid -> keys stored as JSON text

    @classmethod
    def open(cls, path: str | Path) -> "RunLog":
        root = Path(path)
        if root.is_file() and root.name == DOCUMENTS_FILE:
            root = root.parent
        doc_path = root / DOCUMENTS_FILE
        if not doc_path.is_file():
            raise InputError("path", str(root), f"is not a run log (no {DOCUMENTS_FILE})")
        documents: list[tuple[str, dict[str, Any]]] = []
        truncated = False
        with open(doc_path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.endswith(b"\n"):
                    truncated = True  # torn final line from a crash
                    break
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InputError(f"{doc_path}:line {lineno}", raw[:60], f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
                try:
                    name, doc = json.loads(line)
                except (ValueError, TypeError) as exc:
                    raise InputError(f"{doc_path}:line {lineno}", line[:60], f"is not a JSON [name, document] pair ({exc})") from None
                if not isinstance(name, str) or not isinstance(doc, dict):
                    raise InputError(f"{doc_path}:line {lineno}", line[:60], "is not a [name, document] pair")
                documents.append((name, doc))
        if not documents or documents[0][0] != "start":
            first = documents[0][0] if documents else ("<an incomplete line: the log was cut short>" if truncated else "<empty>")
            raise InputError(f"{doc_path}:line 1", first, "a run log must begin with a start document")
        version = documents[0][1].get("stemagent_log_version")
        if version not in READABLE_VERSIONS:
            raise InputError("start.stemagent_log_version", version, f"this reader understands versions {READABLE_VERSIONS}")
        from_reserve = False
        if not any(name == "stop" for name, _ in documents):
            reserved = _reserved_stop(root / STOP_RESERVE)
            if reserved is not None:
                documents.append(("stop", reserved))
                from_reserve = True
        log = cls(path=root, documents=documents, truncated=truncated, stop_from_reserve=from_reserve)
        for name, doc in documents:
            if name == "descriptor":
                log._streams[doc["uid"]] = doc.get("name", "primary")
                log._json_keys[doc["uid"]] = {k for k, v in doc.get("data_keys", {}).items() if v.get("stemagent_json")}
            elif name == "resource":
                log._resources[doc["uid"]] = doc
            elif name == "datum":
                log._datums[doc["datum_id"]] = doc
        for uid in log._resources:  # a missing store or broken metadata: the log cannot be used
            log._array(uid)
        return log

    # --- documents -----------------------------------------------------------------------
    @property
    def start(self) -> dict[str, Any]:
        return self.documents[0][1]

    @property
    def stop(self) -> dict[str, Any] | None:
        for name, doc in reversed(self.documents):
            if name == "stop":
                return doc
        return None

    def events(self, stream: str) -> list[dict[str, Any]]:
        """Event documents of one stream, exactly as written."""
        return [doc for name, doc in self.documents if name == "event" and self._streams.get(doc["descriptor"]) == stream]

    def event_data(self, stream: str) -> list[dict[str, Any]]:
        """The ``data`` of each event of ``stream``, with JSON-text fields decoded."""
        out = []
        for ev in self.events(stream):
            keys = self._json_keys.get(ev["descriptor"], set())
            out.append({k: (json.loads(v) if k in keys else v) for k, v in ev["data"].items()})
        return out

    def ordered_event_data(self, *streams: str) -> list[tuple[str, dict[str, Any]]]:
        """``(stream, data)`` of the events of ``streams`` in the order they were written."""
        out = []
        for name, doc in self.documents:
            if name != "event":
                continue
            stream = self._streams.get(doc["descriptor"])
            if stream in streams:
                keys = self._json_keys.get(doc["descriptor"], set())
                out.append((stream, {k: (json.loads(v) if k in keys else v) for k, v in doc["data"].items()}))
        return out

    def streams(self) -> list[str]:
        return list(dict.fromkeys(self._streams.values()))

    # --- frames --------------------------------------------------------------------------
    def _array(self, resource_uid: str) -> Any:
        if resource_uid not in self._arrays:
            res = self._resources[resource_uid]
            if res.get("spec") != FRAME_SPEC:
                raise InputError("resource.spec", res.get("spec"), f"this reader understands {FRAME_SPEC}")
            # resolve relative to where the log is now, not where it was written
            where = self.path / res["resource_path"]
            try:
                self._arrays[resource_uid] = zarr.open_array(str(where), mode="r")
            except Exception as exc:  # noqa: BLE001 - missing folder, bad zarr.json: zarr raises many kinds
                raise InputError(str(where), res["resource_path"], f"is not a readable Zarr array ({type(exc).__name__}: {exc})") from None
        return self._arrays[resource_uid]

    def read_image(self, datum_id: str) -> np.ndarray:
        datum = self._datums.get(datum_id)
        if datum is None:
            raise InputError("image", datum_id, "refers to no datum document in this log")
        arr = self._array(datum["resource"])
        index = int(datum["datum_kwargs"]["index"])
        where = f"{self._resources[datum['resource']]['resource_path']}[{index}]"
        if index >= arr.shape[0]:
            raise InputError(where, datum_id, "no such frame in the store")
        try:
            image = np.asarray(arr[index])
        except Exception as exc:  # noqa: BLE001 - a corrupt chunk: any codec error
            raise InputError(where, datum_id, f"frame cannot be read ({type(exc).__name__}: {exc})") from None
        if image.size and np.isnan(image).all():
            raise InputError(where, datum_id, "frame chunk is missing from the store")
        return image

    def frame_from_data(self, d: dict[str, Any]) -> Frame:
        """The frame of one ``frames`` event (its metadata through the frame codec)."""
        meta = {k: v for k, v in d.items() if k not in ("image", "log_index", "frame_index")}
        meta["index"] = d.get("frame_index")
        return decode_frame_meta(meta, self.read_image(d["image"]), f"frames[log_index={d.get('log_index', '?')}]")

    def park_results(self) -> list[ParkResult]:
        """The logged parks as :class:`~stemagent.types.ParkResult` (logs before version 2 kept no dose: 0)."""
        return [decode_park_result(d, d.get("signal", []), f"parks[{i}]", besides=("signal", "predicted_dose_e_per_A2"))
                for i, d in enumerate(self.event_data("parks"))]

    def frames(self) -> Iterator[Frame]:
        for d in self.event_data("frames"):
            yield self.frame_from_data(d)

    def atoms(self) -> list[Atoms]:
        """Every ``atoms`` event as :class:`~stemagent.types.Atoms` (the atoms codec)."""
        return [decode_atoms(d, f"atoms[{i}]") for i, d in enumerate(self.event_data("atoms"))]

    def decisions(self) -> list[Decision]:
        """Every ``decisions`` event as a :class:`~stemagent.types.Decision` (the decision codec)."""
        return [decode_decision({k: d[k] for k in ("command", "policy", "reason", "scores") if k in d}, f"decisions[{i}]")
                for i, d in enumerate(self.event_data("decisions"))]


def _reserved_stop(path: Path) -> dict[str, Any] | None:
    """The stop document a writer put into ``stop.json`` when the document file was full."""
    try:
        text = path.read_bytes().strip()
    except OSError:
        return None
    if not text:
        return None
    try:
        name, doc = json.loads(text)
    except (ValueError, TypeError):
        return None
    return doc if name == "stop" and isinstance(doc, dict) else None
