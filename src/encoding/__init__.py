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
- :mod:`.stage`: :class:`EncodingStage` and :class:`EncodingConfig`.
"""

from stemagent.encoding.stage import EncodingConfig, EncodingStage

__all__ = ["EncodingConfig", "EncodingStage"]
