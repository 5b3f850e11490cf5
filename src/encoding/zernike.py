"""Zernike moments of atom-centred patches: the basis, its discretisation correction, and batched
moments in torch.

Basis. ``V_nm(rho, theta) = sqrt((n + 1) / pi) R_n^|m|(rho) exp(i m theta)`` for ``0 <= n <= n_max``,
``|m| <= n``, ``n - |m|`` even, is orthonormal on the unit disk (area measure). Patch pixels are
*point samples* (a STEM pixel is one beam position); the inner product on the grid weighs each
pixel by ``w_p h^2``: a soft disk mask ``w`` (1 inside, 0 outside, linear over the pixel at the
rim) and ``h`` the pixel size in disk units. On the grid the sampled functions are *not*
orthonormal: their Gram matrix ``G_jk = <V_j, V_k>`` (:meth:`ZernikeBasis.gram_at`) differs from
the identity by up to 0.3 at order 10 on a 15 px disk, almost all of it in the high orders at the
rim.

Discretisation correction. :meth:`ZernikeBasis.orthonormal` is Löwdin's symmetric
orthonormalisation ``W = G^{-1/2} V``: the orthonormal set closest to the sampled ``V``
(``W diag(w h^2) W^H = I`` to rounding; tested). Two kinds of moments come from it
(``correction``):

- ``"gram"``: the least-squares coefficients of the patch in the sampled ``V``,
  ``a = conj(G)^{-1} conj(V) diag(w h^2) f`` (the orthonormal moments ``<f, W>`` mapped back by
  ``conj(G)^{-1/2}``). Exact for any image in the span: a rotation by ``alpha`` multiplies ``a_nm``
  by ``exp(-i m alpha)`` to rounding (tested to 1e-9).
- ``"none"`` (the default for features): the projections ``a = <f, V>`` with the same weights, the
  quadrature estimate of the continuum moment. For atom images (Gaussians 1.5-3.5 px wide on a
  15 px disk) their magnitudes are rotation invariant to 5e-6-2e-3 of the largest, against
  2e-3-4e-2 for the Gram-corrected ones: ``G^{-1}`` has to undo the rim error of the high orders
  and amplifies the part of the image beyond ``n_max`` while doing so. Measured, not assumed
  (tests and the module's benchmark notes in BENCHMARKS.md).

Speed. Every ``V_nm`` is a polynomial of total degree ``<= n_max`` in (x, y), so it is a fixed
combination of the separable products ``L_p(x) L_q(y)`` (Legendre, ``p + q <= n_max``). The moments
of a batch are therefore two small contractions per patch (over columns, then rows) and one
``(L, 2K)`` product: about a third of the arithmetic of a dense ``(pixels, moments)`` product.

Sub-pixel centring. The atom's offset from the patch centre is quantised to ``1 / subpixel_steps``
px (default 1/8: at most 1/16 px off); for each of the ``(S + 1)^2`` offsets the basis keeps the
shifted mask, the shifted Legendre tables and (``"gram"``) its own projector, so the disk and the
polynomials are centred on the atom and nothing is interpolated. Thousands of patches are grouped
by offset (two plain GEMMs per group); a few hundred are gathered per patch and batched.

Coordinates: in a patch ``x`` runs along columns and ``y`` along rows (the sample frame's x and y
when the scan is not rotated), in units of the disk radius; ``theta = atan2(y, x)``. Only ``m >= 0``
moments are returned (for a real image ``a_{n,-m} = conj(a_{n,m})``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from stemagent.errors import InputError
from stemagent.encoding.patches import patch_anchors



def zernike_indices(n_max: int, signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Radial orders ``n`` and azimuthal orders ``m`` up to ``n_max``, ordered by n then m.

    ``signed=False``: ``m >= 0`` only (the returned moments); ``signed=True``: every ``-n <= m <= n``.
    """
    ns: list[int] = []
    ms: list[int] = []
    for n in range(n_max + 1):
        for m in range(-n, n + 1, 2):
            if signed or m >= 0:
                ns.append(n)
                ms.append(m)
    return np.asarray(ns, dtype=np.int64), np.asarray(ms, dtype=np.int64)


def radial_polynomial(n: int, m: int, rho: np.ndarray) -> np.ndarray:
    """Zernike radial polynomial ``R_n^|m|(rho)`` (float64)."""
    m = abs(m)
    out = np.zeros_like(np.asarray(rho, dtype=np.float64))
    for k in range((n - m) // 2 + 1):
        c = (-1) ** k * math.factorial(n - k) / (
            math.factorial(k) * math.factorial((n + m) // 2 - k) * math.factorial((n - m) // 2 - k)
        )
        out = out + c * rho ** (n - 2 * k)
    return out


def zernike_polynomial(n: int, m: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Orthonormal complex Zernike function ``V_nm`` at points (x, y) in disk units (not masked)."""
    rho = np.hypot(x, y)
    theta = np.arctan2(y, x)
    return math.sqrt((n + 1) / math.pi) * radial_polynomial(n, m, rho) * np.exp(1j * m * theta)


def legendre(u: np.ndarray | torch.Tensor, degree: int) -> np.ndarray | torch.Tensor:
    """Legendre polynomials ``P_0..P_degree`` at ``u``, stacked on a new last axis."""
    lib = torch if isinstance(u, torch.Tensor) else np
    out = [lib.ones_like(u)]
    if degree >= 1:
        out.append(u)
    for k in range(1, degree):
        out.append(((2 * k + 1) * u * out[k] - k * out[k - 1]) / (k + 1))
    return lib.stack(out, -1)


def _legendre_pairs(n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """The (p, q) degree pairs with ``p + q <= n_max``: ``p`` along x (columns), ``q`` along y (rows)."""
    p, q = np.meshgrid(np.arange(n_max + 1), np.arange(n_max + 1), indexing="ij")
    keep = (p + q) <= n_max
    return p[keep], q[keep]


def _zernike_in_legendre(n_max: int) -> np.ndarray:
    """``C`` ``(K_signed, L)``: ``V_j(x, y) = sum_l C_jl L_p(x) L_q(y)`` exactly (Gauss–Legendre)."""
    nodes, weights = np.polynomial.legendre.leggauss(n_max + 1)
    x, y = np.meshgrid(nodes, nodes, indexing="ij")
    wxy = weights[:, None] * weights[None, :]
    lx = legendre(nodes, n_max)  # (Q, D)
    ns, ms = zernike_indices(n_max, signed=True)
    pp, qq = _legendre_pairs(n_max)
    norm = (2 * pp + 1) * (2 * qq + 1) / 4.0
    phi = lx[:, None, pp] * lx[None, :, qq]  # (Q, Q, L)
    c = np.empty((len(ns), len(pp)), dtype=np.complex128)
    for j, (n, m) in enumerate(zip(ns, ms)):
        v = zernike_polynomial(int(n), int(m), x, y)
        c[j] = np.einsum("ab,ab,abl->l", wxy, v, phi) * norm
    return c


def soft_disk(patch_px: int, radius_px: float, dy: float = 0.0, dx: float = 0.0) -> np.ndarray:
    """``(P, P)`` weights of a disk of ``radius_px`` centred ``(dy, dx)`` px from the patch centre:
    1 inside, 0 outside, linear over the one pixel straddling the rim (float64)."""
    c = (patch_px - 1) / 2.0
    r = np.arange(patch_px) - c - dy
    s = np.arange(patch_px) - c - dx
    d = np.hypot(r[:, None], s[None, :])
    return np.clip(radius_px + 0.5 - d, 0.0, 1.0)


def offset_levels(steps: int) -> np.ndarray:
    """The sub-pixel offsets a patch centre is quantised to: ``(k - S/2) / S`` px, ``k = 0..S``."""
    return (np.arange(steps + 1) - steps / 2) / steps


@dataclass
class ZernikeBasis:
    """Zernike basis up to ``n_max`` on a ``patch_px`` square patch with a disk of ``radius_px``.

    The atom's offset from the patch centre is quantised to ``1 / subpixel_steps`` px (default
    1/8: a centring error of at most 1/16 px); for each of the ``(S + 1)^2`` offsets the basis
    keeps its mask, its Legendre tables and its own Gram-corrected projector, so the moments are
    exact at every offset.

    Attributes (numpy, float64 / complex128): ``n``, ``m`` ``(K,)`` the returned moments (``m >= 0``);
    ``n_signed``, ``m_signed`` ``(K_signed,)`` the full set; ``weights`` ``(P, P)`` the inner-product
    weights ``w h^2`` of a centred atom; ``gram`` ``(K_signed, K_signed)`` its Gram matrix
    ``G_jk = <V_j, V_k>``. Torch copies are cached per device and dtype.
    """

    n_max: int
    patch_px: int
    radius_px: float
    subpixel_steps: int = 8
    correction: str = "none"
    n: np.ndarray = field(init=False)
    m: np.ndarray = field(init=False)
    n_signed: np.ndarray = field(init=False)
    m_signed: np.ndarray = field(init=False)
    weights: np.ndarray = field(init=False)
    gram: np.ndarray = field(init=False)
    _legendre_c: np.ndarray = field(init=False, repr=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.n_max, (int, np.integer)) and 0 <= self.n_max <= 20):
            raise InputError("n_max", self.n_max, "must be an integer in [0, 20]")
        if not (isinstance(self.patch_px, (int, np.integer)) and self.patch_px >= 4):
            raise InputError("patch_px", self.patch_px, "must be an integer >= 4")
        if not (isinstance(self.subpixel_steps, (int, np.integer)) and self.subpixel_steps >= 2 and self.subpixel_steps % 2 == 0):
            raise InputError("subpixel_steps", self.subpixel_steps, "must be an even integer >= 2")
        if self.correction not in ("none", "gram"):
            raise InputError("correction", self.correction, "must be 'none' (projections) or 'gram' (least-squares coefficients)")
        r = float(self.radius_px)
        if not (math.isfinite(r) and 1.0 <= r <= self.patch_px / 2.0 - 1.0):
            raise InputError("radius_px", self.radius_px, f"must lie in [1, {self.patch_px / 2.0 - 1.0}] for a {self.patch_px} px patch (the soft rim needs half a pixel)")
        if self.n_max > r:
            raise InputError("n_max", self.n_max, f"exceeds the disk radius {r:.1f} px: too few pixels per oscillation")
        self.radius_px = r
        self.n, self.m = zernike_indices(self.n_max)
        self.n_signed, self.m_signed = zernike_indices(self.n_max, signed=True)
        self._legendre_c = _zernike_in_legendre(self.n_max)  # (Ks, L)
        self.weights = self.mask(0.0, 0.0)
        self.gram = self.gram_at(0.0, 0.0)

    # --- sampled functions ------------------------------------------------------------------
    def _coords(self, dy: float, dx: float) -> tuple[np.ndarray, np.ndarray]:
        c = (self.patch_px - 1) / 2.0
        x = (np.arange(self.patch_px) - c - dx) / self.radius_px  # along columns
        y = (np.arange(self.patch_px) - c - dy) / self.radius_px  # along rows
        return x, y

    def _phi(self, dy: float, dx: float) -> np.ndarray:
        """Separable products ``L_p(x) L_q(y)`` on the patch, ``(L, P * P)`` (row-major pixels)."""
        x, y = self._coords(dy, dx)
        lx, ly = np.asarray(legendre(x, self.n_max)), np.asarray(legendre(y, self.n_max))
        pp, qq = _legendre_pairs(self.n_max)
        return (ly[:, None, qq] * lx[None, :, pp]).reshape(-1, len(pp)).T

    def mask(self, dy: float = 0.0, dx: float = 0.0) -> np.ndarray:
        """Inner-product weights ``w h^2`` ``(P, P)`` for an atom ``(dy, dx)`` px from the centre."""
        return soft_disk(self.patch_px, self.radius_px, dy, dx) / self.radius_px**2

    def sampled(self, dy: float = 0.0, dx: float = 0.0, signed: bool = True) -> np.ndarray:
        """The Zernike functions at the pixel centres for an atom ``(dy, dx)`` px from the patch
        centre, ``(K, P, P)`` complex, unmasked (weigh with :meth:`mask` for inner products)."""
        v = self._legendre_c @ self._phi(dy, dx)
        if not signed:
            v = v[self.m_signed >= 0]
        return v.reshape(-1, self.patch_px, self.patch_px)

    def gram_at(self, dy: float = 0.0, dx: float = 0.0) -> np.ndarray:
        """Gram matrix ``G_jk = <V_j, V_k>`` of the sampled basis on the grid (the discretisation
        error is ``G - I``)."""
        phi = self._phi(dy, dx)
        lam = (phi * self.mask(dy, dx).reshape(1, -1)) @ phi.T
        c = self._legendre_c
        return c @ lam @ c.conj().T

    def orthonormal(self, dy: float = 0.0, dx: float = 0.0) -> np.ndarray:
        """Löwdin-corrected basis ``G^{-1/2} V`` ``(K_signed, P, P)``: orthonormal under :meth:`mask`
        (``W diag(w h^2) W^H = I``); the closest orthonormal set to the sampled ``V``."""
        evals, evecs = np.linalg.eigh(self.gram_at(dy, dx))
        if evals.min() <= 1e-12 * evals.max():
            raise InputError("n_max", self.n_max, "sampled basis is rank deficient on this grid")
        g_inv_half = (evecs / np.sqrt(evals)) @ evecs.conj().T
        v = self.sampled(dy, dx, signed=True).reshape(len(self.n_signed), -1)
        return (g_inv_half @ v).reshape(-1, self.patch_px, self.patch_px)

    def projector_at(self, dy: float = 0.0, dx: float = 0.0) -> np.ndarray:
        """``(K, L)`` complex: least-squares Zernike coefficients (``m >= 0``) from the separable
        Legendre moments ``g_l = sum_p w_p h^2 f_p L_p(x) L_q(y)``: ``conj(G)^{-1} conj(C)``."""
        a_full = np.linalg.solve(self.gram_at(dy, dx).conj(), self._legendre_c.conj())
        return a_full[self.m_signed >= 0]

    # --- torch tensors, cached per device -------------------------------------------------------
    def tensors(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Banks indexed by quantised offset: ``masks`` ``(C, P, P)``, ``projector`` ``(C, D*D, 2K)``
        (row ``p * D + q``; zero rows for ``p + q > n_max``), ``legendre`` ``(S + 1, P, D)`` and its
        transpose ``legendre_t``; ``C = (S + 1)^2``,
        combination ``i * (S + 1) + j`` for row level ``i`` and column level ``j``."""
        key = (str(device), dtype)
        t = self._cache.get(key)
        if t is None:
            t = {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in self._banks().items()}
            t["shared_projector"] = self.correction == "none"
            self._cache[key] = t
        return t

    def _banks(self) -> dict[str, np.ndarray]:
        levels = offset_levels(self.subpixel_steps)
        nl = len(levels)
        d = self.n_max + 1
        pp, qq = _legendre_pairs(self.n_max)
        k = len(self.n)
        masks = np.empty((nl * nl, self.patch_px, self.patch_px))
        proj = np.zeros((nl * nl, d * d, 2 * k))
        for i, dy in enumerate(levels):
            for j, dx in enumerate(levels):
                masks[i * nl + j] = self.mask(dy, dx)
                a = self.projector_at(dy, dx) if self.correction == "gram" else self._legendre_c.conj()[self.m_signed >= 0]
                proj[i * nl + j, pp * d + qq] = np.concatenate([a.real, a.imag]).T
        c = (self.patch_px - 1) / 2.0
        leg = np.stack([legendre((np.arange(self.patch_px) - c - o) / self.radius_px, self.n_max) for o in levels])
        return {"masks": masks, "projector": proj, "legendre": leg, "legendre_t": np.ascontiguousarray(leg.transpose(0, 2, 1))}


def _quantise(offsets_px: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column level indices ``(N,)`` of offsets ``(N, 2)`` in [-0.5, 0.5] px."""
    q = torch.round((offsets_px.clamp(-0.5, 0.5) + 0.5) * steps).long()
    return q[:, 0], q[:, 1]


def _group_moments(f: torch.Tensor, t: dict[str, torch.Tensor], qi: int, qj: int, nl: int) -> torch.Tensor:
    """Moments ``(B, 2K)`` (real parts, then imaginary) of patches ``f`` ``(B, P, P)`` that share
    the quantised offset ``(qi, qj)``: two GEMMs and one projection."""
    b, p, _ = f.shape
    fw = (f * t["masks"][qi * nl + qj]).reshape(b * p, p)
    lx = t["legendre_t"][qj]  # (D, P) along columns
    d = lx.shape[0]
    u = lx @ fw.T  # contract columns: (D_p, B * P_rows); wide GEMMs run far faster than narrow ones
    g = t["legendre_t"][qi] @ u.reshape(d * b, p).T  # contract rows: (D_q, D_p * B)
    g = g.reshape(d, d, b).permute(2, 1, 0).reshape(b, d * d)  # (B, p * D + q)
    return g @ t["projector"][qi * nl + qj]


GROUPED_MIN_PATCHES = 4096  # below this, one batched gather beats a pass per sub-pixel offset


def _gathered(f: torch.Tensor, t: dict[str, torch.Tensor], qi: torch.Tensor, qj: torch.Tensor, nl: int) -> torch.Tensor:
    """Moments ``(B, 2K)`` of patches ``f`` ``(B, P, P)`` with per-patch offsets: every table is
    gathered per patch and the contractions are batched matmuls (few, larger ops: fast for a
    few hundred atoms, where one pass per offset would be dominated by per-op overhead)."""
    b, p, _ = f.shape
    combo = qi * nl + qj
    fw = f * t["masks"].index_select(0, combo)
    tmp = torch.bmm(fw, t["legendre"].index_select(0, qj))  # (B, P_rows, D_p)
    g = torch.bmm(t["legendre_t"].index_select(0, qi), tmp)  # (B, D_q, D_p)
    d = g.shape[1]
    g = g.transpose(1, 2).reshape(b, 1, d * d)  # row p * D + q
    if t["shared_projector"]:
        return g[:, 0, :] @ t["projector"][0]
    return torch.bmm(g, t["projector"].index_select(0, combo))[:, 0, :]


def _grouped(
    n: int, offsets_px: torch.Tensor, basis: "ZernikeBasis", t: dict[str, torch.Tensor], take, chunk: int
) -> torch.Tensor:
    """Moments of ``n`` patches; ``take(idx)`` returns the patches ``(B, P, P)`` of the indices
    ``idx``. Many patches: grouped by quantised offset, two plain GEMMs per group (and chunk);
    fewer than :data:`GROUPED_MIN_PATCHES`: :func:`_gathered` in chunks."""
    k = len(basis.n)
    nl = basis.subpixel_steps + 1
    if n == 0:
        return torch.empty((0, 2 * k), dtype=t["masks"].dtype, device=offsets_px.device)
    qi, qj = _quantise(offsets_px, basis.subpixel_steps)
    if n < GROUPED_MIN_PATCHES:
        idx = torch.arange(n, device=offsets_px.device)
        return torch.cat([_gathered(take(idx[s : s + chunk]), t, qi[s : s + chunk], qj[s : s + chunk], nl) for s in range(0, n, chunk)])
    combo = qi * nl + qj
    order = torch.argsort(combo)
    counts = torch.bincount(combo, minlength=nl * nl).tolist()
    parts = []
    start = 0
    for c, cnt in enumerate(counts):
        for s in range(start, start + cnt, chunk):
            parts.append(_group_moments(take(order[s : min(s + chunk, start + cnt)]), t, c // nl, c % nl, nl))
        start += cnt
    out = torch.empty((n, 2 * k), dtype=t["masks"].dtype, device=offsets_px.device)
    out[order] = torch.cat(parts)
    return out


def _as_complex(re_im: torch.Tensor, k: int) -> torch.Tensor:
    return torch.complex(re_im[:, :k].contiguous(), re_im[:, k:].contiguous())


def zernike_moments(
    patches: torch.Tensor,
    basis: ZernikeBasis,
    offsets_px: torch.Tensor | None = None,
    chunk: int = 512,
) -> torch.Tensor:
    """Complex Zernike moments ``(N, K)`` (``m >= 0``, ordered as ``basis.n``, ``basis.m``) of
    ``patches`` ``(N, P, P)`` (real, float32 or float64, on any device).

    ``offsets_px`` ``(N, 2)``: where each atom sits relative to its patch centre, (row, col) in
    pixels, each in [-0.5, 0.5]; None means every atom is at the centre. Patches are grouped by
    quantised offset and run in chunks of ``chunk`` so intermediates stay in cache.
    """
    if patches.ndim != 3 or patches.shape[1] != basis.patch_px or patches.shape[2] != basis.patch_px:
        raise InputError("patches.shape", tuple(patches.shape), f"must be (N, {basis.patch_px}, {basis.patch_px})")
    dtype = patches.dtype if patches.dtype in (torch.float32, torch.float64) else torch.float32
    patches = patches.to(dtype)
    t = basis.tensors(patches.device, dtype)
    n = patches.shape[0]
    if offsets_px is None:
        offsets_px = torch.zeros((n, 2), dtype=dtype, device=patches.device)
    offsets_px = offsets_px.to(device=patches.device, dtype=dtype)
    if offsets_px.shape != (n, 2):
        raise InputError("offsets_px.shape", tuple(offsets_px.shape), f"must be ({n}, 2)")
    re_im = _grouped(n, offsets_px, basis, t, lambda idx: patches.index_select(0, idx), chunk)
    return _as_complex(re_im, len(basis.n))


def zernike_moments_at(
    image: torch.Tensor,
    centres_rc: torch.Tensor,
    basis: ZernikeBasis,
    chunk: int = 512,
) -> torch.Tensor:
    """Moments ``(N, K)`` of patches of ``image`` ``(H, W)`` centred on ``centres_rc`` ``(N, 2)``
    (fractional row, col). Patches are cut chunk by chunk right before their moments (they stay in
    cache). Every patch must lie inside the image (see :func:`~stemagent.encoding.patches.patch_anchors`)."""
    if image.ndim != 2:
        raise InputError("image.shape", tuple(image.shape), "must be (rows, cols)")
    dtype = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
    image = image.to(dtype)
    t = basis.tensors(image.device, dtype)
    anchors, offsets = patch_anchors(centres_rc.to(image.device, dtype), basis.patch_px, (int(image.shape[0]), int(image.shape[1])))
    p = basis.patch_px
    if image.device.type == "cpu":  # numpy's fancy indexing of a strided view is several times faster here
        windows_np = np.lib.stride_tricks.sliding_window_view(image.numpy(), (p, p))
        anchors_np = anchors.numpy()

        def take(idx: torch.Tensor) -> torch.Tensor:
            a = anchors_np[idx.numpy()]
            return torch.from_numpy(windows_np[a[:, 0], a[:, 1]])
    else:
        windows = image.unfold(0, p, 1).unfold(1, p, 1)  # (H-P+1, W-P+1, P, P) view, no copy

        def take(idx: torch.Tensor) -> torch.Tensor:
            return windows[anchors[idx, 0], anchors[idx, 1]]

    re_im = _grouped(len(anchors), offsets, basis, t, take, chunk)
    return _as_complex(re_im, len(basis.n))


def rotate_moments(moments: torch.Tensor | np.ndarray, m: np.ndarray, angle_rad: float) -> torch.Tensor | np.ndarray:
    """Moments of the patch rotated by ``angle_rad`` (counter-clockwise in (x, y)): ``a_nm exp(-i m angle)``."""
    if isinstance(moments, torch.Tensor):
        ph = torch.exp(-1j * torch.as_tensor(m, device=moments.device, dtype=torch.float64) * angle_rad).to(moments.dtype)
        return moments * ph
    return moments * np.exp(-1j * m * angle_rad)


def symmetry_scores(moments: torch.Tensor, m: np.ndarray, folds: tuple[int, ...] = (2, 3, 4, 6)) -> torch.Tensor:
    """Per patch, for each n in ``folds``: the share of the non-radial power (``m > 0``) in orders
    ``m`` divisible by n, ``(N, len(folds))`` in [0, 1]. A patch with exact n-fold rotational
    symmetry has only those orders (score 1); a featureless or radially symmetric patch scores 0."""
    power = moments.real**2 + moments.imag**2
    mt = torch.as_tensor(m, device=moments.device)
    angular = mt > 0
    total = power[:, angular].sum(dim=1)
    scores = []
    for fold in folds:
        sel = angular & (mt % fold == 0)
        scores.append(power[:, sel].sum(dim=1))
    s = torch.stack(scores, dim=1)
    return torch.where(total[:, None] > 0, s / total.clamp_min(1e-30)[:, None], torch.zeros_like(s))
