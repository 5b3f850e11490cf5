"""From probability maps to atoms: peak finding, then sub-pixel refinement on the raw frame.

Everything here is torch on the tensors' own device: on a GPU the network's output never leaves
it until the final ``(N, ...)`` atom arrays are read back.

1. :func:`find_peaks`: non-maximum suppression by max-pooling the atom *logit*
   ``logsumexp(class logits) - background logit`` (it does not saturate the way a probability
   does, so flat-topped peaks do not split), a probability threshold, the class from the
   3x3-averaged class probabilities, and a 3x3 centroid for a sub-pixel start.
2. :func:`refine_gaussians`: a joint Poisson maximum-likelihood fit of a 2D Gaussian per atom
   (row, col, amplitude, width, constant background under its window), by Fisher scoring.
   All atoms of a batch are fitted at once: the model image is the sum of every atom's window
   (scatter-add), so each atom's update sees its neighbours' tails instead of being pulled by
   them. The per-atom 4x4 Fisher matrices are solved in one batched call; their inverse gives
   the per-atom position uncertainty. Exact on noiseless Gaussians.
3. :func:`aperture_counts`: the raw counts in a disk around every site (fitted or not, e.g. an
   empty site), with what the fitted model of all *other* atoms plus the background predicts
   there and the share of the site's own image the disk captures: the inputs of a Poisson
   composition model of each site (:mod:`~stemagent.segmentation.intensity`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class Peaks:
    """Peaks of a batch of probability maps (all tensors on the maps' device).

    ``batch`` ``(N,)`` which image; ``rc`` ``(N, 2)`` fractional (row, col) on the map grid;
    ``classes`` ``(N,)`` atom class index (0-based, background excluded); ``confidence`` ``(N,)``
    the 3x3-averaged probability of that class; ``class_probs`` ``(N, C)`` the 3x3-averaged
    probability of every atom class (``P(atom) P(class | atom)``; ``confidence`` is its maximum).
    """

    batch: torch.Tensor
    rc: torch.Tensor
    classes: torch.Tensor
    confidence: torch.Tensor
    class_probs: torch.Tensor

    def __len__(self) -> int:
        return int(self.batch.shape[0])


def find_peaks(
    logits: torch.Tensor,
    threshold: float = 0.5,
    min_separation_px: int = 2,
    valid_shape: tuple[int, int] | None = None,
    class_bias: torch.Tensor | None = None,
) -> Peaks:
    """Peaks of ``logits`` ``(B, C + 1, H, W)`` (channel 0 background).

    A pixel is a peak when its atom logit is the maximum of its ``(2 s + 1)^2`` neighbourhood
    (``s = min_separation_px``) and its atom probability exceeds ``threshold``. Only the top-left
    ``valid_shape`` region is searched (the rest is padding). ``class_bias`` ``(C,)`` is
    subtracted from the class logits before the class is chosen, e.g. ``log w_k`` to undo the
    class weights of a weighted cross-entropy (which inflate the odds of class ``k`` by ``w_k``).
    """
    logits = logits.float()
    b, _, h, w = logits.shape
    atom_logit = torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]  # (B, H, W)
    k = 2 * int(min_separation_px) + 1
    # separable k x k max-pool (two 1-D passes: same result, about half the cost on CPU)
    pooled = F.max_pool2d(atom_logit[:, None], (k, 1), stride=1, padding=(k // 2, 0))
    pooled = F.max_pool2d(pooled, (1, k), stride=1, padding=(0, k // 2))[:, 0]
    thr = float(torch.logit(torch.tensor(min(max(threshold, 1e-6), 1 - 1e-6))))
    is_peak = (atom_logit >= pooled) & (atom_logit > thr)
    if valid_shape is not None:
        vh, vw = valid_shape
        is_peak[:, vh:, :] = False
        is_peak[:, :, vw:] = False
    idx = torch.nonzero(is_peak)  # (N, 3) b, r, c
    bi, ri, ci = idx[:, 0], idx[:, 1], idx[:, 2]
    # class probabilities only in the 3x3 window of each peak (not over the whole map)
    padded = F.pad(logits, (1, 1, 1, 1), mode="replicate")
    offs = torch.arange(-1, 2, device=logits.device)
    rr = ri[:, None, None] + 1 + offs[None, :, None]
    cc = ci[:, None, None] + 1 + offs[None, None, :]
    win = padded[bi[:, None, None], :, rr, cc]  # (N, 3, 3, C + 1)
    probs = torch.softmax(win, dim=-1)
    cls_logits = win[..., 1:] if class_bias is None else win[..., 1:] - class_bias.to(win.dtype)
    at = torch.softmax(cls_logits, dim=-1) * (1.0 - probs[..., :1])  # P(atom) x P(class | atom)
    at = at.mean(dim=(1, 2))  # (N, C)
    conf, cls = at.max(dim=1)
    # 3x3 centroid of the atom probability for a sub-pixel start
    atom_p = 1.0 - probs[..., 0]  # (N, 3, 3)
    tot = atom_p.sum(dim=(1, 2)).clamp_min(1e-12)
    dr = (atom_p * offs[None, :, None]).sum(dim=(1, 2)) / tot
    dc = (atom_p * offs[None, None, :]).sum(dim=(1, 2)) / tot
    rc = torch.stack([ri.float() + dr, ci.float() + dc], dim=1)
    return Peaks(batch=bi, rc=rc, classes=cls, confidence=conf, class_probs=at)


@dataclass
class GaussianFit:
    """Result of :func:`refine_gaussians` (tensors on the images' device).

    ``rc`` ``(N, 2)`` refined (row, col) px; ``sigma_rc`` ``(N, 2)`` 1-sigma uncertainty of
    ``rc`` from the inverse Fisher information (px, counts assumed Poisson); ``amplitude``
    ``(N,)`` peak height; ``width_px`` ``(N,)`` Gaussian sigma; ``background`` ``(N,)`` the
    constant under each atom's window;
    ``ok`` ``(N,)`` False where the fit was rejected and ``rc`` is the starting point.
    """

    rc: torch.Tensor
    sigma_rc: torch.Tensor
    amplitude: torch.Tensor
    width_px: torch.Tensor
    background: torch.Tensor
    ok: torch.Tensor


def refine_gaussians(
    images: torch.Tensor,
    batch: torch.Tensor,
    rc0: torch.Tensor,
    width0_px: float,
    *,
    iterations: int = 6,
    radius_px: int | None = None,
    max_shift_px: float | None = None,
    fit_width_min_counts: float = 30.0,
    fit_mask: torch.Tensor | None = None,
    prior_sigma_px: float | None = None,
    model_radius_px: int | None = None,
) -> GaussianFit:
    """Joint Poisson ML fit of one Gaussian per atom plus a local constant background per atom.

    ``images`` ``(B, H, W)`` float (counts; an offset is absorbed by the backgrounds). Each atom's
    window sees the model ``sum_k A_k g_k + b_j``: all atoms' Gaussians plus its own background;
    ``batch`` ``(N,)`` image of each atom; ``rc0`` ``(N, 2)`` start (row, col) px;
    ``width0_px`` starting Gaussian sigma in px. ``radius_px``: half-size of each atom's fit
    window (default ``ceil(3.5 width0_px)``); ``model_radius_px``: half-size of the window each
    atom's Gaussian is drawn in for the model its neighbours' windows see (default and at least
    ``max(radius_px, ceil(3.5 width0_px))``), so a small fit window still sees the whole tails of
    the atoms around it. Widths are fitted only for atoms with more than
    ``fit_width_min_counts`` counts (else held at their start). Atoms with ``fit_mask`` False
    (e.g. empty sites) contribute nothing and keep ``rc0``. A fit that moves an atom by more
    than ``max_shift_px`` (default ``2 width0_px``) or ends with no signal is rejected.
    ``prior_sigma_px``: a Gaussian prior on each position centred on ``rc0`` (the detector's own
    estimate, e.g. from lattice context) with this width; the fit is then maximum a posteriori.
    It matters only where the data are weaker than the prior (a few counts per atom); where the
    counts are high, the likelihood dominates and the estimate is the ML one. Widths and local
    backgrounds are fitted only above ``fit_width_min_counts`` counts.
    """
    dev = images.device
    imgs = images.float()
    nb, h, w = imgs.shape
    n = int(rc0.shape[0])
    rad = int(radius_px if radius_px is not None else max(2, math.ceil(3.5 * width0_px)))
    max_shift = float(max_shift_px if max_shift_px is not None else 2.0 * width0_px)
    use = torch.ones(n, dtype=torch.bool, device=dev) if fit_mask is None else fit_mask.to(dev)
    if n == 0:
        z = torch.zeros(0, device=dev)
        return GaussianFit(rc0.float(), torch.zeros(0, 2, device=dev), z, z, torch.zeros(nb, device=dev), torch.zeros(0, dtype=torch.bool, device=dev))

    # integer window anchors (fixed during the fit so windows do not jump); each atom's image is
    # drawn into the model over the wider window (rad_m), the fit sees the central (2 rad + 1)^2
    rad_m = max(rad, int(model_radius_px if model_radius_px is not None else math.ceil(3.5 * width0_px)))
    o, size = rad_m - rad, 2 * rad + 1
    flat_m, _, wr, wc = _windows(rc0.float(), batch, (h, w), rad_m)
    flat = flat_m[:, o : o + size, o : o + size].reshape(-1)  # index_select: ~3x faster than [flat] on a CPU
    flat_m = flat_m.reshape(-1)
    data = imgs.reshape(-1).index_select(0, flat).reshape(n, size, size)  # (N, S, S)
    prow_m = wr[:, :, 0].float()  # (N, S_m) pixel row of each model-window row
    pcol_m = wc[:, 0, :].float()  # (N, S_m) pixel column of each model-window column
    # "inside the frame" is separable: rows (times the atom's fit mask) and columns
    row_in = ((wr[:, :, 0] >= 0) & (wr[:, :, 0] < h)).float() * use[:, None].float()  # (N, S_m)
    col_in = ((wc[:, 0, :] >= 0) & (wc[:, 0, :] < w)).float()
    inside = row_in[:, o : o + size, None] * col_in[:, None, o : o + size]  # (N, S, S)
    fields = torch.empty(n, 3, size, size, device=dev)  # per step: contrib^2 / mu, contrib / mu, contrib * residual / mu

    # starting values
    sub = imgs.reshape(nb, -1)[:, :: max(1, (h * w) // 65536)]
    bkg = torch.kthvalue(sub, max(1, int(0.05 * sub.shape[1])), dim=1).values.clamp_min(0.0)  # (B,)
    rc = rc0.float().clone()
    centre = data[:, rad, rad]
    amp = (centre - bkg[batch]).clamp_min(1e-3 * (imgs.mean() + 1e-6))
    wid = torch.full((n,), float(width0_px), device=dev)
    floor = 1e-4 * imgs.mean().clamp_min(1e-6) + 1e-8  # a tensor: no device sync
    loc = bkg[batch].clone()  # local background of each atom's window
    rc0f = rc0.float()
    prior_prec = 0.0 if prior_sigma_px is None else 1.0 / float(prior_sigma_px) ** 2
    prior_eye = torch.diag(torch.tensor([prior_prec, prior_prec, 0.0, 0.0, 0.0], device=dev))
    eye = torch.eye(5, device=dev)
    fisher = eye.expand(n, 5, 5)

    def moments(fields: torch.Tensor, dr: torch.Tensor, dc: torch.Tensor) -> torch.Tensor:
        """``sum_p f(p) dr^a dc^b`` for a, b in 0..4: ``(N, K, S, S) -> (N, K, 5, 5)``.

        The window is a grid, so ``dr`` depends on the row and ``dc`` on the column only and
        the moments are two batched matrix products (columns first, then rows: one call each).
        """
        k, s = fields.shape[1], fields.shape[2]
        r2, c2 = dr * dr, dc * dc
        rp = torch.stack([torch.ones_like(dr), dr, r2, r2 * dr, r2 * r2], dim=1)  # (N, 5, S)
        cp = torch.stack([torch.ones_like(dc), dc, c2, c2 * dc, c2 * c2], dim=2)  # (N, S, 5)
        cols = torch.bmm(fields.reshape(n, k * s, s), cp)  # (N, K S, 5)
        cols = cols.reshape(n, k, s, 5).transpose(1, 2).reshape(n, s, k * 5)
        return torch.bmm(rp, cols).reshape(n, 5, k, 5).transpose(1, 2)

    for _ in range(iterations):
        dr_m = prow_m - rc[:, 0, None]  # (N, S_m)
        dc_m = pcol_m - rc[:, 1, None]
        s2 = wid * wid
        # this atom's image over its model window, amp g_row g_col, zero outside the frame (one pass)
        g_row = torch.exp(-0.5 * dr_m * dr_m / s2[:, None]) * (amp[:, None] * row_in)
        g_col = torch.exp(-0.5 * dc_m * dc_m / s2[:, None]) * col_in
        contrib_m = g_row[:, :, None] * g_col[:, None, :]  # (N, S_m, S_m)
        canvas = torch.zeros(nb * h * w, device=dev)
        canvas.index_add_(0, flat_m, contrib_m.reshape(-1))
        contrib = contrib_m[:, o : o + size, o : o + size]  # (N, S, S): in its fit window
        dr, dc = dr_m[:, o : o + size], dc_m[:, o : o + size]
        m = (canvas.index_select(0, flat).reshape(n, size, size) + loc[:, None, None]).clamp_min_(floor)
        wgt = inside / m  # Poisson weights 1 / mu
        e = (data - m).mul_(wgt)
        # Jacobian of this atom's window: contrib * f_k with f = (dr/s2, dc/s2, 1, d2/s2), and 1 for
        # the background. Fisher and score follow from weighted moments of dr, dc.
        torch.mul(contrib, wgt, out=fields[:, 1])
        torch.mul(contrib, fields[:, 1], out=fields[:, 0])
        torch.mul(contrib, e, out=fields[:, 2])
        mom = moments(fields, dr, dc)  # (N, 3, 5, 5)
        q, v, u = mom[:, 0], mom[:, 1], mom[:, 2]
        i2 = 1.0 / s2
        i4 = i2 * i2
        # the 5 x 5 Fisher matrix of (row, col, log amplitude, log width, background), one stack
        f00, f01, f02 = q[:, 2, 0] * i4, q[:, 1, 1] * i4, q[:, 1, 0] * i2
        f03, f04 = (q[:, 3, 0] + q[:, 1, 2]) * i4, v[:, 1, 0] * i2
        f11, f12 = q[:, 0, 2] * i4, q[:, 0, 1] * i2
        f13, f14 = (q[:, 2, 1] + q[:, 0, 3]) * i4, v[:, 0, 1] * i2
        f22, f23, f24 = q[:, 0, 0], (q[:, 2, 0] + q[:, 0, 2]) * i2, v[:, 0, 0]
        f33, f34 = (q[:, 4, 0] + 2.0 * q[:, 2, 2] + q[:, 0, 4]) * i4, (v[:, 2, 0] + v[:, 0, 2]) * i2
        f44 = wgt.sum(dim=(1, 2))
        fisher = torch.stack([f00, f01, f02, f03, f04,
                              f01, f11, f12, f13, f14,
                              f02, f12, f22, f23, f24,
                              f03, f13, f23, f33, f34,
                              f04, f14, f24, f34, f44], dim=1).reshape(n, 5, 5)
        grad = torch.stack([u[:, 1, 0] * i2, u[:, 0, 1] * i2, u[:, 0, 0], (u[:, 2, 0] + u[:, 0, 2]) * i2, e.sum(dim=(1, 2))], dim=1)
        if prior_prec > 0:
            grad[:, :2] += prior_prec * (rc0f - rc)
            fisher = fisher + prior_eye
        counts = amp * 2.0 * torch.pi * wid * wid
        fit_w = (counts > fit_width_min_counts).float()
        # hold width and background where they are not fitted: zero row/column, unit diagonal
        one = torch.ones_like(fit_w)
        mask = torch.stack([one, one, one, fit_w, fit_w], dim=1)
        fisher = fisher * mask[:, :, None] * mask[:, None, :] + torch.diag_embed(1.0 - mask)
        grad = grad * mask
        damp = fisher + 1e-3 * torch.diag_embed(torch.diagonal(fisher, dim1=1, dim2=2)) + 1e-9 * eye
        step = torch.linalg.solve(damp, grad[:, :, None])[:, :, 0]
        step_rc = step[:, :2]
        norm = step_rc.norm(dim=1, keepdim=True).clamp_min(1e-12)
        step_rc = step_rc * torch.clamp(0.5 * width0_px / norm, max=1.0)
        rc = rc + step_rc * use[:, None].float()
        amp = amp * torch.exp(step[:, 2].clamp(-1.0, 1.0))
        wid = (wid * torch.exp(step[:, 3].clamp(-0.3, 0.3))).clamp(0.4 * width0_px, 2.5 * width0_px)
        loc = (loc + step[:, 4]).clamp_min(0.0)

    cov = torch.linalg.inv(fisher + 1e-9 * eye)
    sig_rc = torch.sqrt(torch.diagonal(cov, dim1=1, dim2=2)[:, :2].clamp_min(0.0))
    shift = (rc - rc0.float()).norm(dim=1)
    ok = use & (shift <= max_shift) & torch.isfinite(rc).all(dim=1) & (amp * 2.0 * torch.pi * wid * wid > 0.5)
    rc = torch.where(ok[:, None], rc, rc0.float())
    sig_rc = torch.where(ok[:, None], sig_rc, torch.full_like(sig_rc, float(width0_px)))
    return GaussianFit(rc=rc, sigma_rc=sig_rc, amplitude=amp, width_px=wid, background=loc, ok=ok)


@dataclass
class ApertureCounts:
    """Result of :func:`aperture_counts` (tensors on the images' device): the pixels of a disk
    around each site, as ``(N, S, S)`` windows that are zero outside the disk. ``counts`` the raw
    counts; ``others`` what the fitted model of every other atom plus the image's background
    predicts there; ``psf`` the share of a column's integrated image that falls on each pixel
    (a Gaussian of the image's median fitted width, centred on the site, plus its wings);
    ``mask`` 1 inside the disk and the frame."""

    counts: torch.Tensor
    others: torch.Tensor
    psf: torch.Tensor
    mask: torch.Tensor
    gain: torch.Tensor
    offset: torch.Tensor


def _windows(rc: torch.Tensor, batch: torch.Tensor, shape: tuple[int, int], rad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Square windows of half-size ``rad`` anchored at the rounded ``rc`` (clamped into the frame):
    ``(flat index into (B*H*W) (N, S, S), inside (N, S, S) bool, rows (N, S, 1), cols (N, 1, S))``."""
    h, w = shape
    offs = torch.arange(-rad, rad + 1, device=rc.device)
    anchor = torch.round(rc).long()
    wr = anchor[:, 0, None, None].clamp(0, h - 1) + offs[None, :, None]
    wc = anchor[:, 1, None, None].clamp(0, w - 1) + offs[None, None, :]
    inside = (wr >= 0) & (wr < h) & (wc >= 0) & (wc < w)
    flat = batch[:, None, None] * (h * w) + wr.clamp(0, h - 1) * w + wc.clamp(0, w - 1)
    return flat, inside, wr, wc


def _offset_windows(rc: torch.Tensor, batch: torch.Tensor, shape: tuple[int, int], rad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_windows` with pixel offsets from ``rc`` instead of pixel rows and columns."""
    flat, inside, wr, wc = _windows(rc, batch, shape, rad)
    return flat, inside, wr.float() - rc[:, 0, None, None], wc.float() - rc[:, 1, None, None]


def aperture_counts(
    images: torch.Tensor,
    batch: torch.Tensor,
    rc: torch.Tensor,
    fit: GaussianFit,
    width0_px: float,
    aperture_px: float,
    counting: torch.Tensor | None = None,
) -> ApertureCounts:
    """The pixels within ``aperture_px`` of each site with the model's share of their counts.

    ``images`` ``(B, H, W)`` the counts :func:`refine_gaussians` was run on, ``batch`` ``(N,)``
    and ``rc`` ``(N, 2)`` the sites (pixels of ``images``), ``fit`` its result for the same
    sites (atoms with ``fit.ok`` False, e.g. empty sites, add nothing to the model),
    ``width0_px`` the column width where an image has no fitted atom. The background is the
    image's vacuum level plus the wings of the atoms around (see the comment in the code), so
    an empty site is not charged with the wings its missing atom would have had. Counts are
    turned into electrons
    with the detector's gain and offset estimated from the fit's residuals
    (:func:`detector_response`), so a site holding atoms of integrated intensity ``c``
    (electrons) has pixel counts ``Poisson(others + c * psf)``, which is what a composition
    model of the sites needs (:func:`~stemagent.segmentation.intensity.classify_by_counts`).
    ``counting`` ``(B,)`` marks images in electrons already (see :func:`detector_response`).
    """
    dev = images.device
    nb, h, w = images.shape
    n = int(rc.shape[0])
    rad_a = max(1, math.ceil(float(aperture_px)))
    if n == 0:
        z = torch.zeros(0, 2 * rad_a + 1, 2 * rad_a + 1, device=dev)
        return ApertureCounts(z, z, z, z, gain=torch.ones(nb, device=dev), offset=torch.zeros(nb, device=dev))
    imgs = images.float().reshape(-1)
    rc = rc.float()
    ok = fit.ok
    # the model image of every fitted atom (windows wide enough for their tails)
    rad_m = max(2, math.ceil(3.5 * float(width0_px)))
    flat_m, inside_m, dr_m, dc_m = _offset_windows(fit.rc.float(), batch, (h, w), rad_m)
    wid = fit.width_px[:, None, None]
    own_m = (fit.amplitude * ok.float())[:, None, None] * torch.exp(-0.5 * (dr_m * dr_m + dc_m * dc_m) / (wid * wid)) * inside_m
    canvas = torch.zeros(nb * h * w, device=dev)
    canvas.index_add_(0, flat_m.reshape(-1), own_m.reshape(-1))
    # per image: median fitted width of its atoms (no host sync)
    mine = ok[None, :] & (batch[None, :] == torch.arange(nb, device=dev)[:, None])  # (B, N)
    w_img = torch.nan_to_num(torch.nanmedian(torch.where(mine, fit.width_px[None, :], float("nan")), dim=1).values, nan=float(width0_px))
    # A probe's image is a core and wings (an Airy pattern's rings, source size, thermal blur)
    # that the fit's Gaussian core leaves to each atom's local constant background. Around an
    # empty site those wings are weaker than around an atom (its own are missing), so the
    # background is modelled as vacuum + a share of every atom's intensity spread over its fit
    # window: the fitted local backgrounds, regressed on the atom intensity around them, give
    # the vacuum level (intercept) and the wing share (slope).
    intensity = fit.amplitude * (2.0 * math.pi) * fit.width_px**2 * ok.float()
    area = float((2 * rad_m + 1) ** 2)
    centre = batch * (h * w) + fit.rc[:, 0].round().long().clamp(0, h - 1) * w + fit.rc[:, 1].round().long().clamp(0, w - 1)
    # each atom's intensity / area over its fit window: a box sum of point masses
    wings = _box_sum(torch.zeros(nb * h * w, device=dev).index_add_(0, centre, intensity / area).reshape(nb, h, w), rad_m).reshape(-1)
    density = wings[centre]  # (N,) atom intensity per pixel around each atom, its own included
    median_bg = torch.nan_to_num(torch.nanmedian(torch.where(mine, fit.background[None, :], float("nan")), dim=1).values, nan=0.0)
    vacuum, share = _wing_regression(fit.background, density, mine & (intensity > 30.0), median_bg)
    # the disks around the sites
    flat_a, inside_a, dr_a, dc_a = _offset_windows(rc, batch, (h, w), rad_a)
    mask = ((dr_a * dr_a + dc_a * dc_a <= float(aperture_px) ** 2) & inside_a).float()
    pick = flat_a.reshape(-1)

    def at_sites(x: torch.Tensor) -> torch.Tensor:  # x[flat_a], by index_select (~3x faster on a CPU)
        return x.index_select(0, pick).reshape(flat_a.shape)

    counts = at_sites(imgs) * mask
    # the site's own model (its fitted Gaussian at its fitted position, its wings) is not an "other"
    drs = dr_a + (rc[:, 0] - fit.rc[:, 0].float())[:, None, None]
    dcs = dc_a + (rc[:, 1] - fit.rc[:, 1].float())[:, None, None]
    own = (fit.amplitude * ok.float())[:, None, None] * torch.exp(-0.5 * (drs * drs + dcs * dcs) / (wid * wid))
    sb = share[batch][:, None, None]
    wing_others = (at_sites(wings) - (intensity / area)[:, None, None]).clamp_min(0.0)
    others = ((at_sites(canvas) - own).clamp_min(0.0) + sb * wing_others + vacuum[batch][:, None, None]) * mask
    # every column of a frame is imaged by the same probe: one width per image, and its wings
    ws = w_img[batch][:, None, None]
    psf = (torch.exp(-0.5 * (dr_a * dr_a + dc_a * dc_a) / (ws * ws)) / (2.0 * math.pi * ws * ws) + sb / area) * mask
    # from detector counts to electrons: see detector_response
    model = (canvas + share.repeat_interleave(h * w) * wings).reshape(nb, h, w) + vacuum[:, None, None]
    gain, offset = detector_response(images, model, rad_m, counting)
    g, o = gain[batch][:, None, None], offset[batch][:, None, None]
    counts = (counts - o * mask) / g
    others = ((others - o * mask) / g).clamp_min(0.0)
    return ApertureCounts(counts=counts, others=others, psf=psf, mask=mask, gain=gain, offset=offset)


def _box_sum(x: torch.Tensor, rad: int) -> torch.Tensor:
    """Sum of ``x`` ``(B, H, W)`` over the ``(2 rad + 1)^2`` square around each pixel (zero
    outside), by cumulative sums: the cost does not grow with the square."""
    k = 2 * rad + 1
    c = F.pad(x, (0, 0, rad + 1, rad)).cumsum(dim=1)
    y = c[:, k:, :] - c[:, :-k, :]
    c = F.pad(y, (rad + 1, rad)).cumsum(dim=2)
    return c[:, :, k:] - c[:, :, :-k]


def _wing_regression(background: torch.Tensor, density: torch.Tensor, use: torch.Tensor, fallback: torch.Tensor, min_atoms: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image ``(vacuum, share)``: least squares of the atoms' fitted local ``background``
    ``(N,)`` on the atom ``density`` ``(N,)`` around them, over the atoms ``use`` ``(B, N)`` marks
    (those whose background was fitted). Fewer than ``min_atoms`` of them, or a share outside
    ``[0, 1]``: no wings, and the vacuum is ``fallback`` ``(B,)``."""
    nan = float("nan")
    cnt = use.sum(dim=1)
    d = torch.where(use, density[None, :], nan)
    b = torch.where(use, background[None, :], nan)
    d_mean, b_mean = torch.nanmean(d, dim=1), torch.nanmean(b, dim=1)
    cov = torch.nanmean((d - d_mean[:, None]) * (b - b_mean[:, None]), dim=1)
    var = torch.nanmean((d - d_mean[:, None]) ** 2, dim=1)
    share = cov / var.clamp_min(1e-12)
    good = (cnt >= min_atoms) & torch.isfinite(share) & (share >= 0) & (share <= 1) & (var > 0)
    share = torch.where(good, share, torch.zeros_like(share))
    vacuum = torch.where(good, (b_mean - share * d_mean).clamp_min(0.0), fallback)
    return vacuum, share


def detector_response(images: torch.Tensor, model: torch.Tensor, border_px: int, counting: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``(gain, offset)`` of a detector, from how the noise grows with the signal.

    For counts ``y = offset + gain * n + read noise`` with ``n`` Poisson electrons, the variance
    is ``gain * mean + (read^2 - gain * offset)``: a straight line in the mean (the photon
    transfer curve). Regressing the squared residuals of the fitted ``model`` ``(B, H, W)`` on
    the model, away from ``border_px`` of the edge, gives the gain as its slope and
    ``offset = -intercept / gain``; ``(y - offset) / gain`` is then Poisson in its first two
    moments (read noise becomes a small extra background). Where the slope is not positive
    the image is left as it is: ``(1, 0)``.

    An image ``counting`` ``(B,)`` marks (a counting detector, decided from the image's
    statistics by :func:`~stemagent.segmentation.detector.estimate_detector`, never from whole
    numbers: analog scan generators write whole numbers too) reports electrons and gets
    ``(1, 0)`` without the regression: the fit's residuals
    understate the noise where atoms are (each fitted amplitude soaks up part of it), which
    biases the offset by a few tenths of a count per pixel, enough to hide vacancies at
    3e3 e/Å² (BENCHMARKS.md). On analog data the same bias is small next to the offsets and
    gains it corrects.
    """
    b = int(border_px)
    y = images.float()[:, b:-b or None, b:-b or None].flatten(1)
    mu = model.float()[:, b:-b or None, b:-b or None].flatten(1)
    r2 = (y - mu) ** 2
    mu_c = mu - mu.mean(dim=1, keepdim=True)
    slope = (mu_c * r2).mean(dim=1) / (mu_c * mu_c).mean(dim=1).clamp_min(1e-12)
    intercept = r2.mean(dim=1) - slope * mu.mean(dim=1)
    known = torch.zeros(len(images), dtype=torch.bool, device=images.device) if counting is None else counting.to(images.device)
    good = torch.isfinite(slope) & torch.isfinite(intercept) & (slope > 1e-6) & ~known
    gain = torch.where(good, slope, torch.ones_like(slope))
    offset = torch.where(good, -intercept / gain, torch.zeros_like(slope))
    return gain, offset
