"""Acquisition over the survey's discrete candidate set, with pending points and a travel cost.

``ucb`` is BoTorch's ``UpperConfidenceBound`` (``qUpperConfidenceBound`` when sub-scans are
pending, so the pending ones are sampled jointly with each candidate); ``qlognei`` is
``qLogNoisyExpectedImprovement`` with the observed inputs as its baseline and the pending ones as
``X_pending``. Quasi-MC samplers are seeded, so values are reproducible.

All acquisitions come out on one log scale (:class:`LogTravelWeightedAcquisition`): log
acquisitions as they are, others as the log of a softplus. The travel cost is a proximal weight
``exp(-|xy - beam|^2 / (2 L^2))`` centred on the beam's position (the centre of the last
sub-scan), applied in the manner of BoTorch's ``ProximalAcquisitionFunction`` (a softplus of the
base times the weight); BoTorch's own wrapper centres on the last *training* point and refuses
pending points, neither of which fits a beam that may have moved on, so this wrapper does the
same weighting from a given position. All sub-scans carry the same dose, so the dose enters as
budgets (see the policy), not as a weight.

Every candidate is evaluated (the set is small and the values go into the decision's record);
that is ``optimize_acqf_discrete`` with ``q = 1`` done by hand to keep all the values.
"""

from __future__ import annotations

import torch
from botorch.acquisition import AcquisitionFunction, UpperConfidenceBound, qUpperConfidenceBound
from botorch.acquisition.logei import qLogNoisyExpectedImprovement
from botorch.models.model import Model
from botorch.posteriors import GPyTorchPosterior
from botorch.sampling import SobolQMCNormalSampler
from botorch.utils.transforms import t_batch_mode_transform
from torch import Tensor


class LogTravelWeightedAcquisition(AcquisitionFunction):
    """Log of ``base`` times a proximal weight of ``X[..., :2]`` (Å) around ``beam_xy_A``.

    ``log_base``: the base already returns log values (add the log weight); otherwise the base
    goes through a softplus (``beta``) first, as in BoTorch's proximal wrapper, so any
    acquisition comes out on one log scale; with ``log1p_outcome`` a non-log base (UCB of
    ``log(1 + value)``) is mapped back to objective units by ``expm1`` before the softplus, so the
    value reads as the log of an optimistic objective (e.g. dopants) per sub-scan.
    ``travel_length_A`` None: weight one (no travel cost).
    """

    def __init__(self, base: AcquisitionFunction, log_base: bool, beam_xy_A: Tensor | None = None,
                 travel_length_A: float | None = None, beta: float = 10.0, log1p_outcome: bool = False) -> None:
        super().__init__(model=base.model)
        self.base = base
        self.log_base = bool(log_base)
        self.log1p_outcome = bool(log1p_outcome)
        self.beta = float(beta)
        self.travel_length_A = None if travel_length_A is None else float(travel_length_A)
        self.register_buffer("beam_xy_A", None if beam_xy_A is None else beam_xy_A.reshape(1, 1, 2))

    @t_batch_mode_transform(expected_q=1, assert_output_shape=False)  # type: ignore[arg-type]  # botorch's decorator is typed for the base class
    def forward(self, X: Tensor) -> Tensor:
        return self.weigh(self.base(X), X)

    def weigh(self, v: Tensor, X: Tensor) -> Tensor:
        """The log scale and the travel weight applied to base values ``v`` ``(b,)`` at ``X`` ``(b, 1, d)``."""
        if self.log_base:
            out = v
        else:  # back to objective units first when the model sees log(1 + value)
            v = torch.expm1(v) if self.log1p_outcome else v
            out = torch.log(torch.nn.functional.softplus(v, beta=self.beta).clamp_min(1e-300))
        beam = self.beam_xy_A
        if self.travel_length_A is not None and isinstance(beam, Tensor):
            d2 = ((X[..., :2] - beam) ** 2).sum(dim=-1).reshape(out.shape)
            out = out - 0.5 * d2 / self.travel_length_A**2
        return out


def build_acquisition(
    kind: str,
    model: Model,
    X_train: Tensor,
    X_pending: Tensor | None,
    *,
    ucb_beta: float,
    mc_samples: int,
    seed: int,
    beam_xy_A: Tensor | None = None,
    travel_length_A: float | None = None,
    log1p_outcome: bool = False,
) -> LogTravelWeightedAcquisition:
    """The acquisition on a log scale, travel-weighted when ``travel_length_A`` is given.

    ``X_train`` ``(n, d)`` observed raw inputs; ``X_pending`` ``(m, d)`` or None.
    """
    sampler = SobolQMCNormalSampler(sample_shape=torch.Size([mc_samples]), seed=seed)
    pending = X_pending if X_pending is not None and len(X_pending) else None
    base: AcquisitionFunction
    if kind == "ucb":
        base = UpperConfidenceBound(model, beta=ucb_beta) if pending is None else qUpperConfidenceBound(model, beta=ucb_beta, sampler=sampler, X_pending=pending)
        is_log = False
    elif kind == "qlognei":
        base = qLogNoisyExpectedImprovement(model, X_baseline=X_train, sampler=sampler, X_pending=pending, prune_baseline=False)
        is_log = True
    else:
        raise ValueError(f"acquisition={kind!r}: must be 'ucb' or 'qlognei'")
    return LogTravelWeightedAcquisition(base, is_log, beam_xy_A, travel_length_A, log1p_outcome=log1p_outcome)


def candidate_moments(model: Model, X_cand: Tensor) -> tuple[Tensor, Tensor]:
    """Posterior mean and variance ``(n,)`` each of every candidate ``X_cand`` ``(n, d)``, each as a
    q = 1 batch (the shape analytic acquisitions evaluate): one posterior call, no ``n x n`` joint
    covariance."""
    with torch.no_grad():
        post = model.posterior(X_cand.unsqueeze(-2))
        if not isinstance(post, GPyTorchPosterior):
            raise TypeError(f"model={type(model).__name__}: needs a GPyTorch posterior, got {type(post).__name__}")
        return post.mean.reshape(-1), post.variance.reshape(-1)


def evaluate_candidates(acq: AcquisitionFunction, X_cand: Tensor, batch: int = 512,
                        moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Acquisition value ``(n,)`` of every candidate ``X_cand`` ``(n, d)`` (each as a q = 1 batch).

    ``moments``: :func:`candidate_moments` of the same model at the same ``X_cand``; an analytic UCB
    base then takes them instead of asking the model again (BoTorch's own formula,
    ``mean + sqrt(beta) * sqrt(max(var, 1e-12))``, on the same numbers: the same values).
    """
    if moments is not None and isinstance(acq, LogTravelWeightedAcquisition) and type(acq.base) is UpperConfidenceBound:
        base = acq.base
        base.to(X_cand)  # as BoTorch does before its posterior call: beta in the candidates' dtype
        mean, var = moments
        beta = base.beta
        assert isinstance(beta, Tensor)
        with torch.no_grad():
            v = (mean if base.maximize else -mean) + beta.sqrt() * var.clamp_min(1e-12).sqrt()
            return acq.weigh(v, X_cand.unsqueeze(-2)).reshape(-1)
    out = []
    with torch.no_grad():
        for i in range(0, len(X_cand), batch):
            out.append(acq(X_cand[i : i + batch].unsqueeze(1)).reshape(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=X_cand.dtype)
