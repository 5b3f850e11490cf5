"""Gaussian-process model of specimen drift ``d(t)`` (Å) over acquisition time ``t`` (s).

One GPyTorch exact GP per axis (a batch of two, each with its own hyperparameters) on
observations of the displacement at known times. The covariance of ``d`` is a sum of

- a trend: a degree-1 polynomial kernel (a level plus a steady drift; the slope's prior scale
  is at least ``min_slope_A_per_s``),
- a smooth Matérn-5/2 term (slow wobble, thermal settling; lengthscale of seconds),
- a short-range Matérn-1/2 term (an Ornstein-Uhlenbeck process with a 100 s lengthscale:
  over a window of seconds a random walk, whose diffusion is kept within
  ``random_walk_A_per_sqrt_s``),

and each observation also carries

- a group offset: observations of one group (one time bin of one scan geometry, see
  :mod:`~stemagent.drift.stage`) share an unknown constant, so that whatever the reference
  positions of that bin's atoms got wrong is marginalised instead of read as drift,
- white noise: the variance each observation brings from the atom-position uncertainties the
  segmenter reports (fixed, per observation), plus a learned extra variance.

Forecasts are of the latent ``d(t)`` alone (no offset, no noise). Hyperparameters are fitted by
maximising GPyTorch's exact marginal likelihood with BoTorch's scipy L-BFGS-B driver, from two
starts (the last fit, i.e. a warm start, and the initial values; the better one wins), after
moving any hyperparameter stuck on a bound of its interval back inside. Per frame, the posterior
is one Cholesky factorisation of the model's own covariance (see :meth:`DisplacementGP._posterior_cache`).
Inputs are centred on the newest observation time, so a 10-minute run never sees large times.

Shapes: ``t_s`` ``(n,)``, ``group`` ``(n,)`` int (``-1``: none), values and variances ``(n, 2)``
(x, y). Everything is float64 on ``device``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import gpytorch
import numpy as np
import torch
from botorch.models.gpytorch import GPyTorchModel
from gpytorch.constraints import Interval
from gpytorch.kernels import Kernel, MaternKernel, PolynomialKernel, ScaleKernel

_BATCH = torch.Size([2])  # one GP per axis (x, y)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the enclosed torch code on ``n`` intra-op threads, then restore the previous count.

    The GP's matrices are small (a few hundred rows): on a busy 2-core machine two OpenMP
    threads spinning against each other made a hyperparameter fit ten times slower (2.5 s
    instead of 0.23 s), so the stage uses one. ``None`` leaves torch's setting alone.
    """
    if n is None or torch.get_num_threads() == n:
        # already there: no switch (a switch of torch's thread pool costs more than a small GP call)
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class GroupOffsetKernel(Kernel):
    """``k(a, b) = 1`` when ``a`` and ``b`` carry the same group index ``>= 0`` in input column 1, else 0.

    Scaled by a :class:`~gpytorch.kernels.ScaleKernel`, it gives each group a shared unknown
    offset of that variance.
    """

    has_lengthscale = False

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, diag: bool = False, **params: Any) -> torch.Tensor:
        g1 = x1[..., 1]
        g2 = x2[..., 1]
        if diag:
            return (g1 >= 0).to(x1.dtype)
        same = (g1.unsqueeze(-1) == g2.unsqueeze(-2)) & (g1.unsqueeze(-1) >= 0)
        return same.to(x1.dtype)


#: lengthscale of the short-range (Ornstein-Uhlenbeck) term, s: over a window of seconds it is a
#: random walk of diffusion ``2 * variance / lengthscale`` (Å²/s)
SHORT_LENGTHSCALE_S = 100.0


class _ExactDriftGP(gpytorch.models.ExactGP, GPyTorchModel):
    """Batch of two exact GPs (x, y axes); a BoTorch model so that BoTorch's fitting routines drive it."""

    _num_outputs = 1

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, likelihood: gpytorch.likelihoods.Likelihood,
                 random_walk_A_per_sqrt_s: tuple[float, float] = (0.005, 0.1), min_slope_A_per_s: float = 0.1) -> None:
        super().__init__(train_x, train_y, likelihood)
        b = _BATCH
        self.mean_module = gpytorch.means.ZeroMean(batch_shape=b)
        # trend: slope_var * (t t' + level_var / slope_var), i.e. level and slope independent
        # (a dense polynomial kernel: gpytorch's LinearKernel is low-rank, and adding a low-rank
        # term to the others sends every solve through a root decomposition)
        self.trend = ScaleKernel(
            PolynomialKernel(power=1, batch_shape=b, active_dims=(0,), offset_constraint=Interval(1e-2, 1e6)),
            batch_shape=b,
            outputscale_constraint=Interval(min_slope_A_per_s**2, 1e2),
        )
        self.smooth = ScaleKernel(
            MaternKernel(nu=2.5, batch_shape=b, active_dims=(0,), lengthscale_constraint=Interval(1.0, 300.0)),
            batch_shape=b,
            outputscale_constraint=Interval(1e-8, 1e2),
        )
        # the random walk's diffusion is capped: a short window cannot tell a steady drift from a
        # fast random walk by likelihood alone, and a random walk forecasts no motion at all
        self.short = ScaleKernel(
            MaternKernel(nu=0.5, batch_shape=b, active_dims=(0,)),
            batch_shape=b,
            outputscale_constraint=Interval(*(0.5 * r**2 * SHORT_LENGTHSCALE_S for r in random_walk_A_per_sqrt_s)),
        )
        self.short.base_kernel.lengthscale = torch.full((2, 1, 1), SHORT_LENGTHSCALE_S)
        self.short.base_kernel.raw_lengthscale.requires_grad_(False)
        self.offset = ScaleKernel(GroupOffsetKernel(batch_shape=b), batch_shape=b, outputscale_constraint=Interval(1e-7, 1.0))
        self.covar_module = self.trend + self.smooth + self.short + self.offset
        self.drift_covar = self.trend + self.smooth + self.short  # d(t) alone

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


#: Starting hyperparameters (per axis): level 1 Å, slope 1 Å/s (trend: slope variance times
#: ``t t' + offset``), wobble 0.3 Å over 5 s, random walk 0.02 Å/sqrt(s) (OU variance 0.02 Å²
#: over 100 s), group offsets 0.05 Å.
INITIAL_HYPERPARAMETERS = {
    "trend.outputscale": 1.0,
    "trend.base_kernel.offset": 1.0,
    "smooth.outputscale": 0.1,
    "smooth.base_kernel.lengthscale": 5.0,
    "short.outputscale": 0.02,
    "offset.outputscale": 2.5e-3,
    "likelihood.second_noise": 1e-5,
}


class DisplacementGP:
    """Exact GP of ``d(t)`` per axis, refreshed with new data every frame and refit when asked.

    ``set_data`` replaces the observations (cheap: one Cholesky per axis when predicting);
    ``fit`` re-optimises the hyperparameters from where they are; ``predict`` gives the
    posterior mean and variance of the latent drift at any times (the prior when there is no data).
    """

    def __init__(self, device: torch.device | str = "cpu", random_walk_A_per_sqrt_s: tuple[float, float] = (0.005, 0.1),
                 min_slope_A_per_s: float = 0.1, threads: int | None = 1) -> None:
        self.device = torch.device(device)
        self.threads = threads
        self.dtype = torch.float64
        self.t_center_s = 0.0
        self.n = 0
        self.fits = 0
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._hyper: dict[str, list[float]] | None = None  # hyperparameters() until they change
        x0 = torch.zeros(2, 1, 2, dtype=self.dtype, device=self.device)
        x0[..., 1] = -1
        y0 = torch.zeros(2, 1, dtype=self.dtype, device=self.device)
        self.likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(
            noise=torch.ones(2, 1, dtype=self.dtype, device=self.device),
            learn_additional_noise=True,
            batch_shape=_BATCH,
            noise_constraint=Interval(1e-8, 1.0),
        )
        self.model = _ExactDriftGP(x0, y0, self.likelihood, random_walk_A_per_sqrt_s, min_slope_A_per_s).to(
            device=self.device, dtype=self.dtype
        )
        self.model.initialize(
            **{k: torch.full((2,), v, dtype=self.dtype) for k, v in INITIAL_HYPERPARAMETERS.items() if not k.startswith("likelihood.")}
        )
        self.likelihood.second_noise = torch.full((2, 1), INITIAL_HYPERPARAMETERS["likelihood.second_noise"], dtype=self.dtype)
        self._hyper = None
        self._initial_raw = self._raw()
        self.model.eval()
        self.likelihood.eval()

    def clear(self) -> None:
        """Forget the observations (the hyperparameters stay, as a warm start)."""
        self.n = 0
        self.t_center_s = 0.0
        self._cache = None

    # --- data ----------------------------------------------------------------------------------
    def _inputs(self, t_s: np.ndarray, group: np.ndarray | None) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(t_s, dtype=np.float64) - self.t_center_s, dtype=self.dtype, device=self.device)
        g = torch.full_like(t, -1.0) if group is None else torch.as_tensor(np.asarray(group, dtype=np.float64), dtype=self.dtype, device=self.device)
        x = torch.stack([t, g], dim=-1)
        return x.unsqueeze(0).expand(2, -1, -1)

    def set_data(self, t_s: np.ndarray, group: np.ndarray, values_A: np.ndarray, variances_A2: np.ndarray) -> None:
        """Observations ``values_A`` ``(n, 2)`` of ``d(t_s) + offset[group]`` with noise variances ``(n, 2)``."""
        t_s = np.asarray(t_s, dtype=np.float64).reshape(-1)
        self.n = len(t_s)
        if self.n == 0:
            return
        self.t_center_s = float(t_s.max())
        x = self._inputs(t_s, group)
        y = torch.as_tensor(np.asarray(values_A, dtype=np.float64).T.copy(), dtype=self.dtype, device=self.device)
        var = torch.as_tensor(np.asarray(variances_A2, dtype=np.float64).T.copy(), dtype=self.dtype, device=self.device)
        self.likelihood.noise = var.clamp_min(1e-12)
        self.model.set_train_data(inputs=x, targets=y, strict=False)
        self._cache = None

    # --- hyperparameters -----------------------------------------------------------------------
    def fit(self, max_iter: int = 40, starts: int = 2) -> float:
        """Maximise the marginal likelihood over the hyperparameters (``max_iter`` L-BFGS steps
        from each of two starts); returns the final negative log marginal likelihood per
        observation (nan with fewer than 4 observations). ``starts=1``: the warm start only."""
        with torch_threads(self.threads):
            return self._fit(max_iter, starts)

    def _fit(self, max_iter: int, n_starts: int) -> float:
        if self.n < 4:
            return math.nan
        from botorch.optim.fit import fit_gpytorch_mll_scipy  # botorch is heavy; only a refit needs it

        self.model.train()
        self.likelihood.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(self.likelihood, self.model)
        # two starts: the last fit (warm) and the initial values; the better optimum wins. The
        # likelihood surface has a second mode where a fast random walk explains a smooth wobble
        # (and forecasts no motion), and a warm start that fell into it does not climb out.
        starts = [None, self._initial_raw][: max(1, n_starts)]
        best: tuple[float, dict[str, torch.Tensor]] | None = None
        try:
            with gpytorch.settings.max_cholesky_size(100_000):
                for start in starts:
                    if start is not None:
                        self._set_raw(start)
                    self._unstick()
                    try:
                        loss = float(fit_gpytorch_mll_scipy(mll, options={"maxiter": int(max_iter)}).fval)
                    except Exception:  # a failed start (e.g. not positive definite): keep the other
                        loss = math.inf
                    if best is None or loss < best[0]:
                        best = (loss, self._raw())
            assert best is not None
            self._set_raw(best[1])
        finally:
            self.model.eval()
            self.likelihood.eval()
            self._cache = None
            self._hyper = None
        self.fits += 1
        return best[0]

    def raw_hyperparameters(self) -> dict[str, torch.Tensor]:
        """The model's raw (unconstrained) parameters, copied: what :meth:`set_raw_hyperparameters` takes."""
        return self._raw()

    def set_raw_hyperparameters(self, raw: dict[str, torch.Tensor]) -> None:
        """Take the raw parameters of another fit of the same model (e.g. one fitted on a copy)."""
        self._set_raw(raw)
        self._cache = None

    def _raw(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    def _set_raw(self, raw: dict[str, torch.Tensor]) -> None:
        self._hyper = None
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(raw[name])

    def _unstick(self) -> None:
        """Move hyperparameters that sit on a bound of their interval to the interval's geometric
        middle before a warm-started fit: there the constraint's sigmoid has no gradient left,
        so a value that hit a bound once (say the extra noise, while the data were few) would
        stay there for the rest of the run."""
        with torch.no_grad():
            for _, raw, constraint in self.model.named_parameters_and_constraints():
                if not raw.requires_grad or not isinstance(constraint, Interval):
                    continue
                lo = float(constraint.lower_bound.min())
                hi = float(constraint.upper_bound.max())
                value = constraint.transform(raw)
                stuck = (value <= lo * 1.05) | (value >= hi / 1.05)
                if bool(stuck.any()):
                    self._hyper = None
                    middle = torch.full_like(value, math.sqrt(lo * hi))
                    raw.copy_(torch.where(stuck, constraint.inverse_transform(middle), raw))

    def hyperparameters(self) -> dict[str, list[float]]:
        """Current hyperparameters per axis ``[x, y]`` in physical units (Å², Å²/s², s).

        Computed once per set of hyperparameters (a fit or :meth:`set_raw_hyperparameters`
        changes them; new data do not); a copy is returned."""
        if self._hyper is None:
            self._hyper = self._hyperparameters()
        return {k: list(v) for k, v in self._hyper.items()}

    def _hyperparameters(self) -> dict[str, list[float]]:
        m = self.model
        out = {
            "level_var_A2": (m.trend.outputscale * m.trend.base_kernel.offset.reshape(2)).reshape(2),
            "slope_var_A2_per_s2": m.trend.outputscale.reshape(2),
            "smooth_var_A2": m.smooth.outputscale.reshape(2),
            "smooth_lengthscale_s": m.smooth.base_kernel.lengthscale.reshape(2),
            "short_var_A2": m.short.outputscale.reshape(2),
            "short_lengthscale_s": m.short.base_kernel.lengthscale.reshape(2),
            "offset_var_A2": m.offset.outputscale.reshape(2),
            "extra_noise_A2": self.likelihood.second_noise.reshape(2),
        }
        return {k: [float(v) for v in t.detach().cpu()] for k, t in out.items()}

    # --- predictions ---------------------------------------------------------------------------
    def _posterior_cache(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(train inputs, Cholesky factor of K + noise, K^-1 y)``, computed once per data set.

        The same exact-GP algebra as gpytorch's ``ExactPredictionStrategy`` on the model's own
        covariance modules, without its lazy-tensor machinery (2-3x less time on 100-400 points,
        the same numbers to 1e-13; checked by the unit tests).
        """
        if self._cache is None:
            x = self.model.train_inputs[0]
            with torch.no_grad():
                k = self.model.covar_module(x).to_dense() + torch.diag_embed(self.likelihood.noise)
                chol, info = torch.linalg.cholesky_ex(k)
                jitter = 1e-10
                while bool(info.any()) and jitter < 1e-2:
                    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
                    chol, info = torch.linalg.cholesky_ex(k + jitter * eye)
                    jitter *= 10.0
                alpha = torch.cholesky_solve(self.model.train_targets.unsqueeze(-1), chol)
            self._cache = (x, chol, alpha)
        return self._cache

    def _posterior(self, x: torch.Tensor, covar: Kernel) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and variance ``(2, m)`` at inputs ``x`` ``(2, m, 2)`` of the process with prior ``covar``."""
        train_x, chol, alpha = self._posterior_cache()
        with torch.no_grad():
            cross = covar(x, train_x).to_dense()  # (2, m, n)
            prior_var = covar(x, diag=True)
            mean = (cross @ alpha).squeeze(-1)
            half = torch.linalg.solve_triangular(chol, cross.transpose(-1, -2), upper=False)
            var = prior_var - (half**2).sum(dim=-2)
        return mean, var.clamp_min(0.0)

    def predict(self, t_s: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean ``(m, 2)`` Å and variance ``(m, 2)`` Å² of the drift at times ``t_s`` ``(m,)``."""
        with torch_threads(self.threads), gpytorch.settings.lazily_evaluate_kernels(False):
            return self._predict(t_s)

    def _predict(self, t_s: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        t = np.atleast_1d(np.asarray(t_s, dtype=np.float64))
        x = self._inputs(t, None)
        if self.n == 0:
            with torch.no_grad():
                var = self.model.drift_covar(x, diag=True)
            return np.zeros((len(t), 2)), var.T.cpu().numpy().copy()
        # the latent drift: the offset kernel is zero at inputs without a group, so the drift's own
        # covariance gives both the cross-covariance and the prior variance
        mean, var = self._posterior(x, self.model.drift_covar)
        return mean.T.cpu().numpy().copy(), var.T.cpu().numpy().copy()

    def predictive_score(self, t_s: np.ndarray, group: np.ndarray, values_A: np.ndarray, variances_A2: np.ndarray) -> float:
        """Mean squared standardised residual of new observations under the current posterior
        (about 1 when the fit still describes the data; large when it went stale)."""
        with torch_threads(self.threads), gpytorch.settings.lazily_evaluate_kernels(False):
            return self._predictive_score(t_s, group, values_A, variances_A2)

    def _predictive_score(self, t_s: np.ndarray, group: np.ndarray, values_A: np.ndarray, variances_A2: np.ndarray) -> float:
        if self.n == 0 or len(t_s) == 0:
            return math.nan
        x = self._inputs(np.asarray(t_s, dtype=np.float64), group)
        mean_t, var_t = self._posterior(x, self.model.covar_module)
        extra = self.likelihood.second_noise.detach().reshape(2, 1)
        mean = mean_t.T.cpu().numpy()
        var = (var_t + extra).T.cpu().numpy() + np.asarray(variances_A2)
        r2 = (np.asarray(values_A) - mean) ** 2 / np.maximum(var, 1e-18)
        return float(np.mean(r2))
