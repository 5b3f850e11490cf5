"""The U-Net atom finder: a :class:`~stemagent.stages.Segmenter` backed by a trained network.

Frame path (all torch, on ``device``; on a GPU the data leave it only as the final atom arrays):

1. the raw image goes to the device once (``(B, H, W)`` float32);
2. it is resampled to the model sampling (``model_pixel_A``), normalised (low quantile off,
   divided by the mean) and padded (:mod:`~stemagent.segmentation.resample`);
3. the network gives per-class logits (fp16 + channels-last on CUDA);
4. peaks by max-pool NMS, class and confidence (:func:`~stemagent.segmentation.extract.find_peaks`);
5. peak positions are mapped back to frame pixels and refined by a joint Poisson ML Gaussian
   fit on the raw frame (:func:`~stemagent.segmentation.extract.refine_gaussians`), which also
   gives each atom's position uncertainty;
6. each site's class within its sublattice is re-decided from the counts around it by a
   per-frame Poisson mixture over compositions (C / Si / empty; S2 / S+Se / S / ...), with the
   neighbours' fitted images subtracted (:func:`~stemagent.segmentation.extract.aperture_counts`
   on the device, :func:`~stemagent.segmentation.intensity.classify_by_counts` on the host);
7. pixel positions become sample-frame positions (Å) through the frame's
   :class:`~stemagent.types.ScanGeometry`; atoms whose fitted position left the frame are dropped
   (no atom is ever reported outside the frame).

Before step 1 the detector is read off the frame's statistics (counting or analog, gain and
offset: :mod:`~stemagent.segmentation.detector`) and an analog frame is converted to electrons.
After step 6 every frame is checked against the trained specimens
(:mod:`~stemagent.segmentation.ood`): an atypical frame is logged as a warning, and with
``ood_fallback="log"`` its atoms come from the LoG finder instead. What each frame got (detector,
check, defect labels and their evidence) is in :attr:`UNetSegmenter.last_report`.

Weights are a ``state_dict`` (``.pt``) loaded with ``torch.load(weights_only=True)`` (no
arbitrary unpickling) and a model card (``.json``, same stem) that names the architecture,
class names and model sampling. The shipped weights live in ``stemagent/weights``.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from stemagent.errors import InputError
from stemagent.segmentation.classical import LoGFinder, check_image
from stemagent.segmentation.detector import DetectorEstimate, estimate_detector
from stemagent.segmentation.extract import aperture_counts, find_peaks, refine_gaussians
from stemagent.segmentation.intensity import DEFAULT_FAMILIES, MIN_EVIDENCE_NATS, classify_by_counts
from stemagent.segmentation.ood import FrameCheck, frame_check
from stemagent.segmentation.perovskite import PEROVSKITE_CLASS_NAMES, PerovskiteFinder
from stemagent.segmentation.resample import model_shape, pad_to_multiple, resize, scale_rc
from stemagent.segmentation.unet import build_model, fuse_batchnorm
from stemagent.types import Atoms, Frame

#: Classes of the shipped model: graphene (C, Si, empty site) and TMD columns (metal, chalcogen,
#: chalcogen column with a substituent, column with an atom missing).
CLASS_NAMES = ("C", "Si", "vacancy", "metal", "chalcogen", "substituted", "column-vacancy")
#: Classes that mark an empty site: no atom to fit, the network's position is kept.
EMPTY_CLASSES = ("vacancy",)
DEFAULT_WEIGHTS = "unet_segmenter.pt"


def default_weights_path() -> Path:
    """Path of the shipped weights (``stemagent/weights/unet_segmenter.pt``)."""
    return Path(str(resources.files("stemagent") / "weights" / DEFAULT_WEIGHTS))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; ``"cuda"`` without a GPU is an :class:`InputError`."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device", device, "CUDA was asked for but torch sees no GPU")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError("device", device, "must be 'auto', 'cpu' or 'cuda[:N]'")
    return torch.device(device)


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """Per-image normalisation of ``(B, 1, H, W)``: subtract the 1 % quantile, divide by the mean.

    Relative intensities (what tells Si from C) survive; the detector's gain, offset and the
    dose do not matter. Used identically in training and inference.
    """
    b = x.shape[0]
    flat = x.reshape(b, -1)
    step = max(1, flat.shape[1] // 65536)
    sub = flat[:, ::step].float()
    lo = torch.kthvalue(sub, max(1, int(0.01 * sub.shape[1])), dim=1).values
    y = x - lo.reshape(b, 1, 1, 1).to(x.dtype)
    mean = y.reshape(b, -1).mean(dim=1).clamp_min(1e-6)
    return y / mean.reshape(b, 1, 1, 1)


def class_log_weights(card: dict[str, Any]) -> torch.Tensor:
    """``log w_k`` of the atom classes' weights in the training loss (from the model card)."""
    names = list(card["class_names"])
    w = (card.get("config") or {}).get("class_weights")
    if w is None:  # the trainer's default: rare classes 4, others 2 (background 1)
        w = [1.0] + [4.0 if c in ("Si", "vacancy", "substituted", "column-vacancy") else 2.0 for c in names]
    if len(w) != len(names) + 1:
        raise InputError("model_card.config.class_weights", w, f"needs {len(names) + 1} values (background first)")
    return torch.log(torch.tensor(w[1:], dtype=torch.float32))


def load_card(weights: Path) -> dict[str, Any]:
    card_path = weights.with_suffix(".json")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError("weights", str(weights), f"has no readable model card {card_path.name} ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError("weights", str(card_path), f"model card is not valid JSON ({exc.msg})") from None
    for key in ("arch", "class_names", "model_pixel_A"):
        if key not in card:
            raise InputError(f"model_card.{key}", "<missing>", f"is required in {card_path.name}")
    return card


def load_network(weights: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the network named by the model card and load its weights (inference ready)."""
    weights = Path(weights)
    if not weights.is_file():
        raise InputError("weights", str(weights), "no such weights file")
    card = load_card(weights)
    model = build_model(card["arch"], len(card["class_names"]), **card.get("arch_kwargs", {}))
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model = fuse_batchnorm(model).to(device)
    if device.type == "cuda":
        model = model.half()
    # channels-last on every device: oneDNN's CPU convolutions run this network ~1.8x faster in
    # that layout (61 -> 33 ms per 256^2 model grid, one thread) with the same float32 arithmetic
    model = model.to(memory_format=torch.channels_last)
    return model, card


log = logging.getLogger("stemagent.segmentation")

#: what to do with a frame unlike the trained specimens
OOD_FALLBACKS = ("warn", "log")
#: the specimen prior: the classes each specimen may hold ("perovskite": LoG columns, A/B/O by
#: intensity, since the network was not trained on perovskites; "auto": chosen per frame)
SPECIMEN_CLASSES: dict[str, tuple[str, ...]] = {
    "graphene": ("C", "Si", "vacancy"),
    "tmd": ("metal", "chalcogen", "substituted", "column-vacancy"),
    "perovskite": PEROVSKITE_CLASS_NAMES,
}
SPECIMENS = (*SPECIMEN_CLASSES, "auto")


class UNetSegmenter:
    """Atom finder backed by a U-Net; ``find(frame) -> Atoms`` in the sample frame (Å).

    ``weights``: a ``.pt`` state dict with its ``.json`` model card (default: shipped weights).
    ``device``: ``"auto"`` / ``"cpu"`` / ``"cuda"``. ``threshold``: minimum atom probability of
    a peak. ``min_separation_A``: NMS radius. ``refine``: fit Gaussians on the raw frame.
    ``refine_pixel_A``: frames sampled finer than this are summed over integer ``f x f`` blocks
    for the fit. ``probe_sigma_A``: starting Gaussian width of a column image.
    ``position_prior_A``: width of a Gaussian prior centred on the network's position (the
    network places atoms from lattice context); it steadies the fit where an atom has only a
    few counts and is negligible against the likelihood where it has many (None: pure ML).
    ``correct_class_weights``: undo the training loss's class weights (from the model card) when
    choosing each atom's class, so rare classes are not over-called where the data are ambiguous.
    ``intensity_classes``: re-decide each site's class within its sublattice from the counts
    within ``class_aperture_A`` of it (needs ``refine``), the network's class probabilities
    weighing in to the power ``class_network_weight``; sites closer than ``intensity_margin_A``
    to the frame's edge are not used to fit the mixture (their neighbours outside the frame are
    not fitted, which biases the counts); with ``edge_classes`` they are then decided on their
    in-frame pixels against a widened host band (see ``edge`` of
    :func:`~stemagent.segmentation.intensity.classify_by_counts`: a Si half-cut by the edge stays
    a Si when its in-frame half is clearly bright), else they are left to the network and the
    earned-label rule below; what the mixture found on the last frame is in
    ``last_intensity_report``. ``min_evidence_nats``: the least log-likelihood ratio against the
    host class for a defect label ("vacancy", "Si", "substituted", "column-vacancy"; see
    :data:`~stemagent.segmentation.intensity.MIN_EVIDENCE_NATS`); each atom's is in
    :attr:`Atoms.evidence_nats <stemagent.types.Atoms.evidence_nats>`. ``ood_fallback``: what to
    do with a frame unlike the trained specimens (:mod:`~stemagent.segmentation.ood`): ``"warn"``
    logs a warning and keeps the network's atoms, ``"log"`` also replaces them with the LoG
    finder's (class ``"atom"``). ``specimen``: the specimen prior, one of :data:`SPECIMENS`:
    ``"graphene"`` / ``"tmd"`` restrict the classes to that specimen's (:data:`SPECIMEN_CLASSES`),
    ``"perovskite"`` takes A / B (/ O) columns from :class:`~stemagent.segmentation.perovskite.PerovskiteFinder`,
    ``"auto"`` chooses per frame (a square lattice on a covered frame: perovskite; otherwise the
    family holding most of the network's class probability) and says what it chose in the
    frame's report. ``gate_network_labels``: also gate the network's defect labels on frames where
    the count mixture could not measure the family (see :meth:`_earn_labels`). ``num_threads``: torch CPU threads (None leaves torch's setting).
    """

    #: the atoms of a frame depend on that frame alone (what is kept between frames, such as
    #: :attr:`atypical_frames`, only paces warnings): a verified replay may segment frames in
    #: parallel on copies of this segmenter (:mod:`stemagent.pipeline.verify`)
    per_frame = True

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str | torch.device = "auto",
        *,
        threshold: float = 0.3,
        min_separation_A: float = 0.6,
        refine: bool = True,
        refine_iterations: int = 3,
        refine_pixel_A: float = 0.2,
        probe_sigma_A: float = 0.35,
        position_prior_A: float | None = 0.1,
        correct_class_weights: bool = True,
        intensity_classes: bool = True,
        intensity_margin_A: float = 2.0,
        class_aperture_A: float = 0.8,
        class_network_weight: float = 0.5,
        min_evidence_nats: float = MIN_EVIDENCE_NATS,
        ood_fallback: str = "warn",
        specimen: str = "auto",
        gate_network_labels: bool = False,
        edge_classes: bool = True,
        num_threads: int | None = None,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise InputError("threshold", threshold, "must lie strictly between 0 and 1")
        if not min_separation_A > 0:
            raise InputError("min_separation_A", min_separation_A, "must be positive")
        if not probe_sigma_A > 0:
            raise InputError("probe_sigma_A", probe_sigma_A, "must be positive")
        if not class_aperture_A > 0:
            raise InputError("class_aperture_A", class_aperture_A, "must be positive")
        if not class_network_weight >= 0:
            raise InputError("class_network_weight", class_network_weight, "must be zero or positive")
        if specimen not in SPECIMENS:
            raise InputError("specimen", specimen, f"must be one of {SPECIMENS}")
        if ood_fallback not in OOD_FALLBACKS:
            raise InputError("ood_fallback", ood_fallback, f"must be one of {OOD_FALLBACKS}")
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        self.device = resolve_device(device)
        self.weights = Path(weights) if weights is not None else default_weights_path()
        self.model, self.card = load_network(self.weights, self.device)
        self._memory_format = torch.channels_last
        self.class_names: tuple[str, ...] = tuple(self.card["class_names"])
        self.model_pixel_A = float(self.card["model_pixel_A"])
        self.multiple = int(getattr(self.model, "multiple", 8))
        self.threshold = float(threshold)
        self.min_separation_A = float(min_separation_A)
        self.refine = bool(refine)
        self.refine_iterations = int(refine_iterations)
        self.refine_pixel_A = float(refine_pixel_A)
        self.probe_sigma_A = float(probe_sigma_A)
        self.position_prior_A = None if position_prior_A is None else float(position_prior_A)
        self._empty = torch.tensor([c in EMPTY_CLASSES for c in self.class_names], device=self.device)
        self._class_bias = class_log_weights(self.card).to(self.device) if correct_class_weights else None
        self.intensity_classes = bool(intensity_classes) and self.refine
        self.intensity_margin_A = float(intensity_margin_A)
        self.class_aperture_A = float(class_aperture_A)
        self.class_network_weight = float(class_network_weight)
        self.min_evidence_nats = float(min_evidence_nats)
        self.ood_fallback = ood_fallback
        self.specimen = specimen
        self.gate_network_labels = bool(gate_network_labels)
        self.edge_classes = bool(edge_classes)
        #: frames found unlike the trained specimens so far (warnings are logged at 1, 2, 4, 8, ...)
        self.atypical_frames = 0
        self._fallback = LoGFinder()
        self._perovskite = PerovskiteFinder()
        #: per frame of the last call: detector, out-of-distribution check, defect labels, fallback
        self.last_reports: list[dict[str, Any]] = []
        #: each class's sublattice family (index -> family name)
        self._family_of: dict[int, str] = {self.class_names.index(c): f.name for f in DEFAULT_FAMILIES for c in f.classes if c in self.class_names}
        #: each defect class's host class (index -> index), from the sublattice families
        self._host_of: dict[int, int] = {
            self.class_names.index(c): self.class_names.index(f.host)
            for f in DEFAULT_FAMILIES if f.host in self.class_names
            for c in f.classes if c != f.host and c in self.class_names
        }
        #: what the count mixture found on the last frame, per family (or why it was not used)
        self.last_intensity_report: dict[str, str] = {}
        #: the detector model read off the last frame's statistics (counting / analog, gain, offset)
        self.last_detector: DetectorEstimate | None = None

    def use_channels_last(self, on: bool = True) -> None:
        """Run the network in channels-last layout (the default: oneDNN's fast CPU path) or, with
        ``on=False``, in the contiguous NCHW layout (what ran before; kept for the benchmark)."""
        self._memory_format = torch.channels_last if on else torch.contiguous_format
        self.model = self.model.to(memory_format=self._memory_format)

    # --- tensors in, tensors out ---------------------------------------------------------
    @torch.inference_mode()
    def logits(self, images: torch.Tensor, pixel_A: tuple[float, float]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Network logits for ``(B, H, W)`` raw images of one sampling: ``((B, C+1, h', w'), (h, w))``.

        ``(h, w)`` is the valid (unpadded) model-grid shape.
        """
        h, w = images.shape[-2:]
        shape = model_shape((h, w), pixel_A, self.model_pixel_A)
        x = resize(images[:, None].float(), shape)
        x = pad_to_multiple(normalize_images(x), self.multiple)
        if self.device.type == "cuda":
            x = x.half().contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16):
                out = self.model(x)
        else:
            out = self.model(x.contiguous(memory_format=self._memory_format))
        return out.float().contiguous(), shape

    @torch.inference_mode()
    def find_tensors(self, images: torch.Tensor, pixel_A: tuple[float, float], counting: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Atoms of ``(B, H, W)`` raw images of one sampling, as device tensors. ``counting``
        ``(B,)`` marks images in electrons already (a counting detector, or converted by
        :meth:`DetectorEstimate.to_electrons <stemagent.segmentation.detector.DetectorEstimate.to_electrons>`).

        Returns ``batch`` ``(N,)``, ``rc`` ``(N, 2)`` frame pixels, ``classes`` ``(N,)``,
        ``confidence`` ``(N,)``, ``sigma_rc`` ``(N, 2)`` px, ``refined`` ``(N,)`` bool,
        ``class_probs`` ``(N, C)`` the network's probability of each class (their sum is that of
        an atom), ``edge_A`` ``(N,)`` distance from the frame's nearest edge (Å), and with
        ``intensity_classes`` the pixels around each site for the class decision, ``(N, P)``
        each: ``pixel_counts``, ``pixel_others``, ``pixel_psf``, ``pixel_mask`` (see
        :class:`~stemagent.segmentation.extract.ApertureCounts`).
        """
        h, w = images.shape[-2:]
        logits, shape = self.logits(images, pixel_A)
        sep_px = max(1, int(round(self.min_separation_A / self.model_pixel_A)))
        peaks = find_peaks(logits, self.threshold, sep_px, valid_shape=shape, class_bias=self._class_bias)
        rc = scale_rc(peaks.rc, shape, (h, w))
        px = float(np.mean(pixel_A))
        width0 = self.probe_sigma_A / px
        site: dict[str, torch.Tensor] = {}
        if self.refine and len(peaks):
            # fit on the raw counts, summed over f x f pixels when the frame is finely sampled
            # (sums of counts are still Poisson; the information lost is ~1 % when the pixel
            # stays well below the probe width)
            f = max(1, int(self.refine_pixel_A / px + 1e-6))
            data = images.float()
            if f > 1:
                hh, ww = (h // f) * f, (w // f) * f
                data = F.avg_pool2d(data[:, None, :hh, :ww], f)[:, 0] * float(f * f)
            fit = refine_gaussians(
                data,
                peaks.batch,
                (rc - 0.5 * (f - 1)) / f,
                width0 / f,
                iterations=self.refine_iterations,
                fit_mask=~self._empty[peaks.classes],
                prior_sigma_px=None if self.position_prior_A is None else self.position_prior_A / (px * f),
            )
            if self.intensity_classes:
                ap = aperture_counts(data, peaks.batch, fit.rc, fit, width0 / f, self.class_aperture_A / (px * f), counting)
                site = {"pixel_counts": ap.counts.flatten(1), "pixel_others": ap.others.flatten(1), "pixel_psf": ap.psf.flatten(1), "pixel_mask": ap.mask.flatten(1)}
            rc = fit.rc * f + 0.5 * (f - 1)
            sigma_rc, refined = fit.sigma_rc * f, fit.ok
        else:
            # without a fit: half a model pixel, uniform error
            sigma_rc = torch.full_like(rc, 0.5 * self.model_pixel_A / px / np.sqrt(3.0))
            refined = torch.zeros(len(peaks), dtype=torch.bool, device=rc.device)
        # distance of each atom from the frame's nearest edge (Å): fits there miss the neighbours outside
        size = torch.tensor([h - 1, w - 1], dtype=rc.dtype, device=rc.device)
        edge_A = (torch.minimum(rc, size - rc) * torch.tensor([pixel_A[1], pixel_A[0]], dtype=rc.dtype, device=rc.device)).min(dim=1).values
        return {"batch": peaks.batch, "rc": rc, "classes": peaks.classes, "confidence": peaks.confidence, "sigma_rc": sigma_rc, "refined": refined, "class_probs": peaks.class_probs, "edge_A": edge_A, **site}

    def _intensity_classes(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One frame's atoms with classes re-decided from the counts around them (in place), and
        every defect label earned (``host["evidence_nats"]``, see :meth:`_earn_labels`)."""
        n = len(host["classes"])
        host["evidence_nats"] = np.full(n, np.nan)
        if not self.intensity_classes or n == 0:
            return self._earn_labels(host)
        # every site of a family, fitted or not (an empty site has counts too), except near the
        # frame's edge, where the neighbours outside are not fitted and the counts are biased
        usable = host["edge_A"] >= self.intensity_margin_A
        try:
            res = classify_by_counts(
                host["pixel_counts"], host["pixel_others"], host["pixel_psf"], host["pixel_mask"], host["classes"], usable, self.class_names, DEFAULT_FAMILIES,
                class_probs=host["class_probs"], network_weight=self.class_network_weight, min_evidence_nats=self.min_evidence_nats,
                edge=~usable if self.edge_classes else None,
            )
        except (ValueError, IndexError, FloatingPointError, np.linalg.LinAlgError) as exc:
            # a refinement stage must not lose the frame: keep the network's classes, say why
            self.last_intensity_report = {"error": f"{type(exc).__name__}: {exc}"}
            return self._earn_labels(host)
        self.last_intensity_report = res.families
        measured = {f.name for f in DEFAULT_FAMILIES if str(res.families.get(f.name, "")).startswith("counts mixture")}
        host["classes"] = res.classes
        host["evidence_nats"] = res.evidence_nats
        # confidence: the network's atom probability x the mixture's class probability
        atom_p = host["class_probs"].sum(axis=1)
        host["confidence"] = np.where(res.decided, atom_p * res.class_posterior, host["confidence"])
        return self._earn_labels(host, measured)

    def _earn_labels(self, host: dict[str, np.ndarray], measured: set[str] | frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        """Sites the count mixture did not decide (within ``intensity_margin_A`` of the edge, a
        frame with too few sites of a family, the stage off): their evidence is the network's log
        odds of their class against the host class. Where the mixture measured the site's family
        on this frame (the site is in the edge band), a defect label needs those odds to reach
        ``min_evidence_nats``, else the host class. Where it could not (``measured`` lacks the
        family: e.g. a manipulation's small confirmation scan), the network's label stands with its
        odds reported, unless ``gate_network_labels`` asks for the gate there too."""
        ev = host["evidence_nats"]
        todo = ~np.isfinite(ev)
        if not todo.any():
            return host
        cls = host["classes"]
        probs = host.get("class_probs")
        for defect, host_k in self._host_of.items():
            sel = todo & (cls == defect)
            if not sel.any():
                continue
            if probs is None or len(probs) != len(cls):
                odds = np.full(int(sel.sum()), -np.inf)
            else:
                p = np.clip(probs[sel], 1e-12, None)
                odds = np.log(p[:, defect]) - np.log(p[:, host_k])
            gate = self.gate_network_labels or self._family_of.get(defect, "") in measured
            weak = ~(odds >= self.min_evidence_nats) if gate else np.zeros(len(odds), dtype=bool)
            idx = np.flatnonzero(sel)
            cls[idx[weak]] = host_k
            ev[idx] = np.where(weak, 0.0, odds)
        ev[todo & np.isin(cls, list(self._host_of.values()))] = 0.0
        return host

    # --- numpy / frames --------------------------------------------------------------------
    def find_pixels(self, image: np.ndarray, pixel_A: float | tuple[float, float]) -> dict[str, np.ndarray]:
        """Atoms of one image in pixel coordinates: dict of numpy arrays (see :meth:`find_tensors`)."""
        check_image(image, "image")
        pa = (float(pixel_A), float(pixel_A)) if np.isscalar(pixel_A) else (float(pixel_A[0]), float(pixel_A[1]))  # type: ignore[index]
        img, det = self._electrons(image)
        self._check_size(img.shape, pa, "image.shape")
        if float(np.ptp(img)) == 0.0:  # no contrast: nothing to find
            return {"batch": np.zeros(0, np.int64), "rc": np.zeros((0, 2)), "classes": np.zeros(0, np.int64), "confidence": np.zeros(0), "sigma_rc": np.zeros((0, 2)), "refined": np.zeros(0, bool)}
        t = torch.as_tensor(img, dtype=torch.float32).to(self.device)[None]
        out = self.find_tensors(t, pa, torch.tensor([det.kind == "counting"], device=self.device))
        one, report = self._analyse({k: v.cpu().numpy() for k, v in out.items()}, img.shape, pa, det)
        self.last_reports = [report]
        return one

    def _electrons(self, image: np.ndarray) -> tuple[np.ndarray, DetectorEstimate]:
        """``image`` in electrons by the detector model its own statistics give (float64), and
        that model (also kept in :attr:`last_detector`). The offset is taken off in float64:
        an analog frame of millions of counts loses its signal in float32."""
        det = estimate_detector(np.asarray(image))
        self.last_detector = det
        return det.to_electrons(check_image(image, "image")), det

    def _check_size(self, shape: tuple[int, ...], pixel_A: tuple[float, float], field: str) -> None:
        ms = model_shape((int(shape[0]), int(shape[1])), pixel_A, self.model_pixel_A)
        fov = (shape[0] * pixel_A[1], shape[1] * pixel_A[0])
        if min(fov) < 8 * self.model_pixel_A:
            raise InputError(field, tuple(shape), f"field of view {fov} Å is too small for the model (at least {8 * self.model_pixel_A:.2g} Å per side)")
        del ms

    def find(self, frame: Frame) -> Atoms:
        return self.find_batch([frame])[0]

    def find_batch(self, frames: Sequence[Frame]) -> list[Atoms]:
        """Atoms of several frames; frames of equal shape and sampling run as one batch."""
        out: list[Atoms | None] = [None] * len(frames)
        reports: list[dict[str, Any]] = [{} for _ in frames]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, f in enumerate(frames):
            img = np.asarray(f.image)
            groups.setdefault((img.shape, f.geometry.pixel_size_A), []).append(i)
        for (shape, pixel_A), idx in groups.items():
            for i in idx:
                check_image(frames[i].image, f"frames[{i}].image")
            conv = [self._electrons(frames[i].image) for i in idx]
            imgs = [im for im, _ in conv]
            dets = [d for _, d in conv]
            self._check_size(shape, pixel_A, f"frames[{idx[0]}].image.shape")
            # a frame without contrast (blanked beam, dead detector) has no atoms to find
            blank = [j for j, im in enumerate(imgs) if float(np.ptp(im)) == 0.0]
            for j in blank:
                i = idx[j]
                out[i] = self._atoms(frames[i], np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 2)), 1.0, 1.0)
                reports[i] = {"frame_index": frames[i].index, "detector": dets[j].describe(), "blank": True}
            if len(blank) == len(idx):
                continue
            idx = [i for j, i in enumerate(idx) if j not in blank]
            imgs = [im for j, im in enumerate(imgs) if j not in blank]
            dets = [d for j, d in enumerate(dets) if j not in blank]
            t = torch.as_tensor(np.stack(imgs), dtype=torch.float32).to(self.device)
            res = self.find_tensors(t, pixel_A, torch.tensor([d.kind == "counting" for d in dets], device=self.device))
            host = {k: v.cpu().numpy() for k, v in res.items()}
            px, py = pixel_A
            for j, i in enumerate(idx):
                sel = host["batch"] == j
                one, report = self._analyse({k: v[sel] for k, v in host.items()}, shape, pixel_A, dets[j], frames[i].index)
                report["frame_index"] = frames[i].index
                out[i] = self._atoms(frames[i], one["rc"], one["classes"], one["confidence"], one["sigma_rc"], px, py, one["evidence_nats"])
                if report["fallback"] == "perovskite":
                    out[i] = self._in_frame(frames[i], self._perovskite.find(frames[i]))
                    report["perovskite"] = self._perovskite.last_report
                elif report["fallback"]:
                    out[i] = self._fallback_atoms(frames[i])
                reports[i] = report
        self.last_reports = reports
        return [a for a in out if a is not None]

    @property
    def last_report(self) -> dict[str, Any]:
        """What the last frame got: detector, out-of-distribution check, defect labels, fallback."""
        return self.last_reports[-1] if self.last_reports else {}

    def _analyse(self, one: dict[str, np.ndarray], shape: tuple[int, ...], pixel_A: tuple[float, float],
                 det: DetectorEstimate, frame_index: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """One frame's atoms (pixel arrays) through the host-side steps: atoms outside the frame
        dropped, classes from the counts, defect labels earned, the frame checked."""
        h, w = int(shape[0]), int(shape[1])
        rc = one["rc"]
        inside = (rc[:, 0] >= -0.5) & (rc[:, 0] <= h - 0.5) & (rc[:, 1] >= -0.5) & (rc[:, 1] <= w - 0.5)
        dropped = int((~inside).sum())
        if dropped:
            one = {k: v[inside] for k, v in one.items()}
        check = frame_check(one["rc"], pixel_A, (h, w), one.get("class_probs"))
        specimen, why = self._choose_specimen(one, check)
        if specimen in ("graphene", "tmd"):
            self._restrict(one, SPECIMEN_CLASSES[specimen])
        one = self._intensity_classes(one)
        names = np.asarray(self.class_names)
        labels = names[one["classes"]] if len(one["classes"]) else np.zeros(0, dtype=names.dtype)
        defect = np.isin(one["classes"], list(self._host_of))
        ev = one["evidence_nats"][defect] if defect.any() else np.zeros(0)
        fallback = (not check.typical) and self.ood_fallback == "log" and specimen != "perovskite"
        report: dict[str, Any] = {
            "specimen": specimen,
            "specimen_choice": why,
            "detector": det.describe(),
            "detector_kind": det.kind,
            "check": check.to_dict(),
            "fallback": "log" if fallback else None,
            "dropped_outside_frame": dropped,
            "defect_labels": {str(c): int(np.sum(labels == c)) for c in names[list(self._host_of)]},
            "min_evidence_nats": round(self.min_evidence_nats, 3),
            "defect_evidence_nats_min": round(float(ev.min()), 3) if len(ev) else None,
        }
        if specimen == "perovskite":
            report["fallback"] = "perovskite"
            log.info("frame %s: specimen %s (%s): columns from the LoG finder, A/B by intensity", "?" if frame_index is None else frame_index, specimen, why)
        elif not check.typical:
            self.atypical_frames += 1
            # every atypical frame is in its log record; the console hears of the 1st, 2nd, 4th, 8th...
            if self.atypical_frames & (self.atypical_frames - 1) == 0:
                log.warning("frame %s: %s (score %.2f)%s [%d such frame%s so far]", "?" if frame_index is None else frame_index, check.reason,
                            check.score, "; atoms from the LoG finder" if fallback else "; atoms and classes may be wrong (ood_fallback: log uses the LoG finder)",
                            self.atypical_frames, "s" if self.atypical_frames > 1 else "")
        return one, report

    def _choose_specimen(self, one: dict[str, np.ndarray], check: FrameCheck) -> tuple[str, str]:
        """The frame's specimen and why (the configured one, or what ``auto`` read off the frame)."""
        if self.specimen != "auto":
            return self.specimen, "configured"
        if check.square >= 0.5 and check.uncovered < 0.05:
            return "perovskite", f"auto: square lattice ({check.square:.0%} of atoms with four neighbours)"
        probs = one.get("class_probs")
        if probs is None or len(probs) == 0:
            return "auto", "auto: no atoms to judge"
        mass = {k: float(probs[:, [self.class_names.index(c) for c in v if c in self.class_names]].sum())
                for k, v in SPECIMEN_CLASSES.items() if k != "perovskite"}
        best = max(mass, key=lambda k: mass[k])
        total = sum(mass.values()) or 1.0
        return best, f"auto: {mass[best] / total:.0%} of the network's class probability on {best} classes"

    def _restrict(self, one: dict[str, np.ndarray], allowed: tuple[str, ...]) -> None:
        """Classes restricted to ``allowed`` (in place): the others' probability is given to the
        allowed classes in proportion, and each site takes the most probable allowed class."""
        probs = one.get("class_probs")
        if probs is None or len(probs) == 0:
            return
        ok = np.array([c in allowed for c in self.class_names])
        total = probs.sum(axis=1, keepdims=True)
        kept = np.where(ok[None, :], probs, 0.0)
        s = kept.sum(axis=1, keepdims=True)
        first = int(np.flatnonzero(ok)[0])
        kept = np.where(s > 0, kept * total / np.maximum(s, 1e-30), 0.0)
        kept[(s[:, 0] <= 0), first] = total[s[:, 0] <= 0, 0]
        one["class_probs"] = kept.astype(probs.dtype)
        one["classes"] = np.argmax(np.where(ok[None, :], kept, -1.0), axis=1).astype(one["classes"].dtype)

    def _in_frame(self, frame: Frame, atoms: Atoms) -> Atoms:
        keep = frame.geometry.contains(atoms.positions_A)
        return atoms if keep.all() else Atoms(atoms.positions_A[keep], atoms.classes[keep], atoms.confidence[keep], atoms.frame_index, atoms.class_names,
                                              None if atoms.uncertainty_A is None else atoms.uncertainty_A[keep], None if atoms.times_s is None else atoms.times_s[keep])

    def _fallback_atoms(self, frame: Frame) -> Atoms:
        return self._in_frame(frame, self._fallback.find(frame))

    def _atoms(self, frame: Frame, rc: np.ndarray, classes: np.ndarray, conf: np.ndarray, sigma_rc: np.ndarray, px: float, py: float,
               evidence_nats: np.ndarray | None = None) -> Atoms:
        rc = rc.astype(np.float64)
        n = len(rc)
        pos = frame.geometry.pixel_to_sample(rc) if n else np.zeros((0, 2))
        unc = np.sqrt(0.5 * ((sigma_rc[:, 0] * py) ** 2 + (sigma_rc[:, 1] * px) ** 2)) if n else np.zeros(0)
        return Atoms(
            positions_A=pos,
            classes=classes.astype(np.int64),
            confidence=np.clip(conf.astype(np.float64), 0.0, 1.0),
            frame_index=frame.index,
            class_names=self.class_names,
            uncertainty_A=unc,
            times_s=frame.time_at_pixel(rc) if n else np.zeros(0),
            evidence_nats=np.zeros(n) if evidence_nats is None else np.nan_to_num(evidence_nats.astype(np.float64), nan=0.0),
        )
