"""The hop-rate model: how fast the dopant swaps with a carbon, as a function of where the beam
sits relative to their bond and of the site, learned online from every park.

A hop is a Poisson process: with the beam fixed, the dopant swaps with carbon ``c`` at rate
``lambda(offset_c, site_c)``, ``offset_c`` being the beam's offset from ``c`` in the bond frame
(``along`` the dopant→carbon direction, ``across`` it). Every park adds, for each bond of the
dopant, an exposure (the time the dopant sat there with the beam where it was) and whether it
hopped across that bond; hops to the intended site, hops to other sites and hops back are all
data for the same function. The likelihood of ``k`` hops in exposure ``E`` is
``Poisson(k; lambda E)`` (for ``k`` in 0/1 this is the binary "hopped or not", with the hop time
when it is known), and exposures pool exactly: cells of ``cell_A`` in offset per site hold the
summed hops and exposure.

The latent ``f = log lambda`` has a GP prior (GPyTorch): a physics prior mean (the beam on the
carbon helps: a bump of ``prior_width_A`` over a floor), an unknown overall level, a smooth
offset-dependent part the data can use to overrule the prior anywhere, and a site part for
site-to-site variation. The non-Gaussian likelihood is handled by expectation propagation: each
cell's Poisson likelihood is replaced by a Gaussian pseudo-observation (a *site*) whose moments
match the tilted distribution, computed by Gauss–Hermite quadrature around its Laplace mode;
the GP itself is GPyTorch's exact GP with those per-cell noises (the same construction as the
Beta–Bernoulli / Dirichlet GP approximations for binary outcomes). Hyperparameters are fixed
from the configuration: there are too few hops in one run to learn them.

Damage (a vacancy or a lost dopant) is rare and has no usable offset dependence in a few hops:
a Gamma–Poisson rate per second of parked beam.
"""

from __future__ import annotations

import math
import warnings

import gpytorch
import numpy as np
import torch

from stemagent.policies.manipulation.config import HopModelConfig

_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(24)
_GH_LOGW = np.log(_GH_W / math.sqrt(2.0 * math.pi))


def prior_shape(r2: torch.Tensor, width_A: float, floor: float, floor_radius_A: float) -> torch.Tensor:
    """Physics prior shape of the rate vs squared offset ``r2`` from the carbon: a bump of ``width_A``
    over a floor that fades beyond ``floor_radius_A`` (no hops with the beam far from every carbon)."""
    r = torch.sqrt(r2)
    fade = torch.exp(-torch.clamp(r - floor_radius_A, min=0.0) ** 2 / (2.0 * 0.3**2))
    return floor * fade + (1.0 - floor) * torch.exp(-r2 / (2.0 * width_A**2))


class PhysicsPriorMean(gpytorch.means.Mean):
    """``log peak + log(prior_shape(offset))`` on inputs ``(..., n, 4)`` (offset in the first two columns)."""

    def __init__(self, log_peak: float, width_A: float, floor: float, floor_radius_A: float) -> None:
        super().__init__()
        self.log_peak = float(log_peak)
        self.width_A = float(width_A)
        self.floor = float(floor)
        self.floor_radius_A = float(floor_radius_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r2 = x[..., 0] ** 2 + x[..., 1] ** 2
        return self.log_peak + torch.log(prior_shape(r2, self.width_A, self.floor, self.floor_radius_A))


def envelope(r2: torch.Tensor, near_fraction: float, near_radius_A: float) -> torch.Tensor:
    """Prior sd multiplier of the offset part: ``sqrt(near_fraction)`` on the carbon, 1 far from it."""
    return torch.sqrt(near_fraction + (1.0 - near_fraction) * (1.0 - torch.exp(-r2 / (2.0 * near_radius_A**2))))


class HopRateKernel(gpytorch.kernels.Kernel):
    """Prior covariance of ``log rate`` on inputs ``(along, across, site_x, site_y)``:

    ``level_sd² + e(x) e(x') offset_sd² RBF(offset; offset_lengthscale) + site_sd² RBF(site; site_lengthscale)``

    with the :func:`envelope` ``e`` (the physics prior is trusted close to the carbon, the data
    rule far from it). Hyperparameters are fixed, not learned: one run has too few hops.
    """

    has_lengthscale = False

    def __init__(self, cfg: HopModelConfig) -> None:
        super().__init__()
        self.level_var = cfg.level_sd**2
        self.offset_var = cfg.offset_sd**2
        self.offset_ls = cfg.offset_lengthscale_A
        self.site_var = cfg.site_sd**2
        self.site_ls = cfg.site_lengthscale_A
        self.near_fraction = cfg.near_sd_fraction**2
        self.near_radius_A = cfg.near_radius_A

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, diag: bool = False, **params) -> torch.Tensor:
        e1 = envelope(x1[..., 0] ** 2 + x1[..., 1] ** 2, self.near_fraction, self.near_radius_A)
        e2 = envelope(x2[..., 0] ** 2 + x2[..., 1] ** 2, self.near_fraction, self.near_radius_A)
        if diag:
            d_off = ((x1[..., :2] - x2[..., :2]) ** 2).sum(-1)
            d_site = ((x1[..., 2:] - x2[..., 2:]) ** 2).sum(-1)
            ee = e1 * e2
        else:
            d_off = torch.cdist(x1[..., :2], x2[..., :2]) ** 2
            d_site = torch.cdist(x1[..., 2:], x2[..., 2:]) ** 2
            ee = e1.unsqueeze(-1) * e2.unsqueeze(-2)
        k = self.level_var + self.offset_var * ee * torch.exp(-0.5 * d_off / self.offset_ls**2)
        if self.site_var > 0:
            k = k + self.site_var * torch.exp(-0.5 * d_site / self.site_ls**2)
        return k


class _RateGP(gpytorch.models.ExactGP):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, likelihood: gpytorch.likelihoods.Likelihood, cfg: HopModelConfig) -> None:
        super().__init__(x, y, likelihood)
        self.mean_module = PhysicsPriorMean(math.log(cfg.prior_peak_rate_per_s), cfg.prior_width_A, cfg.prior_floor,
                                            cfg.prior_floor_radius_A)
        self.covar_module = HopRateKernel(cfg)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def tilted_moments(cav_mean: np.ndarray, cav_var: np.ndarray, k: np.ndarray, exposure: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance ``(n,)`` of ``N(f; cav_mean, cav_var) * Poisson(k; exp(f) exposure)``,
    by Gauss–Hermite quadrature centred on the Laplace approximation (Newton on the concave log)."""
    m = np.asarray(cav_mean, float)
    v = np.asarray(cav_var, float)
    k = np.asarray(k, float)
    e = np.asarray(exposure, float)
    f = m.copy()
    for _ in range(30):
        ef = e * np.exp(np.minimum(f, 50.0))
        g1 = -(f - m) / v + k - ef
        g2 = -1.0 / v - ef
        step = np.clip(-g1 / g2, -3.0, 3.0)
        f = f + step
        if np.max(np.abs(step)) < 1e-9:
            break
    ef = e * np.exp(np.minimum(f, 50.0))
    s = np.sqrt(1.0 / (1.0 / v + ef))
    nodes = f[:, None] + s[:, None] * _GH_X[None, :]
    logg = -((nodes - m[:, None]) ** 2) / (2.0 * v[:, None]) + k[:, None] * nodes - e[:, None] * np.exp(np.minimum(nodes, 50.0))
    logw = _GH_LOGW[None, :] + logg + 0.5 * _GH_X[None, :] ** 2
    logw -= logw.max(axis=1, keepdims=True)
    w = np.exp(logw)
    w /= w.sum(axis=1, keepdims=True)
    mean = (w * nodes).sum(axis=1)
    var = (w * (nodes - mean[:, None]) ** 2).sum(axis=1)
    return mean, np.maximum(var, 1e-10)


class HopModel:
    """Exposures and hops per (site, offset cell), the GP posterior of the log hop rate, and the damage rate.

    Inference is online EP: a cell whose counts changed gets a new site from its last posterior
    marginal (its cavity); every :meth:`predict` makes one damped EP sweep over all cells with
    the marginals of that same GPyTorch call, so sites keep converging from decision to decision
    at the cost of one GP evaluation each. :meth:`fit` runs full sweeps (tests, offline use).
    """

    def __init__(self, config: HopModelConfig | None = None, device: torch.device | str = "cpu") -> None:
        self.cfg = config or HopModelConfig()
        self.device = torch.device(device)
        self.dtype = torch.float64
        self._index: dict[tuple[int, int, int], int] = {}  # cell key -> row
        self._x = np.zeros((0, 4))  # (along, across, site_x, site_y) per cell
        self._k = np.zeros(0)  # hops per cell
        self._e = np.zeros(0)  # exposure per cell, s
        self._tau = np.zeros(0)  # EP site precision
        self._nu = np.zeros(0)  # EP site precision * mean
        self._mu = np.zeros(0)  # last posterior marginal mean
        self._var = np.zeros(0)  # last posterior marginal variance
        self._stale = np.zeros(0, dtype=bool)  # counts changed since the site was computed
        self._gp: _RateGP | None = None
        self.damage_events = 0
        self.damage_exposure_s = 0.0

    # --- data -------------------------------------------------------------------------------
    def add(self, site: int, site_xy_A: tuple[float, float], along_A: float, across_A: float, exposure_s: float,
            hops: float) -> None:
        """One bond's exposure: the dopant sat ``exposure_s`` next to carbon site ``site`` with the
        beam at bond-frame offset ``(along_A, across_A)`` and hopped across it ``hops`` times (a
        fraction when a hop is shared between parks that may each have made it)."""
        if exposure_s <= 0 and hops == 0:
            return
        if math.hypot(along_A, across_A) > self.cfg.max_offset_A:
            return
        c = self.cfg.cell_A
        key = (int(site), int(round(along_A / c)), int(round(across_A / c)))
        row = self._index.get(key)
        if row is None:
            row = self._index[key] = len(self._k)
            x = np.array([[key[1] * c, key[2] * c, float(site_xy_A[0]), float(site_xy_A[1])]])
            pm, pv = self._prior_marginals(x)
            self._x = np.concatenate([self._x, x])
            self._k = np.append(self._k, 0.0)
            self._e = np.append(self._e, 0.0)
            self._tau = np.append(self._tau, 0.0)
            self._nu = np.append(self._nu, 0.0)
            self._mu = np.append(self._mu, pm)
            self._var = np.append(self._var, pv)
            self._stale = np.append(self._stale, True)
        self._k[row] += float(hops)
        self._e[row] += max(0.0, float(exposure_s))
        self._stale[row] = True

    def compact(self, keep_sites: set[int], max_cells: int) -> int:
        """Keep the model small: when there are more than ``max_cells`` cells, pool the cells of sites
        not in ``keep_sites`` by offset into one "earlier sites" pseudo-site (their site effects are
        no longer told apart; hops and exposures add up exactly). Returns the number of cells removed."""
        if self.n_cells <= max_cells:
            return 0
        old = [k for k in self._index if k[0] not in keep_sites and k[0] != -1]
        if not old:
            return 0
        c = self.cfg.cell_A
        keep = [k for k in self._index if k not in set(old)]
        pooled: dict[tuple[int, int, int], list[float]] = {}
        for k in keep:
            if k[0] == -1:
                r = self._index[k]
                pooled[k] = [self._k[r], self._e[r]]
        for k in old:
            r = self._index[k]
            q = (-1, k[1], k[2])
            acc = pooled.setdefault(q, [0.0, 0.0])
            acc[0] += self._k[r]
            acc[1] += self._e[r]
        rows = [self._index[k] for k in keep if k[0] != -1]
        n_before = self.n_cells
        x, kk, ee = self._x[rows], self._k[rows], self._e[rows]
        tau, nu, mu, var = self._tau[rows], self._nu[rows], self._mu[rows], self._var[rows]
        self._index = {k: i for i, k in enumerate(k for k in keep if k[0] != -1)}
        self._x, self._k, self._e = x, kk, ee
        self._tau, self._nu, self._mu, self._var = tau, nu, mu, var
        self._stale = np.zeros(len(rows), dtype=bool)
        far = 1e6  # the pooled pseudo-site sits far from every real site: its own site effect
        for q, (hops, exposure) in pooled.items():
            self.add(-1, (far, far), q[1] * c, q[2] * c, exposure, hops)
        self._gp = None
        return n_before - self.n_cells

    def with_config(self, config: HopModelConfig) -> "HopModel":
        """A new model under another prior (``config``) holding the same cells' hops and exposures and
        the same damage counts; its EP sites start afresh (computed at the next prediction)."""
        other = HopModel(config, device=self.device)
        other._index = dict(self._index)
        other._x, other._k, other._e = self._x.copy(), self._k.copy(), self._e.copy()
        other._tau, other._nu = np.zeros(self.n_cells), np.zeros(self.n_cells)
        if self.n_cells:
            other._mu, other._var = other._prior_marginals(other._x)
        other._stale = np.ones(self.n_cells, dtype=bool)
        other.damage_events, other.damage_exposure_s = self.damage_events, self.damage_exposure_s
        return other

    def near_carbon_counts(self, radius_A: float) -> tuple[float, float]:
        """Hops and exposure (s) summed over the cells within ``radius_A`` of the carbon, all sites."""
        near = np.hypot(self._x[:, 0], self._x[:, 1]) <= radius_A + 1e-9
        return float(self._k[near].sum()), float(self._e[near].sum())

    def add_damage_exposure(self, beam_s: float, damage_events: int = 0) -> None:
        self.damage_exposure_s += max(0.0, float(beam_s))
        self.damage_events += int(damage_events)

    @property
    def n_cells(self) -> int:
        return len(self._k)

    @property
    def n_hops(self) -> int:
        return int(self._k.sum())

    def damage_rate_per_s(self) -> float:
        """Posterior mean damage rate (Gamma prior, Poisson counts)."""
        a = self.cfg.damage_prior_shape
        b = a / self.cfg.prior_damage_rate_per_s
        return (a + self.damage_events) / (b + self.damage_exposure_s)

    # --- inference ---------------------------------------------------------------------------
    def _prior_marginals(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        xt = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1, 4), dtype=self.dtype)
        mean = PhysicsPriorMean(math.log(cfg.prior_peak_rate_per_s), cfg.prior_width_A, cfg.prior_floor,
                                cfg.prior_floor_radius_A)(xt).numpy()
        env = envelope(xt[:, 0] ** 2 + xt[:, 1] ** 2, cfg.near_sd_fraction**2, cfg.near_radius_A).numpy()
        var = cfg.level_sd**2 + (cfg.offset_sd * env) ** 2 + cfg.site_sd**2
        return mean, var

    def _site_update(self, rows: np.ndarray, damping: float) -> None:
        """EP site update of ``rows`` from their last marginals (cavity = marginal / old site)."""
        if len(rows) == 0:
            return
        prec = 1.0 / self._var[rows]
        cav_tau = prec - self._tau[rows]
        cav_nu = self._mu[rows] * prec - self._nu[rows]
        bad = cav_tau <= 1e-8  # should not happen for a log-concave likelihood; fall back on the prior
        if np.any(bad):
            pm, pv = self._prior_marginals(self._x[rows[bad]])
            cav_tau[bad] = 1.0 / pv
            cav_nu[bad] = pm / pv
        t_mean, t_var = tilted_moments(cav_nu / cav_tau, 1.0 / cav_tau, self._k[rows], self._e[rows])
        new_tau = np.maximum(1.0 / t_var - cav_tau, 0.0)
        new_nu = t_mean / t_var - cav_nu
        self._tau[rows] = (1 - damping) * self._tau[rows] + damping * new_tau
        self._nu[rows] = (1 - damping) * self._nu[rows] + damping * new_nu
        self._gp = None

    def _model(self) -> _RateGP | None:
        stale = np.flatnonzero(self._stale)
        if len(stale):
            self._site_update(stale, 1.0)
            self._stale[:] = False
        if self._gp is None and self.n_cells:
            keep = self._tau > 1e-8
            tau = np.where(keep, self._tau, 1.0)
            y = np.where(keep, self._nu / tau, 0.0)
            noise = np.where(keep, 1.0 / tau, 1e8)
            lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(
                noise=torch.as_tensor(noise, dtype=self.dtype, device=self.device), learn_additional_noise=False
            )
            gp = _RateGP(torch.as_tensor(self._x, dtype=self.dtype, device=self.device),
                         torch.as_tensor(y, dtype=self.dtype, device=self.device), lik, self.cfg).to(self.device)
            gp.eval()
            lik.eval()
            self._gp = gp
        return self._gp

    def predict(self, x: np.ndarray, with_sd: bool = True, sweep: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and sd ``(m,)`` of ``log rate`` (1/s) at inputs ``x`` ``(m, 4)``:
        ``(along_A, across_A, site_x_A, site_y_A)``. Without data: the prior. With ``sweep`` the
        same GP call also gives the cells' marginals and one EP sweep follows (for the next call)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, 4)
        gp = self._model()
        if gp is None:
            mean, var = self._prior_marginals(x)
            return mean, (np.sqrt(var) if with_sd else np.zeros(len(x)))
        n = self.n_cells
        q = np.concatenate([self._x, x]) if (sweep and with_sd) else x
        qt = torch.as_tensor(q, dtype=self.dtype, device=self.device)
        with torch.no_grad(), gpytorch.settings.fast_computations(False, False, False), \
                gpytorch.settings.skip_posterior_variances(not with_sd), warnings.catch_warnings():
            warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
            post = gp(qt)
            mean = post.mean.cpu().numpy()
            var = post.variance.clamp_min(1e-10).cpu().numpy() if with_sd else np.zeros(len(q))
        if sweep and with_sd:
            self._mu, self._var = mean[:n].copy(), var[:n].copy()
            self._site_update(np.arange(n), self.cfg.ep_damping)
            mean, var = mean[n:], var[n:]
        return mean, np.sqrt(var)

    def predict_joint(self, x: np.ndarray, sweep: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean ``(m,)`` and covariance ``(m, m)`` of ``log rate`` at inputs ``x`` ``(m, 4)``
        (what the acquisition's lookahead conditions on); ``sweep`` as in :meth:`predict`."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, 4)
        gp = self._model()
        xt = torch.as_tensor(x, dtype=self.dtype, device=self.device)
        if gp is None:
            cfg = self.cfg
            with torch.no_grad():
                mean = PhysicsPriorMean(math.log(cfg.prior_peak_rate_per_s), cfg.prior_width_A, cfg.prior_floor,
                                        cfg.prior_floor_radius_A)(xt)
                cov = HopRateKernel(cfg).forward(xt, xt)
            return mean.cpu().numpy(), cov.cpu().numpy()
        n = self.n_cells
        q = torch.cat([torch.as_tensor(self._x, dtype=self.dtype, device=self.device), xt]) if sweep else xt
        with torch.no_grad(), gpytorch.settings.fast_computations(False, False, False), warnings.catch_warnings():
            warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
            post = gp(q)
            mean = post.mean.cpu().numpy()
            cov = post.covariance_matrix.cpu().numpy()
        if sweep:
            self._mu, self._var = mean[:n].copy(), np.maximum(np.diag(cov)[:n].copy(), 1e-10)
            self._site_update(np.arange(n), self.cfg.ep_damping)
            mean, cov = mean[n:], cov[n:, n:]
        return mean, cov

    def fit(self, sweeps: int | None = None) -> None:
        """Full EP sweeps (each one GP evaluation at the cells)."""
        for _ in range(self.cfg.ep_sweeps if sweeps is None else sweeps):
            if self.n_cells == 0:
                return
            self.predict(np.zeros((0, 4)), with_sd=True, sweep=True)

    def summary(self) -> dict[str, float]:
        return {
            "cells": float(self.n_cells),
            "hops": float(self.n_hops),
            "exposure_s": float(self._e.sum()),
            "damage_rate_per_s": self.damage_rate_per_s(),
        }
