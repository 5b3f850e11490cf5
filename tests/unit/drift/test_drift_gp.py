"""The GPyTorch drift model: exact posterior, prior without data, hyperparameter fitting."""

from __future__ import annotations

import math

import gpytorch
import numpy as np
import torch

from stemagent.drift.gp import DisplacementGP, torch_threads


def _binned_linear(n_frames: int = 10, bins: int = 8, frame_s: float = 0.26, v=(0.4, -0.3), seed: int = 0):
    rng = np.random.default_rng(seed)
    t = (np.arange(n_frames)[:, None] * frame_s + (np.arange(bins)[None, :] + 0.5) / bins * frame_s).ravel()
    group = np.tile(np.arange(bins), n_frames)
    offsets = rng.normal(0, 0.02, (bins, 2))  # each bin's reference is off by its own constant
    z = t[:, None] * np.asarray(v)[None, :] + offsets[group] + rng.normal(0, 0.004, (len(t), 2))
    return t, group, z, np.full(z.shape, 0.004**2)


def test_drift_gp_posterior_equals_gpytorch_exact_prediction() -> None:
    gp = DisplacementGP()
    t, g, z, v = _binned_linear()
    gp.set_data(t, g, z, v)
    t_new = np.array([t.max() + 0.05, t.max() + 0.5, 0.3])
    mean, var = gp.predict(t_new)
    x = gp._inputs(t_new, None)
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10_000), gpytorch.settings.fast_pred_var(False):
        post = gp.model(x)
    np.testing.assert_allclose(mean, post.mean.T.numpy(), atol=1e-9)
    np.testing.assert_allclose(var, post.variance.T.numpy(), rtol=1e-6, atol=1e-12)


def test_drift_gp_without_data_gives_the_prior() -> None:
    gp = DisplacementGP()
    mean, var = gp.predict(np.array([0.0, 1.0]))
    assert np.all(mean == 0.0)
    assert np.all(np.sqrt(var) > 0.5)  # wide: no drift measured yet


def test_drift_gp_fit_recovers_a_linear_drift_through_bin_offsets() -> None:
    gp = DisplacementGP()
    t, g, z, v = _binned_linear()
    gp.set_data(t, g, z, v)
    loss0 = gp.fit(max_iter=1)
    loss = gp.fit(max_iter=60)
    assert loss <= loss0
    # the slope is the drift; the per-bin offsets are not (differences over 0.5 s)
    m0, m1 = gp.predict(np.array([t.max(), t.max() + 0.5]))[0]
    np.testing.assert_allclose((m1 - m0) / 0.5, [0.4, -0.3], atol=0.03)
    hp = gp.hyperparameters()
    assert set(hp) >= {"slope_var_A2_per_s2", "short_var_A2", "offset_var_A2", "extra_noise_A2"}
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in hp.values())


def test_drift_gp_fit_moves_hyperparameters_off_their_bounds() -> None:
    gp = DisplacementGP()
    t, g, z, v = _binned_linear()
    gp.set_data(t, g, z, v)
    lik = gp.likelihood
    lik.second_noise = torch.full((2, 1), 1.0000001e-8, dtype=torch.float64)  # stuck at the lower bound
    gp._unstick()
    assert float(lik.second_noise.min()) > 1e-6


def test_drift_torch_threads_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
