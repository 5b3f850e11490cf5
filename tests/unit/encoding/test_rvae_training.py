"""rVAE training on twin sequences (``stemagent train-rvae``): seeded and reproducible, config
errors that name the field, and the shipped weights: small, strict on load, and good on held-out
twin patches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from stemagent.agent.app.cli import app
from stemagent.agent.app.rvae_training import data_config, evaluate, load_rvae_train_config, twin_patches
from stemagent.encoding.rvae import default_rvae_weights, load_rvae
from stemagent.encoding.rvae_train import RVAETrainConfig
from stemagent.errors import ConfigError, InputError

TINY = {"seed": 2, "steps": 4, "batch_size": 32, "hidden": 8, "decoder_hidden": 8, "checkpoint_every": 2,
        "data": {"sequences": 1, "held_out_sequences": 1, "frames_per_sequence": 2, "frame_px": 64, "specimen_size_A": 30.0,
                 "n_si": 3, "max_c_patches_per_frame": 40}}


def write(tmp_path: Path, name: str, **over: object) -> Path:
    cfg = {**TINY, "out": str(tmp_path / name / "m.pt"), "checkpoint_dir": str(tmp_path / name / "ckpt"), **over}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tiny_seeded_training_twice_gives_identical_weights_and_a_card(tmp_path):
    for name in ("a", "b"):
        result = CliRunner().invoke(app, ["train-rvae", "--config", str(write(tmp_path, name)), "--no-progress"])
        assert result.exit_code == 0, result.output
    a, b = (torch.load(tmp_path / n / "m.pt", weights_only=True) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = yaml.safe_load((tmp_path / "a" / "m.json").read_text())
    assert card["config"]["seed"] == 2 and card["data"]["patches"] > 0 and card["data"]["frames"] == 2
    assert {"reconstruction_mse", "rotation_error_deg_rms", "clean_reconstruction_ratio"} <= set(card["metrics"])
    assert (tmp_path / "a" / "m.md").read_text().startswith("# Model card: m")
    assert sorted(p.name for p in (tmp_path / "a" / "ckpt").iterdir()) == ["rvae_step_000002.pt"]


def test_bad_config_names_the_field_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.sequences=0"):
        load_rvae_train_config(write(tmp_path, "bad", data={**TINY["data"], "sequences": 0}))
    with pytest.raises(ConfigError, match=r"data\.bogus"):
        load_rvae_train_config(write(tmp_path, "bad2", data={"bogus": 1}))
    with pytest.raises(ConfigError, match=r"patch_px=2"):
        load_rvae_train_config(write(tmp_path, "bad3", patch_px=2))
    result = CliRunner().invoke(app, ["train-rvae", "--config", str(write(tmp_path, "bad4", steps=-1))])
    assert result.exit_code == 2 and "steps=-1" in result.output


SHIPPED = default_rvae_weights()


def test_shipped_weights_are_small_and_strict_on_load(tmp_path):
    assert SHIPPED.is_file() and SHIPPED.stat().st_size < 200_000
    with pytest.raises(InputError, match="patch_px=20.*trained on 16 px"):
        load_rvae(SHIPPED, device="cpu", patch_px=20)
    # the header of another model next to these weights
    bad = tmp_path / "w.pt"
    bad.write_bytes(SHIPPED.read_bytes())
    head = yaml.safe_load(SHIPPED.with_suffix(".json").read_text())
    head["spec"]["hidden"] = 32
    bad.with_suffix(".json").write_text(json.dumps(head))
    with pytest.raises(InputError, match=r"rvae.weights=.*w.pt.*do not fit the spec"):
        load_rvae(bad, device="cpu")


def test_shipped_weights_reconstruct_and_orient_held_out_twin_patches():
    model = load_rvae(SHIPPED, device="cpu", patch_px=16)
    head = yaml.safe_load(SHIPPED.with_suffix(".json").read_text())
    cfg = RVAETrainConfig.model_validate(head["config"])
    d = data_config(cfg).model_copy(update={"frames_per_sequence": 2, "doses_e_per_A2": [1e4]})
    held = twin_patches(cfg, d, seed=777, sequences=1, upright=True)  # a seed training never used
    m = evaluate(model, held)
    # against the noiseless patches, decode(encode(x)) keeps most of the structure the mean patch misses
    assert m["clean_reconstruction_ratio"] < 0.5
    assert m["rotation_error_deg_rms"] < 5.0
    x = held.patches[:1]
    with torch.no_grad():
        r = model.decode(model.encode(x)).numpy()
    assert float(((r - held.clean[:1]) ** 2).mean()) < float(((held.clean[:1] - held.clean.mean(0)) ** 2).mean())
    assert np.isfinite(r).all()


def test_si_vacancy_fraction_gives_si_next_to_a_vacancy():
    from stemagent.agent.app.rvae_training import neighbourhood_classes, remove_si_neighbours
    from stemagent.simulators.specimens import build_specimen

    def classes(fraction: float) -> np.ndarray:
        rng = np.random.default_rng(4)
        sp = build_specimen("graphene", size_A=(30.0, 30.0), center_A=(0.0, 0.0), rng=rng, n_si=4, vacancy_per_nm2=0.0)
        removed = remove_si_neighbours(sp, fraction, rng)
        assert removed == (4 if fraction == 1.0 else 0)
        return neighbourhood_classes(sp.sites_A, sp.site_labels())

    assert (classes(0.0) == 3).sum() == 0
    c = classes(1.0)
    assert (c == 3).sum() == 4 and (c == 1).sum() == 0 and (c == -1).sum() == 4  # every Si now beside its own vacancy
    assert (c == 2).sum() == 8  # the vacancies' other two C neighbours
