"""Surrogates of the survey: BoTorch GPs from candidate inputs to the objective, warm-started.

Two models with one interface (:class:`Surrogate`):

- :class:`GPSurrogate`: BoTorch's ``SingleTaskGP`` over ``(x, y, overview features...)`` with an
  additive kernel: a short-range isotropic RBF over position (dopant clusters are local) plus an
  ARD RBF over the features with BoTorch's dimension-scaled lengthscale prior (what the overview
  says about a sub-scan holds anywhere in the field);
- :class:`DeepKernelSurrogate`: a deep-kernel GP: a small MLP embeds the overview patch of each
  candidate into a few dimensions; the same position kernel plus an ARD RBF over the embedding; the MLP
  weights are fitted with the kernel hyperparameters by exact marginal likelihood. Its first layer
  starts on the whitened principal directions of all candidates' patches (unsupervised).

Both take raw inputs ``X`` ``(n, d)`` (positions in Å, features in their own units) and map them
to the unit cube with a fixed ``Normalize`` transform whose bounds come from the whole candidate
set (so the transform does not move as data arrive), and standardise the outcome.

Warm start: :meth:`Surrogate.update` builds the model on the new data and loads the last
hyperparameters (and MLP weights); only when ``refit`` is set does it run L-BFGS, starting from
those values, for at most ``fit_maxiter`` iterations. No random restarts: a fit is deterministic
given its inputs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from botorch.models import SingleTaskGP
from botorch.models.transforms.input import Normalize
from botorch.models.transforms.outcome import Standardize
from botorch.optim.fit import fit_gpytorch_mll_scipy
from gpytorch.constraints import Interval
from gpytorch.kernels import AdditiveKernel, Kernel, RBFKernel, ScaleKernel
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.priors import GammaPrior, LogNormalPrior
from linear_operator.utils.errors import NotPSDError

_SKIP = ("outcome_transform", "input_transform")


@dataclass(frozen=True)
class FitReport:
    """What one :meth:`Surrogate.update` did; ``failed`` says why a refit was abandoned (the last
    good hyperparameters were kept)."""

    refit: bool
    fit_s: float
    iterations: int
    mll: float | None
    failed: str | None = None


class Surrogate(Protocol):
    """A model of the objective over candidate inputs. ``model`` is the BoTorch model acquisition
    functions use; ``update`` replaces its data (and refits when asked)."""

    model: SingleTaskGP | None

    def update(self, X: torch.Tensor, Y: torch.Tensor, refit: bool) -> FitReport: ...

    def summary(self) -> dict[str, Any]: ...


def _bounds(X_all: torch.Tensor) -> torch.Tensor:
    lo = X_all.min(dim=0).values
    hi = X_all.max(dim=0).values
    hi = torch.where(hi - lo > 1e-9, hi, lo + 1.0)
    return torch.stack([lo, hi])


class _WarmStartedGP:
    """Shared warm-start and fit logic; subclasses say how to build the model."""

    def __init__(self, X_all: torch.Tensor, fit_maxiter: int) -> None:
        self.bounds = _bounds(X_all)
        self.fit_maxiter = int(fit_maxiter)
        self.model: SingleTaskGP | None = None
        self._state: dict[str, torch.Tensor] | None = None
        self.n_fits = 0

    def _build(self, X: torch.Tensor, Y: torch.Tensor) -> SingleTaskGP:
        raise NotImplementedError

    def update(self, X: torch.Tensor, Y: torch.Tensor, refit: bool) -> FitReport:
        """New data ``X`` ``(n, d)``, ``Y`` ``(n, 1)``; refit hyperparameters when ``refit`` (or on the first call)."""
        model = self._build(X, Y)
        if self._state is not None:
            model.load_state_dict(self._state, strict=False)
        do_fit = refit or self._state is None
        t0 = time.perf_counter()
        iterations, mll_value = 0, None
        failed = None
        if do_fit:
            mll = ExactMarginalLogLikelihood(model.likelihood, model)
            mll.train()
            try:
                result = fit_gpytorch_mll_scipy(mll, options={"maxiter": self.fit_maxiter})
                iterations = int(result.step or 0)
                mll_value = -float(result.fval) if result.fval is not None and math.isfinite(result.fval) else None
                self.n_fits += 1
            except (NotPSDError, RuntimeError, ValueError) as exc:  # keep the last good hyperparameters
                failed = f"{type(exc).__name__}: {str(exc)[:120]}"
                model = self._build(X, Y)
                if self._state is not None:
                    model.load_state_dict(self._state, strict=False)
        model.eval()
        self._state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(_SKIP)}
        self.model = model
        return FitReport(do_fit, time.perf_counter() - t0, iterations, mll_value, failed)

    def _kernel_summary(self) -> dict[str, Any]:
        m = self.model
        if m is None:
            return {}
        parts = list(m.covar_module.kernels) if isinstance(m.covar_module, AdditiveKernel) else [m.covar_module]
        ls: list[float] = []
        scales: list[float] = []
        for part in parts:
            if isinstance(part, ScaleKernel):
                scales.append(float(part.outputscale.detach()))
                part = part.base_kernel
            inner = getattr(part, "base", part)
            if getattr(inner, "lengthscale", None) is not None:
                ls.extend(float(v) for v in inner.lengthscale.detach().reshape(-1))
        return {
            "lengthscales_unit": [round(v, 6) for v in ls],
            "outputscales": [round(v, 6) for v in scales],
            "noise_std": round(float(m.likelihood.noise.detach().sqrt().mean()), 6),
            "n_train": int(m.train_inputs[0].shape[0]),
            "n_fits": self.n_fits,
        }


def position_kernel(max_lengthscale_unit: float) -> Kernel:
    """Isotropic RBF over the first two (position) inputs, its lengthscale kept short (in the unit
    cube): dopant clusters are local, and a long position lengthscale would let a few empty
    sub-scans speak for the whole field."""
    k = RBFKernel(active_dims=(0, 1), lengthscale_constraint=Interval(1e-3, max_lengthscale_unit))
    return ScaleKernel(k, outputscale_prior=GammaPrior(2.0, 4.0))


def feature_kernel(dims: tuple[int, ...]) -> Kernel:
    """ARD RBF over the overview features with BoTorch's dimension-scaled lengthscale prior."""
    n = len(dims)
    k = RBFKernel(active_dims=dims, ard_num_dims=n,
                  lengthscale_prior=LogNormalPrior(loc=math.sqrt(2) + 0.5 * math.log(max(n, 1)), scale=math.sqrt(3)))
    return ScaleKernel(k, outputscale_prior=GammaPrior(2.0, 4.0))


class GPSurrogate(_WarmStartedGP):
    """``SingleTaskGP`` over raw inputs ``(x, y, features...)`` (see the module docstring), with an
    additive kernel: a short-range position part (clusters) plus an ARD part over the features
    (what the overview says, carried across the whole field)."""

    kind = "gp"

    def __init__(self, X_all: torch.Tensor, fit_maxiter: int, max_position_lengthscale_unit: float = 0.25) -> None:
        super().__init__(X_all, fit_maxiter)
        self.max_position_lengthscale_unit = float(max_position_lengthscale_unit)

    def _build(self, X: torch.Tensor, Y: torch.Tensor) -> SingleTaskGP:
        d = X.shape[-1]
        covar = position_kernel(self.max_position_lengthscale_unit)
        if d > 2:
            covar = covar + feature_kernel(tuple(range(2, d)))
        return SingleTaskGP(X, Y, covar_module=covar, input_transform=Normalize(d, bounds=self.bounds), outcome_transform=Standardize(1))

    def summary(self) -> dict[str, Any]:
        return {"model": self.kind, **self._kernel_summary()}


class PatchEmbeddingKernel(Kernel):
    """ARD RBF over ``MLP(inputs after the first n_plain)``: the deep part of a deep kernel.

    ``x`` ``(..., n, n_plain + n_patch)`` in the unit cube (after ``Normalize``); the first
    ``n_plain`` inputs (the position) are left to another kernel.
    """

    has_lengthscale = False

    def __init__(self, n_plain: int, n_patch: int, embedding_dims: int, hidden: int = 16, seed: int = 0,
                 pca: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.n_plain = n_plain
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_patch, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, embedding_dims), torch.nn.Tanh()
        ).to(torch.float64)
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for p in self.net.parameters():
                fan_in = p.shape[-1] if p.dim() > 1 else hidden
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / math.sqrt(fan_in))
            if pca is not None:  # first layer starts on the patches' principal directions (no labels used)
                mean, comps = pca
                k = min(hidden, comps.shape[0])
                first = self.net[0]
                assert isinstance(first, torch.nn.Linear)
                first.weight[:k] = comps[:k]
                first.bias[:k] = -(comps[:k] @ mean)
        self.base = RBFKernel(
            ard_num_dims=embedding_dims,
            lengthscale_prior=LogNormalPrior(loc=math.sqrt(2) + 0.5 * math.log(embedding_dims), scale=math.sqrt(3)),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[..., self.n_plain :])

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, diag: bool = False, **params: Any) -> torch.Tensor:
        return self.base.forward(self.embed(x1), self.embed(x2), diag=diag, **params)


class DeepKernelSurrogate(_WarmStartedGP):
    """Deep-kernel GP over raw inputs ``(x, y, patch...)`` (see the module docstring)."""

    kind = "deep_kernel"

    def __init__(self, X_all: torch.Tensor, fit_maxiter: int, n_plain: int = 2, embedding_dims: int = 2, seed: int = 0,
                 max_position_lengthscale_unit: float = 0.25) -> None:
        super().__init__(X_all, fit_maxiter)
        self.max_position_lengthscale_unit = float(max_position_lengthscale_unit)
        self.n_plain = n_plain
        self.embedding_dims = embedding_dims
        self.seed = seed
        # principal directions of every candidate's patch, in the unit cube the kernel sees
        U = (X_all - self.bounds[0]) / (self.bounds[1] - self.bounds[0])
        P = U[:, n_plain:]
        mean = P.mean(dim=0)
        _, sv, vt = torch.linalg.svd(P - mean, full_matrices=False)
        scale = math.sqrt(max(len(P) - 1, 1)) / sv.clamp_min(1e-12)
        self.pca = (mean, vt * scale[:, None])  # whitened: unit variance along each direction

    def _build(self, X: torch.Tensor, Y: torch.Tensor) -> SingleTaskGP:
        d = X.shape[-1]
        deep = PatchEmbeddingKernel(self.n_plain, d - self.n_plain, self.embedding_dims, seed=self.seed, pca=self.pca)
        covar = position_kernel(self.max_position_lengthscale_unit) + ScaleKernel(deep, outputscale_prior=GammaPrior(2.0, 4.0))
        return SingleTaskGP(X, Y, covar_module=covar, input_transform=Normalize(d, bounds=self.bounds), outcome_transform=Standardize(1))

    def summary(self) -> dict[str, Any]:
        return {"model": self.kind, "embedding_dims": self.embedding_dims, **self._kernel_summary()}


def posterior_mean_sd(model: SingleTaskGP, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and sd of the latent objective ``(n,)`` each, in outcome units, at raw ``X`` ``(n, d)``."""
    with torch.no_grad():
        post = model.posterior(X)
        return post.mean.reshape(-1), post.variance.clamp_min(0.0).sqrt().reshape(-1)
