"""The shipped U-Net segmenter: finds a fresh twin frame's atoms; clear errors on bad input."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stemagent.agent.app.segmenter_training import LABEL_OFFSET, twin_frame
from stemagent.config import config_from_dict
from stemagent.errors import InputError
from stemagent.segmentation.metrics import match
from stemagent.segmentation.train import TrainConfig, TrainingSample, train
from stemagent.segmentation.unet import DefaultUNet, DilatedUNet, fuse_batchnorm
from stemagent.segmentation.unet_segmenter import UNetSegmenter, default_weights_path
from stemagent.types import Frame, ScanGeometry

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def seg() -> UNetSegmenter:
    return UNetSegmenter(device="cpu")


def _frame(kind: str, dose: float, seed: int, shape: int = 256, pixel_A: float = 0.1):
    image, truth = twin_frame(kind, shape, pixel_A, dose, np.random.default_rng(seed), clean=True)
    g = truth.geometry
    return Frame(image=image, geometry=g, line_times_s=g.line_start_times_s(0.0), index=3, dose_e_per_A2=dose), truth


def _scores(atoms, truth, kind):
    g = truth.geometry
    kt = g.contains(truth.positions_A, 1.0)
    kp = g.contains(atoms.positions_A, 1.0)
    m = match(atoms.positions_A[kp], atoms.classes[kp], truth.positions_A[kt], truth.labels[kt] + LABEL_OFFSET[kind])
    err = [np.linalg.norm(atoms.positions_A[kp][i] - truth.positions_A[kt][j]) for i, j in zip(m.pred_idx, m.true_idx)]
    return m, np.asarray(err)


def test_shipped_weights_and_card_exist():
    w = default_weights_path()
    assert w.is_file() and w.with_suffix(".json").is_file()
    assert w.stat().st_size < 5_000_000


# Stated thresholds (fresh twin frames, 25.6 Å at 0.1 Å/px, seeds never used in training):
# the main class of each specimen at 1e4 e/Å² with F1 >= 0.97, sub-pixel positions.
@pytest.mark.parametrize("kind,cls", [("graphene", "C"), ("mos2", "metal"), ("mos2", "chalcogen")])
def test_finds_the_atoms_of_a_fresh_twin_frame(seg, kind, cls):
    frame, truth = _frame(kind, 1e4, seed=1234)
    atoms = seg.find(frame)
    m, err = _scores(atoms, truth, kind)
    assert m.f1(seg.class_names.index(cls)) >= 0.97
    assert np.sqrt(np.mean(err**2)) < 0.15  # Å
    assert atoms.class_names == seg.class_names
    assert atoms.frame_index == 3
    assert np.all(np.isfinite(atoms.uncertainty_A)) and np.all(atoms.uncertainty_A > 0)
    assert np.all((atoms.confidence >= 0) & (atoms.confidence <= 1))
    assert atoms.times_s is not None and np.all(atoms.times_s >= 0)


def test_other_sampling_is_resampled_and_mapped_back(seg):
    # the same specimen area at 0.07 Å/px: positions must still land on the truth
    frame, truth = _frame("mos2", 1e4, seed=77, shape=320, pixel_A=0.07)
    atoms = seg.find(frame)
    m, err = _scores(atoms, truth, "mos2")
    assert m.f1(seg.class_names.index("metal")) >= 0.97
    assert np.sqrt(np.mean(err**2)) < 0.15


def test_batch_equals_single(seg):
    f1, _ = _frame("graphene", 1e5, seed=5, shape=128)
    f2, _ = _frame("mos2", 1e5, seed=6, shape=128)
    both = seg.find_batch([f1, f2])
    for a, f in zip(both, (f1, f2)):
        b = seg.find(f)
        assert len(a) == len(b)
        assert np.allclose(a.positions_A, b.positions_A, atol=5e-3)  # batched convolutions round differently


def test_bad_inputs_give_clear_errors(seg):
    with pytest.raises(InputError, match=r"image\.shape"):
        seg.find_pixels(np.zeros((4, 64, 64)), 0.1)
    with pytest.raises(InputError, match=r"image\.shape"):
        seg.find_pixels(np.zeros((0, 0)), 0.1)
    img = np.ones((64, 64))
    img[5, 9] = np.nan
    with pytest.raises(InputError, match=r"image\[5,9\]"):
        seg.find_pixels(img, 0.1)
    with pytest.raises(InputError, match=r"image\.shape"):
        seg.find_pixels(np.ones((8, 8)), 0.1)  # 0.8 Å: too small a field of view for the model
    g = ScanGeometry(fov_A=(6.4, 6.4), shape_px=(64, 64))
    bad = np.ones((64, 64), dtype=np.float32)
    bad[1, 2] = np.inf
    with pytest.raises(InputError, match=r"frames\[0\]\.image\[1,2\]"):
        seg.find(Frame(image=bad, geometry=g, line_times_s=g.line_start_times_s(0.0), index=0, dose_e_per_A2=1.0))
    with pytest.raises(InputError, match="threshold"):
        UNetSegmenter(device="cpu", threshold=1.5)
    with pytest.raises(InputError, match="weights"):
        UNetSegmenter(Path("/nonexistent/w.pt"), device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device"):
            UNetSegmenter(device="cuda")


def test_blank_frame_gives_no_atoms(seg):
    g = ScanGeometry(fov_A=(12.8, 12.8), shape_px=(128, 128))
    atoms = seg.find(Frame(image=np.zeros((128, 128), np.float32), geometry=g, line_times_s=g.line_start_times_s(0.0), index=0, dose_e_per_A2=0.0))
    assert len(atoms) == 0


def test_config_and_factory_build_it():
    from stemagent.agent.app.factory import build_segmenter

    cfg = config_from_dict({"pipeline": {"segmenter": {"kind": "unet", "device": "cpu", "threshold": 0.45}}})
    s = build_segmenter(cfg)
    assert isinstance(s, UNetSegmenter) and s.threshold == 0.45 and s.device.type == "cpu"


@pytest.mark.parametrize("net,multiple", [(DilatedUNet(7), 4), (DefaultUNet(7), 8)])
def test_networks_shapes_and_bn_fusion(net, multiple):
    torch.manual_seed(0)
    net.train()
    x = torch.randn(2, 1, 8 * multiple, 4 * multiple)
    for _ in range(2):
        net(x)  # populate running statistics
    net.eval()
    with torch.no_grad():
        ref = net(x)
        fused = fuse_batchnorm(net)(x)
    assert ref.shape == (2, 8, 8 * multiple, 4 * multiple)
    assert torch.allclose(ref, fused, atol=1e-4)


def _toy_source(rng):
    # a square lattice of Gaussian atoms, class 0, at 0.1 Å/px
    n = 64
    rc = np.stack(np.meshgrid(np.arange(6, n, 12.0), np.arange(6, n, 12.0), indexing="ij"), -1).reshape(-1, 2) + rng.uniform(-2, 2, (25, 2))
    r, c = np.mgrid[0:n, 0:n]
    img = sum(np.exp(-((r - y) ** 2 + (c - x) ** 2) / 18.0) for y, x in rc)
    return TrainingSample(image=rng.poisson(20 * img).astype(np.float32), pixel_A=0.1, rc=rc, labels=np.zeros(len(rc), int), meta={})


def test_training_is_reproducible_and_writes_a_card(tmp_path):
    def run(name):
        cfg = TrainConfig(steps=3, batch_size=2, crop_A=6.4, out=tmp_path / name / "w.pt", checkpoint_dir=tmp_path / name / "ck", checkpoint_every=2, arch_kwargs={"widths": [4, 8, 8], "dilations": [1, 2]})
        card = train(cfg, _toy_source, show_progress=False)
        return cfg, card

    cfg_a, card = run("a")
    cfg_b, _ = run("b")
    sa = torch.load(cfg_a.out, weights_only=True)
    sb = torch.load(cfg_b.out, weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert cfg_a.out.with_suffix(".json").is_file() and cfg_a.out.with_suffix(".md").is_file()
    assert (cfg_a.checkpoint_dir / "step_000002.pt").is_file()
    assert card["trained"]["steps"] == 3 and math.isfinite(card["trained"]["final_loss_ema"])
    # the card is enough to load the weights as a segmenter
    UNetSegmenter(cfg_a.out, device="cpu")


def test_whole_number_analog_frames_are_not_taken_as_counts() -> None:
    # issue 12 item 2: a uint32 HAADF image with an offset of millions was taken as electron
    # counts because its pixels are whole numbers, and a third of the chalcogen columns of a
    # defect-free MoS2 frame came out "column-vacancy"; adding 0.25 to every pixel changed that
    from tests.unit.segmentation.test_segmenter_detector_model import twin

    seg = UNetSegmenter(device="cpu")
    names = np.asarray(seg.class_names)
    img = twin("mos2", 1e4, "analog uint32, offset 3e6")
    whole = names[seg.find_pixels(img, 0.1)["classes"]]
    assert seg.last_detector is not None and seg.last_detector.kind == "analog"
    shifted = names[seg.find_pixels(img.astype(np.float64) + 0.25, 0.1)["classes"]]
    chalcogen = int(np.sum(whole == "chalcogen"))
    assert chalcogen > 60
    assert int(np.sum(whole == "column-vacancy")) <= 1, dict(zip(*np.unique(whole, return_counts=True)))
    assert abs(int(np.sum(shifted == "chalcogen")) - chalcogen) <= 1


def test_a_defect_label_must_be_earned_on_defect_free_frames() -> None:
    # issue 12 item 3: at 1e3 e/Å2 about one carbon in ten gives no count, and the class stage
    # called 2-3 % of a defect-free graphene frame "vacancy" or "Si"; a defect label now needs a
    # likelihood ratio against the host class set for at most 0.5 % false labels
    from stemagent.segmentation.intensity import MIN_EVIDENCE_NATS
    from tests.unit.segmentation.test_segmenter_detector_model import twin

    seg = UNetSegmenter(device="cpu")
    names = np.asarray(seg.class_names)
    host = false = 0
    for seed in (0, 5):
        out = seg.find_pixels(twin("graphene", 1e3, "counting uint16", seed=seed), 0.1)
        cls = names[out["classes"]]
        host += int(np.isin(cls, ["C", "Si", "vacancy"]).sum())
        defect = np.isin(cls, ["Si", "vacancy"])
        false += int(defect.sum())
        assert np.all(out["evidence_nats"][defect] >= MIN_EVIDENCE_NATS)
    assert host > 400
    assert false <= 0.005 * host, (false, host)


def test_a_well_evidenced_vacancy_keeps_its_label_and_its_evidence_is_logged() -> None:
    from stemagent.codec import decode_atoms, encode_atoms
    from stemagent.simulators import render_sample
    from stemagent.types import ScanGeometry

    rng = np.random.default_rng(11)
    g = ScanGeometry(fov_A=(25.6, 25.6), shape_px=(256, 256), dwell_s=2e-6)
    img, truth = render_sample("graphene", g, 3e4, rng, specimen_options={"si_per_nm2": 0.0, "vacancy_per_nm2": 0.5})
    n_vac = int(np.sum(np.asarray(truth.class_names)[truth.labels] == "vacancy"))
    assert n_vac >= 2
    seg = UNetSegmenter(device="cpu")
    frame = Frame(image=img, geometry=truth.geometry, line_times_s=truth.geometry.line_start_times_s(0.0), index=0, dose_e_per_A2=3e4)
    atoms = seg.find(frame)
    vac = atoms.classes == seg.class_names.index("vacancy")
    assert atoms.evidence_nats is not None
    assert int(vac.sum()) >= n_vac - 1 and np.all(atoms.evidence_nats[vac] > 5.3)
    back = decode_atoms(encode_atoms(atoms))
    assert back.evidence_nats is not None and np.allclose(back.evidence_nats, atoms.evidence_nats)


def test_a_si_half_cut_by_the_frame_edge_stays_a_si_and_no_carbon_becomes_one() -> None:
    # issue 15 finding: a survey's sub-scans meet on their edges, and a Si 0.4-1.5 Å from a
    # sub-scan's edge came back as carbon with 0 nats (inside intensity_margin_A the count mixture
    # did not decide, and the network's own odds, 5-8 nats, often missed ln 200); edge sites are
    # now decided on their in-frame pixels against a widened host band
    from stemagent.config import TwinConfig
    from stemagent.simulators import render_sample
    from stemagent.simulators.factory import adf_from_config, optics_from_config
    from stemagent.types import ScanGeometry

    px, n = 0.2, 128  # the survey benchmark's sub-scans: 25.6 Å at 128 px, 1e5 e/Å2, its twin optics
    cfg = TwinConfig(specimen="graphene", energy_keV=60.0, convergence_mrad=30.0, C30_A=1000.0, source_fwhm_A=0.4, background=0.002)
    g = ScanGeometry(fov_A=(64.0, 64.0), shape_px=(320, 320), dwell_s=2e-6)
    img, truth = render_sample("graphene", g, 1e5, np.random.default_rng(3), optics=optics_from_config(cfg), adf=adf_from_config(cfg),
                               specimen_options={"si_per_nm2": 0.15, "vacancy_per_nm2": 0.0})
    names = np.asarray(truth.class_names)
    si_rc = g.sample_to_pixel(truth.positions_A[names[truth.labels] == "Si"])
    seg = UNetSegmenter(device="cpu")
    si = seg.class_names.index("Si")
    evidence, false_si, crops = [], 0, 0
    for r, c in np.rint(si_rc).astype(int):
        for k in (2, 6):  # the Si 0.4 or 1.2 Å inside the crop's left / right / top / bottom edge
            for r0, c0 in ((r - n // 2, c - k), (r - n // 2, c + k - n + 1), (r - k, c - n // 2), (r + k - n + 1, c - n // 2)):
                if min(r0, c0) < 0 or max(r0, c0) + n > 320:
                    continue
                out = seg.find_pixels(img[r0:r0 + n, c0:c0 + n], px)
                rc = out["rc"] + [r0, c0]
                d = np.linalg.norm(rc[:, None, :] - si_rc[None], axis=2).min(axis=1) * px
                j = int(np.argmin(np.linalg.norm(rc - [r, c], axis=1)))
                assert d[j] < 1.0 and out["classes"][j] == si, (r0, c0, seg.class_names[out["classes"][j]])
                evidence.append(float(out["evidence_nats"][j]))
                false_si += int(np.sum((out["classes"] == si) & (d > 1.0)))
                crops += 1
    assert crops >= 10
    # the in-frame half of a Si is far brighter than any carbon: tens of nats, not the network's 5-8
    assert min(evidence) > 20.0, evidence
    assert false_si == 0
