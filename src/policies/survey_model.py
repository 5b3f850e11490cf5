"""Surrogates of the survey: BoTorch GPs from candidate inputs to the objective, warm-started.

Two models with one interface (:class:`Surrogate`):

- :class:`GPSurrogate`: BoTorch's ``SingleTaskGP`` (ARD RBF kernel with its dimension-scaled
  priors) over ``(x, y, overview features...)``;
- :class:`DeepKernelSurrogate`: a deep-kernel GP: a small MLP embeds the overview patch of each
  candidate into a few dimensions, and an ARD RBF kernel runs over ``(x, y, embedding)``; the MLP
  weights are fitted with the kernel hyperparameters by exact marginal likelihood.

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
from gpytorch.kernels import Kernel, RBFKernel
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.priors import LogNormalPrior

_SKIP = ("outcome_transform", "input_transform")


@dataclass(frozen=True)
class FitReport:
    refit: bool
    fit_s: float
    iterations: int
    mll: float | None


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
        if do_fit:
            mll = ExactMarginalLogLikelihood(model.likelihood, model)
            mll.train()
            result = fit_gpytorch_mll_scipy(mll, options={"maxiter": self.fit_maxiter})
            iterations = int(result.step or 0)
            mll_value = -float(result.fval) if result.fval is not None and math.isfinite(result.fval) else None
            self.n_fits += 1
        model.eval()
        self._state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(_SKIP)}
        self.model = model
        return FitReport(do_fit, time.perf_counter() - t0, iterations, mll_value)

    def _kernel_summary(self) -> dict[str, Any]:
        m = self.model
        if m is None:
            return {}
        base = m.covar_module
        base = getattr(base, "base", base)
        ls = base.lengthscale.detach().reshape(-1).tolist() if getattr(base, "lengthscale", None) is not None else []
        return {
            "lengthscales_unit": [round(float(v), 6) for v in ls],
            "noise_std": round(float(m.likelihood.noise.detach().sqrt().mean()), 6),
            "n_train": int(m.train_inputs[0].shape[0]),
            "n_fits": self.n_fits,
        }


class GPSurrogate(_WarmStartedGP):
    """``SingleTaskGP`` over raw inputs ``(x, y, features...)`` (see the module docstring)."""

    kind = "gp"

    def _build(self, X: torch.Tensor, Y: torch.Tensor) -> SingleTaskGP:
        d = X.shape[-1]
        return SingleTaskGP(X, Y, input_transform=Normalize(d, bounds=self.bounds), outcome_transform=Standardize(1))

    def summary(self) -> dict[str, Any]:
        return {"model": self.kind, **self._kernel_summary()}


class PatchEmbeddingKernel(Kernel):
    """ARD RBF over ``(first n_plain inputs, MLP(remaining inputs))``: a deep kernel.

    ``x`` ``(..., n, n_plain + n_patch)`` in the unit cube (after ``Normalize``).
    """

    has_lengthscale = False

    def __init__(self, n_plain: int, n_patch: int, embedding_dims: int, hidden: int = 16, seed: int = 0) -> None:
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
        self.base = RBFKernel(
            ard_num_dims=n_plain + embedding_dims,
            lengthscale_prior=LogNormalPrior(loc=math.sqrt(2) + 0.5 * math.log(n_plain + embedding_dims), scale=math.sqrt(3)),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[..., : self.n_plain], self.net(x[..., self.n_plain :])], dim=-1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, diag: bool = False, **params: Any) -> torch.Tensor:
        return self.base.forward(self.embed(x1), self.embed(x2), diag=diag, **params)


class DeepKernelSurrogate(_WarmStartedGP):
    """Deep-kernel GP over raw inputs ``(x, y, patch...)`` (see the module docstring)."""

    kind = "deep_kernel"

    def __init__(self, X_all: torch.Tensor, fit_maxiter: int, n_plain: int = 2, embedding_dims: int = 2, seed: int = 0) -> None:
        super().__init__(X_all, fit_maxiter)
        self.n_plain = n_plain
        self.embedding_dims = embedding_dims
        self.seed = seed

    def _build(self, X: torch.Tensor, Y: torch.Tensor) -> SingleTaskGP:
        d = X.shape[-1]
        kernel = PatchEmbeddingKernel(self.n_plain, d - self.n_plain, self.embedding_dims, seed=self.seed)
        return SingleTaskGP(X, Y, covar_module=kernel, input_transform=Normalize(d, bounds=self.bounds), outcome_transform=Standardize(1))

    def summary(self) -> dict[str, Any]:
        return {"model": self.kind, "embedding_dims": self.embedding_dims, **self._kernel_summary()}


def posterior_mean_sd(model: SingleTaskGP, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and sd of the latent objective ``(n,)`` each, in outcome units, at raw ``X`` ``(n, d)``."""
    with torch.no_grad():
        post = model.posterior(X)
        return post.mean.reshape(-1), post.variance.clamp_min(0.0).sqrt().reshape(-1)
