"""Training frames for the U-Net cover the standard HAADF detector and wide aberrations (issue 12
items 1 and 6): the data distribution draws them, bad names are refused, and the model card lists
the ranges every phase was trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stemagent.agent.app.segmenter_training import TwinSource, load_train_config, training_adf
from stemagent.errors import ConfigError
from stemagent.segmentation.train import DataConfig, TrainConfig, training_ranges
from stemagent.segmentation.unet_segmenter import default_weights_path


def test_the_detector_mix_draws_calibrated_standard_haadf_frames() -> None:
    d = DataConfig(detectors={"standard-haadf": 1.0}, energy_keV={"graphene": 60.0, "mos2": 80.0})
    g = training_adf("graphene", np.random.default_rng(0), d, 30.0)
    m = training_adf("mos2", np.random.default_rng(0), d, 30.0)
    assert g["energy_keV"] == 60.0 and m["energy_keV"] == 80.0
    # 80-200 mrad collects far less per C atom than the legacy power law (0.0025 Å²)
    assert g["adf"].sigma_table is not None and g["adf"].cross_section_A2(np.array([6]))[0] < 0.0025 / 2.5
    # the legacy-only default draws nothing (old configs keep their random streams)
    rng = np.random.default_rng(3)
    assert training_adf("graphene", rng, DataConfig(), 30.0) == {}
    assert rng.uniform() == np.random.default_rng(3).uniform()


def test_haadf_frames_carry_less_signal_at_the_same_dose() -> None:
    def mean_signal(detectors: dict[str, float]) -> float:
        cfg = TrainConfig(crop_A=12.8, data=DataConfig(specimens={"graphene": 1.0}, detectors=detectors, dose_e_per_A2=(1e4, 1e4),
                                                       gain=(1.0, 1.0), offset=(0.0, 0.0), read_noise=(0.0, 0.0)))
        src = TwinSource(cfg)
        return float(np.mean([src(np.random.default_rng(s)).image.mean() for s in range(3)]))

    assert mean_signal({"standard-haadf": 1.0}) < mean_signal({"legacy": 1.0}) / 2.5


def test_the_shipped_config_covers_haadf_and_wide_aberrations(tmp_path) -> None:
    cfg = load_train_config("configs/train-segmenter-haadf.yaml")
    d = cfg.data
    assert set(d.detectors) == {"standard-haadf", "legacy"}
    assert d.defocus_range_A is not None and d.defocus_range_A >= 30.0 and d.astigmatism_A >= 30.0 and d.c30_A[0] < 0 < d.c30_A[1]
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {detectors: {haadf-ish: 1.0}}\n")
    with pytest.raises(ConfigError, match="data.detectors"):
        load_train_config(bad)


def test_the_model_card_lists_its_training_ranges() -> None:
    card = json.loads(default_weights_path().with_suffix(".json").read_text())
    lines = training_ranges(card)
    assert len(lines) >= 3  # every phase
    assert all("dose" in x and "ADF detector" in x and "C12" in x and "specimens" in x for x in lines)
    assert "Training ranges" in default_weights_path().with_suffix(".md").read_text()
