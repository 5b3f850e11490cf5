"""The encoding stage on twin frames, its outputs, its config, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from stemagent.encoding import EncodingConfig, EncodingStage
from stemagent.encoding.patches import extract_patches, patch_anchors
from stemagent.encoding.zernike import ZernikeBasis, zernike_moments_at
from stemagent.errors import InputError
from stemagent.simulators import render_sample
from stemagent.simulators.fast_adf import ADFModel
from stemagent.simulators.motifs import frame_motifs
from stemagent.simulators.specimens import build_specimen
from stemagent.types import Atoms, Frame, ScanGeometry


def twin_frame(seed: int, n_si: int = 6, dose: float = 1e5, index: int = 0):
    rng = np.random.default_rng(seed)
    geo = ScanGeometry(fov_A=(25.6, 25.6), shape_px=(256, 256), rotation_rad=float(rng.uniform(0, 3)), dwell_s=1e-6)
    sp = build_specimen("graphene", size_A=(40.0, 40.0), rng=rng, n_si=n_si, vacancy_per_nm2=0.0)
    adf = ADFModel(z_exponent=1.7, sigma_C_A2=0.0008)
    img, truth = render_sample("graphene", geo, dose, rng, adf=adf, specimen=sp)
    motifs, names = frame_motifs(sp, truth)
    frame = Frame(image=img, geometry=geo, line_times_s=geo.line_start_times_s(0.0), index=index, dose_e_per_A2=dose)
    atoms = Atoms(truth.positions_A, np.zeros(len(motifs), dtype=int), np.ones(len(motifs)), index)
    return frame, atoms, motifs, names


def test_stage_outputs_and_si_gets_its_own_motif() -> None:
    stage = EncodingStage(EncodingConfig(seed=0))
    frame, atoms, truth, names = twin_frame(1)
    out = stage.process(frame, atoms)
    n, k = len(atoms), 36
    assert out["zernike_magnitude"].shape == (n, k) and out["zernike_moment"].shape == (n, k)
    assert out["symmetry"].shape == (n, 4) and list(out["symmetry_folds"]) == [2, 3, 4, 6]
    enc = out["encoded"]
    assert enc.sum() > 0.7 * n and np.all(np.isnan(out["zernike_magnitude"][~enc]))
    assert np.all(out["motif"][~enc] == -1) and np.all(out["motif"][enc] >= 0)
    si = enc & (truth == names.index("dopant"))
    host = enc & (truth == names.index("host"))
    assert si.sum() >= 3
    si_motif = np.bincount(out["motif"][si]).argmax()
    host_motif = np.bincount(out["motif"][host]).argmax()
    assert si_motif != host_motif
    assert np.mean(out["motif"][si] == si_motif) == 1.0 and np.mean(out["motif"][host] == host_motif) > 0.97
    # graphene host atoms are threefold
    assert np.median(out["symmetry"][host, 1]) > 0.5
    rep = stage.last_report
    assert rep["library_size"] >= 2 and rep["encoded"] == int(enc.sum())
    assert "motif_cells" in rep and rep["motif_cells"]["types"][0]["count"] > 0.8 * host.sum() / 2


def test_motif_ids_are_stable_across_frames() -> None:
    stage = EncodingStage(EncodingConfig(seed=0))
    ids = []
    for i, seed in enumerate((11, 12, 13)):
        frame, atoms, truth, names = twin_frame(seed, index=i)
        out = stage.process(frame, atoms)
        enc = out["encoded"]
        si = enc & (truth == names.index("dopant"))
        host = enc & (truth == names.index("host"))
        ids.append((np.bincount(out["motif"][host]).argmax(), np.bincount(out["motif"][si]).argmax()))
    assert len(set(ids)) == 1, ids


def test_config_forbids_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ValidationError):
        EncodingConfig(n_maxx=8)
    with pytest.raises(ValidationError):
        EncodingConfig(clustering="kmeans")
    with pytest.raises(InputError, match="subpixel_steps"):
        EncodingStage(EncodingConfig(subpixel_steps=7))


def test_no_atoms_is_a_clear_error() -> None:
    frame, atoms, _, _ = twin_frame(2, n_si=0)
    empty = Atoms(np.zeros((0, 2)), np.zeros(0, dtype=int), np.zeros(0), 0)
    with pytest.raises(InputError, match="atoms=0"):
        EncodingStage().process(frame, empty)


def test_nan_in_the_image_or_positions_is_a_clear_error() -> None:
    frame, atoms, _, _ = twin_frame(3, n_si=0)
    frame.image[10, 20] = np.nan
    with pytest.raises(InputError, match=r"frame.image\[10, 20\]"):
        EncodingStage().process(frame, atoms)
    frame, atoms, _, _ = twin_frame(3, n_si=0)
    atoms.positions_A[5, 1] = np.nan
    with pytest.raises(InputError, match=r"atoms.positions_A\[5\]"):
        EncodingStage().process(frame, atoms)


def test_a_patch_off_the_image_is_a_clear_error() -> None:
    img = torch.zeros(64, 64)
    centres = torch.tensor([[30.0, 30.0], [3.0, 40.0]])
    with pytest.raises(InputError, match=r"centres_rc\[1\].*leaves the 64x64 image"):
        extract_patches(img, centres, 16)
    with pytest.raises(InputError, match=r"centres_rc\[1\]"):
        zernike_moments_at(img, centres, ZernikeBasis(4, 16, 6.0))
    with pytest.raises(InputError, match=r"centres_rc\[0\].*finite"):
        patch_anchors(torch.tensor([[np.nan, 3.0]]), 16, (64, 64))


def test_atoms_near_the_edge_are_left_unencoded_not_an_error() -> None:
    frame, atoms, _, _ = twin_frame(4, n_si=0)
    out = EncodingStage().process(frame, atoms)
    rc = frame.geometry.sample_to_pixel(atoms.positions_A)
    edge = (rc.min(axis=1) < 3) | (rc.max(axis=1) > 252)
    assert edge.any() and not out["encoded"][edge].any()
