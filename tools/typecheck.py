"""Run mypy on the ``stemagent`` package, whose folders are mapped in pyproject.toml.

The package is spread over several top-level folders (``src/`` is ``stemagent``, ``agent/`` is
``stemagent.agent``, ...), a layout mypy cannot follow by itself. This script mirrors the
mapping as a tree of symbolic links under ``build/typecheck/``, runs mypy there (settings from
``[tool.mypy]`` in pyproject.toml) and prints every message with the real file path.

Usage: ``python tools/typecheck.py`` (exit status: mypy's).
"""

from __future__ import annotations

import os
import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"


def package_dirs() -> dict[str, Path]:
    """Package name -> folder, from ``[tool.setuptools]`` in pyproject.toml."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    mapping = {k: ROOT / v for k, v in conf.get("package-dir", {}).items()}
    out: dict[str, Path] = {}
    for pkg in conf["packages"]:
        # the nearest mapped parent decides where a subpackage lives
        parent = max((k for k in mapping if pkg == k or pkg.startswith(k + ".")), key=len)
        rest = pkg[len(parent):].lstrip(".")
        out[pkg] = mapping[parent].joinpath(*rest.split(".")) if rest else mapping[parent]
    return out


def build_tree() -> dict[str, str]:
    """Link every module of every package into ``TREE``; returns link path -> real path."""
    if TREE.exists():
        shutil.rmtree(TREE)
    links: dict[str, str] = {}
    for pkg, folder in package_dirs().items():
        target = TREE.joinpath(*pkg.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for src in folder.glob("*.py*"):
            if src.suffix in (".py", ".pyi") or src.name == "py.typed":
                link = target / src.name
                os.symlink(src, link)
                links[str(link.relative_to(ROOT))] = str(src.relative_to(ROOT))
    return links


def main() -> int:
    from mypy import api

    links = build_tree()
    stdout, stderr, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), str(TREE / "stemagent")])
    for text, stream in ((stdout, sys.stdout), (stderr, sys.stderr)):
        for line in text.splitlines():
            path, sep, rest = line.partition(":")
            stream.write(f"{links.get(path, path)}{sep}{rest}\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
