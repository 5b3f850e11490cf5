"""The rVAE stage: ``(Frame, Atoms) -> per-atom latents`` from a trained rVAE (:mod:`.rvae`).

Pure and synchronous (the agent runs it in an executor); it keeps only the model. Each atom's
patch is sampled as in training (:func:`~stemagent.encoding.rvae_train.sample_patches`: the frame
normalised by :func:`~stemagent.encoding.rvae_train.normalize_frame`, a ``P x P`` grid at the
model's ``pixel_A`` whose axes are the sample frame's x and y), so the angle is an angle in the
sample frame whatever the scan rotation. Atoms in the drift-corrected sample frame are put back
where the beam saw them with the drift estimate at each atom's time, when the observation has one
(``times_s`` and ``displacement_A`` on the estimate, ``times_s`` on the atoms).

Output of :meth:`RVAEStage.process` (numpy, ``N`` atoms in the order of ``atoms``):

- ``rvae_encoded`` ``(N,)`` bool: the atom's patch lies inside the frame;
- ``rvae_angle_rad`` ``(N,)``: the in-plane angle of the neighbourhood, in ``[-pi/fold, pi/fold)``
  (counter-clockwise in the sample frame; NaN where not encoded);
- ``rvae_shift_px`` ``(N, 2)``: the atom's offset from the patch centre (x, y), patch pixels;
- ``rvae_z`` ``(N, k)``: the content latents (what the neighbourhood is, not how it is turned).

:attr:`RVAEStage.weights_version` names the weights (file name and the first 12 hex digits of
their SHA-256), logged with every record.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stemagent.encoding.config import PipelineRVAEConfig
from stemagent.encoding.patches import check_image
from stemagent.encoding.rvae import default_rvae_weights, load_rvae
from stemagent.encoding.rvae_train import normalize_frame, sample_patches
from stemagent.errors import InputError
from stemagent.types import Atoms, Frame

def weights_version(path: Path) -> str:
    """``<file name>@<first 12 hex of SHA-256>``."""
    return f"{path.name}@{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"


class RVAEStage:
    """See the module docstring. ``process`` is the entry point."""

    name = "rvae"

    def __init__(self, config: PipelineRVAEConfig | None = None) -> None:
        self.config = c = config or PipelineRVAEConfig()
        self.weights = Path(c.weights) if c.weights is not None else default_rvae_weights()
        device = None if c.device == "auto" else c.device
        self.model = load_rvae(self.weights, device=device)
        self.weights_version = weights_version(self.weights)
        head = self.weights.with_suffix(".json")
        card = json.loads(head.read_text(encoding="utf-8"))
        pixel_A = card.get("pixel_A")
        if not (isinstance(pixel_A, (int, float)) and math.isfinite(pixel_A) and pixel_A > 0):
            raise InputError(f"{head.name}.pixel_A", pixel_A, "must be the patch sampling the model was trained at (Å/px)")
        self.pixel_A = float(pixel_A)

    def process(self, frame: Frame, atoms: Atoms, drift: Any = None) -> dict[str, np.ndarray]:
        n_threads = self.config.num_threads
        if n_threads is None:
            return self._process(frame, atoms, drift)
        before = torch.get_num_threads()
        torch.set_num_threads(n_threads)
        try:
            return self._process(frame, atoms, drift)
        finally:
            torch.set_num_threads(before)

    def beam_positions_A(self, atoms: Atoms, drift: Any) -> np.ndarray:
        """Where the beam saw each atom: sample-frame positions plus the drift at the atom's time."""
        pos = atoms.positions_A
        t_grid = getattr(drift, "times_s", None)
        disp = getattr(drift, "displacement_A", None)
        if drift is None or atoms.times_s is None or t_grid is None or disp is None or len(t_grid) == 0:
            return pos
        t_grid, disp = np.asarray(t_grid, dtype=np.float64), np.asarray(disp, dtype=np.float64)
        d = np.stack([np.interp(atoms.times_s, t_grid, disp[:, 0]), np.interp(atoms.times_s, t_grid, disp[:, 1])], axis=1)
        return pos + d

    def _process(self, frame: Frame, atoms: Atoms, drift: Any) -> dict[str, np.ndarray]:
        check_image(frame.image)
        n = len(atoms)
        s = self.model.spec
        pos = self.beam_positions_A(atoms, drift)
        if not np.all(np.isfinite(pos)):
            bad = int(np.flatnonzero(~np.all(np.isfinite(pos), axis=1))[0])
            raise InputError(f"atoms.positions_A[{bad}]", pos[bad].tolist(), "must be finite")
        geo = frame.geometry
        rows, cols = frame.image.shape
        # the patch's half-diagonal in frame pixels: the whole patch inside the frame
        half_px = (s.patch_px - 1) / 2.0 * self.pixel_A * math.sqrt(2.0) / min(geo.pixel_size_A)
        rc = geo.sample_to_pixel(pos) if n else np.zeros((0, 2))
        inside = (rc[:, 0] >= half_px) & (rc[:, 0] <= rows - 1 - half_px) & (rc[:, 1] >= half_px) & (rc[:, 1] <= cols - 1 - half_px)
        angle = np.full(n, np.nan)
        shift = np.full((n, 2), np.nan)
        z = np.full((n, s.latent_dim), np.nan)
        idx = np.flatnonzero(inside)
        if len(idx):
            image = normalize_frame(frame.image)
            patches = sample_patches(image, geo, pos[idx], s.patch_px, self.pixel_A)
            with torch.no_grad():
                lat = self.model.encode(torch.from_numpy(patches)).to_numpy()
            angle[idx] = lat["angle_rad"]
            shift[idx] = lat["shift_px"]
            z[idx] = lat["z"]
        return {"rvae_encoded": inside, "rvae_angle_rad": angle, "rvae_shift_px": shift, "rvae_z": z}
