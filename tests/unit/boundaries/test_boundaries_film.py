"""The twin's boundary film: boundaries from the chain, rendered, read back from the image."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.boundaries.chain import BoundaryChain, ReducedParams
from stemagent.boundaries.config import BoundaryTraceConfig
from stemagent.boundaries.lattice import STEP_VECTORS, path_vertices
from stemagent.boundaries.trace import BoundaryStage
from stemagent.config import load_config
from stemagent.simulators.boundary_film import boundary_film, truth_sequences
from stemagent.simulators.fast_adf import ADFModel
from stemagent.simulators.factory import twin_from_config
from stemagent.simulators.optics import Aberrations, ProbeOptics
from stemagent.simulators.render import render_frame
from stemagent.simulators.scan import DetectorModel
from stemagent.simulators.specimens import SPECIMEN_KINDS, build_specimen
from stemagent.types import Frame, ScanGeometry


def test_boundaries_never_cross_and_their_columns_point_at_the_next() -> None:
    sp = build_specimen("boundary_film", size_A=(130.0, 130.0), rng=np.random.default_rng(0), tile_cells=9)
    assert "boundary_film" in SPECIMEN_KINDS
    bounds = sp.extras["boundaries"]
    assert len(bounds) == 9
    a, origin = sp.extras["lattice_A"], sp.extras["a_origin_A"]
    a_sites = sp.sites_A[sp.site_role == 0]
    for b in bounds:
        v = path_vertices(np.array(b["steps"]), b["start_ij"])
        inner = [tuple(p) for p in v[:-1].tolist()]
        assert len(set(inner)) == len(inner)  # no column is passed twice
        if b["stop"] == "self":
            assert tuple(v[-1]) in set(inner)
        for p, s in zip(v[:-1], b["steps"]):
            ideal = origin + a * p
            k = int(np.argmin(np.linalg.norm(a_sites - ideal, axis=1)))
            assert np.allclose(a_sites[k] - ideal, 0.3 * STEP_VECTORS[s], atol=1e-9)
    assert sum(len(s) for s in truth_sequences(sp)) == sum(len(b["steps"]) for b in bounds)


def test_film_from_config_and_given_boundaries() -> None:
    cfg = load_config("configs/twin-boundary-film.yaml")
    assert cfg.driver.specimen == "boundary_film" and cfg.driver.boundary_chain.params() == ReducedParams()
    driver = twin_from_config(cfg.driver, seed=2)
    assert len(driver.ground_truth.specimen.extras["boundaries"]) == (520 // 3.9 // 16) ** 2
    given = [{"start_ij": (5, 5), "steps": [0, 1, 0, 1, 1, 2]}]
    sp = boundary_film(size_A=(60.0, 60.0), boundaries=given)
    assert sp.extras["boundaries"][0]["steps"] == [0, 1, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="tile_cells"):
        boundary_film(tile_cells=3)


def test_motifs_read_from_a_twin_image_agree_with_the_ground_truth() -> None:
    rng = np.random.default_rng(7)
    fov, px = 96.0, 384
    sp = boundary_film(size_A=(fov + 10, fov + 10), rng=rng, tile_cells=11, chain=BoundaryChain.from_params(ReducedParams()))
    geo = ScanGeometry(center_A=(0.0, 0.0), fov_A=(fov, fov), shape_px=(px, px), dwell_s=2e-6)
    optics = ProbeOptics(energy_keV=200.0, convergence_mrad=25.0, aberrations=Aberrations(C30_A=5000.0), source_fwhm_A=0.6)
    dose = 1e4
    img, _ = render_frame(sp, geo, dose * (fov / px) ** 2, rng, optics=optics, adf=ADFModel(z_exponent=1.7, sigma_C_A2=0.001),
                          detector=DetectorModel(read_noise=1.0), jitter_A=0.05)
    frame = Frame(image=img, geometry=geo, line_times_s=geo.line_start_times_s(0.0), index=0, dose_e_per_A2=dose)
    res = BoundaryStage(BoundaryTraceConfig()).process(frame)
    a, origin = sp.extras["lattice_A"], sp.extras["a_origin_A"]
    read = {}
    for t in res.traces:
        ij = np.rint((t.positions_A - origin) / a).astype(int)
        for m in range(1, len(t)):
            read[tuple(ij[m])] = (int(t.steps[m - 1]), int(t.steps[m]))
    total = correct = 0
    for b in sp.extras["boundaries"]:
        v = path_vertices(np.array(b["steps"]), b["start_ij"])
        xy = origin + a * v
        seen = np.all(np.abs(xy) < fov / 2 - 1.0, axis=1)
        for m in range(1, len(b["steps"])):
            if seen[m - 1] and seen[m]:
                total += 1
                correct += read.get(tuple(v[m])) == (b["steps"][m - 1], b["steps"][m])
    assert total > 40
    assert correct / total >= 0.98
