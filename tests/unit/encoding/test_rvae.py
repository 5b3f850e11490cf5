"""The rVAE: reconstruction, rotation equivariance of the angle and invariance of the content,
seeded training, and clear errors for mismatched weights or patch sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stemagent.encoding.rvae import RVAE, Latents, RVAESpec, load_rvae, save_rvae, wrap_angle
from stemagent.encoding.rvae_train import RVAETrainConfig, fit, synthetic_patches
from stemagent.errors import InputError

CFG = RVAETrainConfig(steps=400, batch_size=64, lr=1e-2, hidden=32, decoder_hidden=32, noise_sigma=0.1, checkpoint_dir=None, seed=3)


@pytest.fixture(scope="module")
def trained() -> RVAE:
    x, _, _ = synthetic_patches(1500, np.random.default_rng(0))
    model, _ = fit(CFG, x)
    return model


def test_decode_of_encode_reconstructs_a_held_out_patch(trained: RVAE) -> None:
    x, _, _ = synthetic_patches(64, np.random.default_rng(11), noise=0.0)
    with torch.no_grad():
        r = trained.decode(trained.encode(x)).numpy()
    mse = float(((r - x) ** 2).mean())
    # a blank guess (the mean patch) leaves the whole variance; the model must explain most of it
    assert mse < 0.25 * float(((x - x.mean(0)) ** 2).mean())


def test_rotated_patch_same_content_angle_differs_by_the_rotation(trained: RVAE) -> None:
    x, _, _ = synthetic_patches(32, np.random.default_rng(5), noise=0.0)
    turned = np.ascontiguousarray(np.rot90(x, axes=(1, 2)))  # a turn by -90 degrees in the patch's (x=col, y=row) axes
    with torch.no_grad():
        a, b = trained.encode(x), trained.encode(turned)
    diff = wrap_angle(b.angle_rad.numpy() - a.angle_rad.numpy() - np.radians(-90.0), 3)
    assert np.degrees(np.abs(diff)).max() < 1.0
    spread = float(a.z.std(0).mean())
    assert float((a.z - b.z).abs().max()) < 0.05 * max(spread, 1e-3) + 1e-4
    # and a known in-plane angle is recovered (modulo 120 degrees) up to one offset (the model's gauge)
    rng = np.random.default_rng(7)
    x2, labels, angles = synthetic_patches(64, rng, noise=0.0, classes=1)
    with torch.no_grad():
        est = trained.encode(x2).angle_rad.numpy()
    d = wrap_angle(est - angles, 3)
    d = wrap_angle(d - d[0], 3)
    assert np.degrees(np.sqrt(np.mean(d ** 2))) < 3.0


def test_training_is_seeded_and_reproducible() -> None:
    x, _, _ = synthetic_patches(300, np.random.default_rng(1))
    cfg = CFG.model_copy(update={"steps": 5})
    m1, _ = fit(cfg, x)
    m2, _ = fit(cfg, x)
    m3, _ = fit(cfg.model_copy(update={"seed": 4}), x)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_mismatched_weights_or_patch_size_fail_clearly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = RVAE(RVAESpec(latent_dim=2, hidden=8, decoder_hidden=8))
    path = save_rvae(model, tmp_path / "m.pt")
    assert load_rvae(path, device="cpu", patch_px=16).spec == model.spec
    with pytest.raises(InputError, match="patch_px.*trained on 16 px"):
        load_rvae(path, device="cpu", patch_px=20)
    head = json.loads(path.with_suffix(".json").read_text())
    head["spec"]["latent_dim"] = 3
    path.with_suffix(".json").write_text(json.dumps(head))
    with pytest.raises(InputError, match="do not fit the spec"):
        load_rvae(path, device="cpu")
    with pytest.raises(InputError, match=r"patches.shape.*\(N, 16, 16\)"):
        model.encode(np.zeros((2, 20, 20), dtype=np.float32))
    with pytest.raises(InputError, match="latents.z.shape"):
        model.decode(Latents(torch.zeros(2), torch.zeros(2, 2), torch.zeros(2, 5)))
    with pytest.raises(InputError, match="no such file"):
        load_rvae(tmp_path / "missing.pt")


def test_encode_and_decode_in_chunks_match_one_pass(trained: RVAE, monkeypatch: pytest.MonkeyPatch) -> None:
    import stemagent.encoding.rvae as rvae_mod

    x, _, _ = synthetic_patches(70, np.random.default_rng(21))
    whole = trained.encode(x)
    rec = trained.decode(whole)
    monkeypatch.setattr(rvae_mod, "ENCODE_CHUNK", 16)
    monkeypatch.setattr(rvae_mod, "DECODE_CHUNK_PX", 3 * 16 * 16)
    parts = trained.encode(x)
    for f in ("angle_rad", "shift_px", "z", "z_logvar"):
        torch.testing.assert_close(getattr(parts, f), getattr(whole, f))
    torch.testing.assert_close(trained.decode(parts), rec)
    assert rec.shape == (70, 16, 16)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_decode_matches_the_training_path_at_any_angle_and_shift(likelihood: str) -> None:
    """``decode`` folds the turn and the shift into the first layer's weights; the training path
    (``decode_logits``) turns the grid itself. They must give the same patches, for angles all the
    way round, shifts of several pixels and a batch that does not fill the last chunk."""
    torch.manual_seed(5)
    model = RVAE(RVAESpec(patch_px=12, latent_dim=3, hidden=16, decoder_hidden=24, likelihood=likelihood)).eval()
    g = torch.Generator().manual_seed(6)
    n = 131
    lat = Latents((torch.rand(n, generator=g) * 2 - 1) * np.pi, torch.randn(n, 2, generator=g) * 3.0, torch.randn(n, 3, generator=g) * 2.0)
    with torch.no_grad():
        want = model.decode_logits(lat.angle_rad, lat.shift_px, lat.z)
    if likelihood == "bernoulli":
        want = torch.sigmoid(want)
    got = model.decode(lat)
    assert got.shape == (n, 12, 12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the angle and the shift matter: a turned copy decodes differently
    moved = model.decode(Latents(lat.angle_rad + 0.5, lat.shift_px, lat.z))
    assert float((moved - got).abs().max()) > 1e-3
