"""Local structure encoding: Zernike motif features, motif clustering and hierarchy, unmixing.

- :mod:`.zernike`: the Zernike basis on a patch grid and batched moments (torch);
- :mod:`.patches`: patch geometry, sub-pixel anchors, input checks;
- :mod:`.features`: per-atom features of a frame (magnitudes, complex moments, symmetry scores);
- :mod:`.layout`, :mod:`.clustering`: the force-relaxed kNN layout, HDBSCAN / Gaussian-mixture
  clustering and label scoring;
- :mod:`.library`: stable motif ids across frames;
- :mod:`.hierarchy`: motif-cells, their counts and composition tree, rare cells;
- :mod:`.unmixing`: PCA / NMF / ICA / GMM of neighbourhood sub-images, loading maps, lattice
  displacements;
- :mod:`.config`: :class:`EncodingConfig` (pydantic only: the run config imports it);
- :mod:`.stage`: :class:`EncodingStage`.

``EncodingStage`` is imported on first use (PEP 562): the run config reads
:mod:`stemagent.encoding.config` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from stemagent.encoding.config import EncodingConfig

__all__ = ["EncodingConfig", "EncodingStage"]


def __getattr__(name: str) -> Any:
    if name == "EncodingStage":
        return importlib.import_module("stemagent.encoding.stage").EncodingStage
    raise AttributeError(f"module 'stemagent.encoding' has no attribute {name!r}")
