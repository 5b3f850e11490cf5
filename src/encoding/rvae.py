# mypy: disable-error-code="operator,arg-type,assignment,index"
# (registered buffers read back as "Tensor | Module" under torch's stubs; the merge landed before they were annotated)
"""A rotationally invariant variational autoencoder (rVAE) over atom-centred patches.

The encoder maps a ``P x P`` patch to a posterior over an in-plane angle ``angle_rad``, a shift
``shift_px`` (the atom's offset from the patch centre, pixels, (x, y) = (col, row)) and ``k``
content latents ``z``; the decoder renders the patch on the pixel grid rotated by the angle and
shifted by the shift, with ``z`` as the only other input. Orientation and position therefore sit in
their own latents and the content latents say *what* the neighbourhood is, not how it is turned.

How the encoder finds the angle: the patch is projected on angular harmonics ``m = 0..M`` of a
few rings (one fixed linear map, :func:`harmonic_basis`); rotating the patch by ``phi`` multiplies
harmonic ``m`` by ``exp(-i m phi)``. The angle is the phase of a learned complex combination of the
``m = fold`` harmonics over the rings, divided by ``fold`` (so it is defined modulo
``2 pi / fold``: the lattice's symmetry, 3 for a graphene site); the shift is a learned complex
combination of the ``m = 1`` harmonics (it turns with the patch). The content latents come from a
small MLP on rotation invariants: the moduli of every harmonic and the ``m = fold, 2 fold``
harmonics turned back by the angle. A rotated patch therefore gets the same content latents and an
angle that differs by the rotation, by construction rather than only by training.

Loss (per patch, summed over pixels): reconstruction (``gaussian``: squared error over
``2 noise_sigma**2``; ``bernoulli``: binary cross-entropy on class-probability patches) + KL of the
content posterior to N(0, 1) + ``angle_weight`` x KL of the angle posterior to
N(0, ``angle_prior_rad**2``) + KL of the shift posterior to N(0, ``shift_prior_px**2``).

Public entry points: :class:`RVAE` (``encode(patches) -> Latents``, ``decode(latents) -> patches``,
``loss``), :func:`save_rvae` / :func:`load_rvae` (a state dict plus a JSON header; nothing is
unpickled). Shapes: patches ``(N, P, P)`` float32; latents ``(N,)``, ``(N, 2)``, ``(N, k)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stemagent.errors import InputError

FORMAT = "stemagent-rvae/1"
#: the shipped weights (``stemagent/weights``), trained by ``stemagent train-rvae --config configs/train-rvae.yaml``
DEFAULT_WEIGHTS = "rvae_graphene.pt"
#: pixels decoded per chunk in :meth:`RVAE.decode` (hidden activations of ~2 MB at 64 units)
DECODE_CHUNK_PX = 8192
#: patches encoded per chunk in :meth:`RVAE.encode`
ENCODE_CHUNK = 4096


def default_rvae_weights() -> Path:
    """The shipped weights: ``stemagent/weights/rvae_graphene.pt`` (with ``.json`` and ``.md`` cards)."""
    return Path(str(resources.files("stemagent") / "weights" / DEFAULT_WEIGHTS))


@dataclass(frozen=True)
class RVAESpec:
    """What fixes an rVAE's shape (saved with its weights, checked on load)."""

    patch_px: int = 16
    latent_dim: int = 2
    fold: int = 3
    harmonics: int = 6
    rings: int = 7
    hidden: int = 64
    decoder_hidden: int = 64
    likelihood: Literal["gaussian", "bernoulli"] = "gaussian"
    noise_sigma: float = 0.3
    angle_prior_rad: float = 1.8
    angle_weight: float = 1.0
    shift_prior_px: float = 1.0

    def check(self) -> None:
        if not (4 <= self.patch_px <= 128):
            raise InputError("patch_px", self.patch_px, "must be between 4 and 128")
        if not (1 <= self.latent_dim <= 64):
            raise InputError("latent_dim", self.latent_dim, "must be between 1 and 64")
        if not (1 <= self.fold <= self.harmonics):
            raise InputError("fold", self.fold, f"must be between 1 and harmonics ({self.harmonics})")
        if self.likelihood not in ("gaussian", "bernoulli"):
            raise InputError("likelihood", self.likelihood, "must be 'gaussian' or 'bernoulli'")
        for name in ("noise_sigma", "angle_prior_rad", "shift_prior_px"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise InputError(name, v, "must be positive")


@dataclass
class Latents:
    """Posterior of a batch: means and log-variances. ``angle_rad`` ``(N,)`` in
    ``[-pi / fold, pi / fold)`` (counter-clockwise in the patch's (x = col, y = row) axes),
    ``shift_px`` ``(N, 2)`` (x, y), ``z`` ``(N, k)``; the ``*_logvar`` fields have the same shapes."""

    angle_rad: torch.Tensor
    shift_px: torch.Tensor
    z: torch.Tensor
    angle_logvar: torch.Tensor | None = None
    shift_logvar: torch.Tensor | None = None
    z_logvar: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.z.shape[0])

    def to_numpy(self) -> dict[str, np.ndarray]:
        out = {"angle_rad": self.angle_rad, "shift_px": self.shift_px, "z": self.z}
        return {k: v.detach().cpu().numpy() for k, v in out.items()}


def pixel_grid(patch_px: int) -> torch.Tensor:
    """``(P*P, 2)`` (x, y) of every pixel relative to the patch centre, row-major."""
    c = (patch_px - 1) / 2.0
    r, q = torch.meshgrid(torch.arange(patch_px, dtype=torch.float32), torch.arange(patch_px, dtype=torch.float32), indexing="ij")
    return torch.stack([(q - c).reshape(-1), (r - c).reshape(-1)], dim=1)


def harmonic_basis(patch_px: int, rings: int, harmonics: int, samples: int = 64) -> torch.Tensor:
    """Complex map ``(P*P, rings * (harmonics + 1))``: patch -> angular harmonic ``m`` on ring ``j``
    (column ``j * (M + 1) + m``), ``c_m = mean_theta f(r_j, theta) exp(-i m theta)`` with ``f``
    interpolated bilinearly. Rings span the inscribed disk, so corners never enter."""
    c = (patch_px - 1) / 2.0
    radii = (np.arange(rings) + 0.5) * (c / rings)
    theta = np.arange(samples) * (2 * np.pi / samples)
    basis = np.zeros((patch_px * patch_px, rings * (harmonics + 1)), dtype=np.complex128)
    for j, rad in enumerate(radii):
        x = c + rad * np.cos(theta)
        y = c + rad * np.sin(theta)
        x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
        fx, fy = x - x0, y - y0
        for dy, dx, w in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
            idx = (y0 + dy) * patch_px + (x0 + dx)
            for m in range(harmonics + 1):
                np.add.at(basis[:, j * (harmonics + 1) + m], idx, w * np.exp(-1j * m * theta) / samples)
    return torch.from_numpy(basis.astype(np.complex64))


def _check_patches(patches: torch.Tensor, patch_px: int) -> torch.Tensor:
    if not isinstance(patches, torch.Tensor):
        patches = torch.as_tensor(np.asarray(patches), dtype=torch.float32)
    if patches.ndim != 3 or tuple(patches.shape[1:]) != (patch_px, patch_px):
        raise InputError("patches.shape", tuple(patches.shape), f"must be (N, {patch_px}, {patch_px}) for this model")
    if not bool(torch.isfinite(patches.sum())):  # one pass: a NaN or an inf anywhere (or values near float32's limit) makes it non-finite
        raise InputError("patches", "non-finite values", "must be finite")
    return patches.to(torch.float32)


class RVAE(nn.Module):
    """See the module docstring. ``spec`` fixes the shapes and the loss."""

    def __init__(self, spec: RVAESpec | None = None) -> None:
        super().__init__()
        self.spec = s = spec or RVAESpec()
        s.check()
        m1 = s.harmonics + 1
        basis = harmonic_basis(s.patch_px, s.rings, s.harmonics)
        # real matrix: patch -> [Re c, Im c] for every (ring, m)
        self.register_buffer("basis", torch.cat([basis.real, basis.imag], dim=1).contiguous())
        self.register_buffer("grid", pixel_grid(s.patch_px))
        self._coord_scale = 2.0 / s.patch_px  # decoder coordinates in about [-1, 1]
        n_inv = s.rings * m1 + 2 * s.rings * s.harmonics
        self.n_invariants = n_inv
        self.angle_weights = nn.Parameter(torch.ones(s.rings, 2) * torch.tensor([1.0, 0.0]))
        self.shift_weights = nn.Parameter(torch.zeros(s.rings, 2))
        self.encoder = nn.Sequential(nn.Linear(n_inv, s.hidden), nn.SiLU(), nn.Linear(s.hidden, 2 * s.latent_dim + 3))
        self.register_buffer("inv_scale", torch.ones(n_inv))
        dh = s.decoder_hidden
        self.dec_xy = nn.Linear(2, dh)
        self.dec_z = nn.Linear(s.latent_dim, dh, bias=False)
        self.decoder = nn.Sequential(nn.SiLU(), nn.Linear(dh, dh), nn.SiLU(), nn.Linear(dh, 1))

    # --- encoder ---------------------------------------------------------------------------
    def _harmonics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        h = x.reshape(x.shape[0], -1) @ self.basis
        half = h.shape[1] // 2
        shape = (x.shape[0], s.rings, s.harmonics + 1)
        return h[:, :half].reshape(shape), h[:, half:].reshape(shape)

    def _encode_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = self.spec
        re, im = self._harmonics(x)
        wa, ws = self.angle_weights, self.shift_weights
        # angle: phase of sum_j w_j c_fold(r_j); c_m of a patch rotated by phi is c_m exp(-i m phi)
        a_re = (wa[:, 0] * re[:, :, s.fold] - wa[:, 1] * im[:, :, s.fold]).sum(1)
        a_im = (wa[:, 0] * im[:, :, s.fold] + wa[:, 1] * re[:, :, s.fold]).sum(1)
        angle = -torch.atan2(a_im, a_re) / s.fold
        if s.fold > 1:  # resolve the branch by the m = 1 harmonic (the side an asymmetric neighbourhood leans to)
            b_re, b_im = re[:, :, 1].sum(1), im[:, :, 1].sum(1)
            k = torch.arange(s.fold, device=x.device, dtype=x.dtype) * (2 * math.pi / s.fold)
            cand = angle[:, None] + k[None, :]
            score = b_re[:, None] * torch.cos(cand) - b_im[:, None] * torch.sin(cand)
            angle = angle + k[score.argmax(1)]
            angle = torch.remainder(angle + math.pi, 2 * math.pi) - math.pi
        sh_re = (ws[:, 0] * re[:, :, 1] - ws[:, 1] * im[:, :, 1]).sum(1)
        sh_im = (ws[:, 0] * im[:, :, 1] + ws[:, 1] * re[:, :, 1]).sum(1)
        shift = torch.stack([sh_re, -sh_im], dim=1)
        n = x.shape[0]
        mod = torch.sqrt(re * re + im * im + 1e-8).reshape(n, -1)
        # turn back every m >= 1 at once: c_m exp(i m angle); features ordered (m, re/im, ring)
        ma = angle[:, None, None] * torch.arange(1, s.harmonics + 1, device=x.device, dtype=x.dtype)[None, None, :]
        c, sn = torch.cos(ma), torch.sin(ma)
        rr, ii = re[:, :, 1:], im[:, :, 1:]
        turned = torch.stack([rr * c - ii * sn, rr * sn + ii * c], dim=1)  # (N, 2, rings, M)
        inv = torch.cat([mod, turned.permute(0, 3, 1, 2).reshape(n, -1)], dim=1) / self.inv_scale
        out = self.encoder(inv)
        k = s.latent_dim
        z, z_logvar = out[:, :k], out[:, k:2 * k].clamp(-12, 6)
        angle_logvar, shift_logvar = out[:, 2 * k].clamp(-14, 4), out[:, 2 * k + 1:].clamp(-12, 4).expand(-1, 2)
        return angle, angle_logvar, shift, shift_logvar, z, z_logvar

    def encode(self, patches: torch.Tensor | np.ndarray) -> Latents:
        """Posterior means and log-variances of ``patches`` ``(N, P, P)``, computed under
        ``torch.inference_mode`` (no gradients; training goes through :meth:`loss`)."""
        x = _check_patches(patches, self.spec.patch_px).to(self.basis.device)
        with torch.inference_mode():  # no autograd bookkeeping: training goes through loss()
            if len(x) <= ENCODE_CHUNK:
                a, alv, sh, shlv, z, zlv = self._encode_raw(x)
            else:  # in chunks that stay in the CPU's cache, then joined
                parts = [self._encode_raw(x[i:i + ENCODE_CHUNK]) for i in range(0, len(x), ENCODE_CHUNK)]
                a, alv, sh, shlv, z, zlv = (torch.cat(t) for t in zip(*parts, strict=True))
        return Latents(a, sh, z, alv, shlv, zlv)

    # --- decoder ---------------------------------------------------------------------------
    def decode_logits(self, angle: torch.Tensor, shift: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``(N, P, P)`` decoder output before the likelihood's link (identity for gaussian)."""
        s = self.spec
        c, sn = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
        gx = self.grid[None, :, 0] - shift[:, 0:1]
        gy = self.grid[None, :, 1] - shift[:, 1:2]
        # canonical coordinates: rotate the grid back by the angle
        u = c * gx + sn * gy
        v = -sn * gx + c * gy
        h = self.dec_xy(torch.stack([u, v], dim=2) * self._coord_scale) + self.dec_z(z)[:, None, :]
        return self.decoder(h).reshape(-1, s.patch_px, s.patch_px)

    def decode(self, latents: Latents) -> torch.Tensor:
        """Patches ``(N, P, P)`` rendered from latent means (probabilities for a bernoulli model)."""
        k = self.spec.latent_dim
        if latents.z.ndim != 2 or latents.z.shape[1] != k:
            raise InputError("latents.z.shape", tuple(latents.z.shape), f"must be (N, {k}) for this model")
        n = latents.z.shape[0]
        if tuple(latents.angle_rad.shape) != (n,) or tuple(latents.shift_px.shape) != (n, 2):
            raise InputError("latents.angle_rad/shift_px.shape", (tuple(latents.angle_rad.shape), tuple(latents.shift_px.shape)),
                             f"must be ({n},) and ({n}, 2)")
        dev = self.basis.device
        a, sh, z = latents.angle_rad.to(dev), latents.shift_px.to(dev), latents.z.to(dev)
        p = self.spec.patch_px
        with torch.inference_mode():
            out = self._decode_inference(a.to(torch.float32), sh.to(torch.float32), z.to(torch.float32)).reshape(n, p, p)
            return torch.sigmoid_(out) if self.spec.likelihood == "bernoulli" else out

    def _decode_inference(self, angle: torch.Tensor, shift: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """:meth:`decode_logits` without autograd, ``(N, P*P)``: the same numbers to float rounding.

        The first layer is affine in the pixel coordinates, so the turn and the shift fold into a
        per-patch ``(2, hidden)`` weight and bias (``scale * W R(angle)`` and ``b + W_z z - shift``'s
        image): one multiply-add per pixel and unit instead of a turned grid, a stack and a
        two-input matmul. Pixels go through in chunks of :data:`DECODE_CHUNK_PX` so the hidden
        activations stay in the CPU's cache; the activations are written in place into two buffers
        reused by every chunk, and the output layer writes straight into the result."""
        n, pp = z.shape[0], self.spec.patch_px ** 2
        w = self.dec_xy.weight * self._coord_scale  # (dh, 2)
        c, sn = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
        # u = c gx + sn gy, v = -sn gx + c gy (grid turned back by the angle, after the shift)
        ax = c * w[:, 0] - sn * w[:, 1]  # (N, dh): weight of gx
        ay = sn * w[:, 0] + c * w[:, 1]  # (N, dh): weight of gy
        b0 = self.dec_z(z) + self.dec_xy.bias - shift[:, 0:1] * ax - shift[:, 1:2] * ay
        gx, gy = self.grid[None, :, 0, None], self.grid[None, :, 1, None]  # (1, P*P, 1)
        lin2, lin3 = self.decoder[1], self.decoder[3]
        dh = ax.shape[1]
        step = max(1, DECODE_CHUNK_PX // pp)
        out = torch.empty((n, pp), dtype=torch.float32, device=z.device)
        h1 = torch.empty((min(step, n), pp, dh), dtype=torch.float32, device=z.device)
        h2 = torch.empty((min(step, n) * pp, dh), dtype=torch.float32, device=z.device)
        for i in range(0, n, step):
            k = min(step, n - i)
            a1, a2 = h1[:k], h2[:k * pp]
            torch.mul(gx, ax[i:i + k, None, :], out=a1)
            a1.add_(b0[i:i + k, None, :]).addcmul_(gy, ay[i:i + k, None, :])
            F.silu(a1, inplace=True)
            torch.addmm(lin2.bias, a1.view(k * pp, dh), lin2.weight.t(), out=a2)
            F.silu(a2, inplace=True)
            torch.addmv(lin3.bias, a2, lin3.weight[0], out=out[i:i + k].view(-1))
        return out

    # --- training --------------------------------------------------------------------------
    def loss(self, patches: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Negative ELBO per patch (mean over the batch) and its terms."""
        s = self.spec
        x = _check_patches(patches, s.patch_px)
        a, alv, sh, shlv, z, zlv = self._encode_raw(x)

        def sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            return mu + eps * torch.exp(0.5 * logvar)

        out = self.decode_logits(sample(a, alv), sample(sh, shlv), sample(z, zlv))
        if s.likelihood == "bernoulli":
            rec = F.binary_cross_entropy_with_logits(out, x, reduction="none").sum((1, 2))
        else:
            rec = ((out - x) ** 2).sum((1, 2)) / (2 * s.noise_sigma ** 2)
        kl_z = 0.5 * (z * z + zlv.exp() - 1 - zlv).sum(1)
        pa = s.angle_prior_rad ** 2
        kl_a = 0.5 * (a * a / pa + alv.exp() / pa - 1 - alv + math.log(pa))
        ps = s.shift_prior_px ** 2
        kl_s = 0.5 * (sh * sh / ps + shlv.exp() / ps - 1 - shlv + math.log(ps)).sum(1)
        total = (rec + kl_z + s.angle_weight * kl_a + kl_s).mean()
        terms = {k: float(v.detach().mean()) for k, v in (("recon", rec), ("kl_z", kl_z), ("kl_angle", kl_a), ("kl_shift", kl_s))}
        return total, terms

    @torch.no_grad()
    def fit_invariant_scale(self, patches: torch.Tensor) -> None:
        """Set the invariants' scale from a sample of patches (before training)."""
        x = _check_patches(patches, self.spec.patch_px).to(self.basis.device)
        self.inv_scale.fill_(1.0)
        re, im = self._harmonics(x)
        mod = torch.sqrt(re * re + im * im).reshape(x.shape[0], -1)
        scale = mod.std(0).mean().clamp_min(1e-6)
        self.inv_scale.fill_(float(scale))


def wrap_angle(angle_rad: np.ndarray | float, fold: int) -> np.ndarray:
    """Angle(s) wrapped into ``[-pi / fold, pi / fold)``."""
    period = 2 * np.pi / fold
    return (np.asarray(angle_rad, dtype=np.float64) + period / 2) % period - period / 2


def save_rvae(model: RVAE, path: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Write ``path`` (``.pt``: a plain state dict) and ``path.json`` (format, spec, card)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, p)
    header = {"format": FORMAT, "spec": model.spec.__dict__, **(card or {})}
    p.with_suffix(".json").write_text(json.dumps(header, indent=2, default=str), encoding="utf-8")
    return p


def load_rvae(path: str | Path, device: str | torch.device | None = None, patch_px: int | None = None) -> RVAE:
    """Load weights written by :func:`save_rvae`. ``patch_px``: the patch size the caller will
    feed; a model of another size is an :class:`InputError`, as are weights that do not fit the
    header's spec (``weights_only`` load: nothing is unpickled)."""
    p = Path(path)
    head_path = p.with_suffix(".json")
    if not p.is_file():
        raise InputError("rvae.weights", str(p), "no such file")
    if not head_path.is_file():
        raise InputError("rvae.weights", str(head_path), "the model's JSON header is missing")
    head = json.loads(head_path.read_text(encoding="utf-8"))
    if head.get("format") != FORMAT:
        raise InputError(f"{head_path.name}.format", head.get("format"), f"must be {FORMAT!r}")
    try:
        spec = RVAESpec(**head["spec"])
    except TypeError as exc:
        raise InputError(f"{head_path.name}.spec", head.get("spec"), f"is not an rVAE spec ({exc})") from None
    if patch_px is not None and spec.patch_px != patch_px:
        raise InputError("patch_px", patch_px, f"the model at {p.name} was trained on {spec.patch_px} px patches")
    model = RVAE(spec)
    state = torch.load(p, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise InputError("rvae.weights", str(p), f"do not fit the spec in {head_path.name}: {' '.join(first[:3])[:300]}") from None
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(dev).eval()
