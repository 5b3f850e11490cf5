"""Atom finding: frames in, atoms (sample-frame positions, classes, confidences, uncertainties) out.

- :mod:`~stemagent.segmentation.classical`: Laplacian-of-Gaussian finder (the baseline).
- :mod:`~stemagent.segmentation.unet_segmenter`: :class:`UNetSegmenter`, the trained U-Net finder.
- :mod:`~stemagent.segmentation.unet`: the networks (dilated U-Net; default-layout U-Net).
- :mod:`~stemagent.segmentation.resample`: fixed model sampling and the position mapping back.
- :mod:`~stemagent.segmentation.extract`: torch peak finding and the Poisson ML Gaussian fit.
- :mod:`~stemagent.segmentation.crlb`: Cramér-Rao bounds on column positions.
- :mod:`~stemagent.segmentation.metrics`: matching and per-class F1 against ground truth.
- :mod:`~stemagent.segmentation.train`: training from any sample source (the agent wires the twin in).
"""
