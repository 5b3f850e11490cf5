"""What a batch analyses: run logs and acquisition files named directly, by folder or by glob.

A folder holding ``documents.jsonl`` is a run log; any other folder is searched (recursively)
for run logs and for files with an acquisition suffix (``drivers/files.py`` reads them; core
only knows the suffixes, passed in). Every input gets an output name of its own: its name and a
short hash of its absolute path, so two ``run-1`` folders in different places do not collide.
"""

from __future__ import annotations

import glob
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from stemagent.errors import InputError

DOCUMENTS = "documents.jsonl"


@dataclass(frozen=True)
class BatchInput:
    path: Path
    kind: Literal["runlog", "file"]

    @property
    def output_name(self) -> str:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", self.path.name)[:80] or "input"
        digest = hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:8]
        return f"{stem}-{digest}"


def _is_runlog(p: Path) -> bool:
    return p.is_dir() and (p / DOCUMENTS).is_file()


def _walk(folder: Path, suffixes: tuple[str, ...]) -> Iterable[BatchInput]:
    if _is_runlog(folder):
        yield BatchInput(folder, "runlog")
        return
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            yield from _walk(child, suffixes)
        elif child.suffix.lower() in suffixes:
            yield BatchInput(child, "file")


def discover(items: Iterable[str], suffixes: tuple[str, ...]) -> list[BatchInput]:
    """The inputs named by ``items`` (paths, folders, globs), in order, each once.

    A path that names nothing is an :class:`InputError` naming it; so is a file without an
    acquisition suffix named directly (a folder's other files are passed over)."""
    found: dict[Path, BatchInput] = {}
    for item in items:
        paths = [Path(p) for p in sorted(glob.glob(item))] if any(ch in item for ch in "*?[") else [Path(item)]
        if not paths:
            raise InputError("INPUTS", item, "matches no file or folder")
        for p in paths:
            if p.name == DOCUMENTS and p.is_file():
                p = p.parent
            if p.is_dir():
                for inp in _walk(p, suffixes):
                    found.setdefault(inp.path.resolve(), inp)
            elif p.is_file():
                if p.suffix.lower() not in suffixes:
                    raise InputError("INPUTS", str(p), f"is neither a run log nor an acquisition file ({', '.join(suffixes)})")
                found.setdefault(p.resolve(), BatchInput(p, "file"))
            else:
                raise InputError("INPUTS", str(p), "no such file or folder")
    return list(found.values())
