"""Generation closes the loop: fit -> generate -> (image ->) fit recovers the parameters."""

from __future__ import annotations

import numpy as np

from stemagent.boundaries.analysis import sequences_from_traces
from stemagent.boundaries.chain import BoundaryChain, ReducedParams
from stemagent.boundaries.estimate import count_transitions, fit_reduced
from stemagent.boundaries.trace import BoundaryStage
from stemagent.simulators.boundary_film import boundary_film, truth_sequences
from stemagent.simulators.fast_adf import ADFModel
from stemagent.simulators.optics import Aberrations, ProbeOptics
from stemagent.simulators.render import render_frame
from stemagent.simulators.scan import DetectorModel
from stemagent.types import Frame, ScanGeometry


def test_fit_generate_fit_round_trip_on_sequences() -> None:
    observed = list(BoundaryChain.from_params(ReducedParams(a=0.6, b=0.25, c=0.35, d=0.7, f=0.75, g=0.25, k=0.05)).sample_many(
        150, 40, np.random.default_rng(0)))
    first = fit_reduced(count_transitions(observed))
    generated = list(BoundaryChain.from_params(first.params).sample_many(150, 40, np.random.default_rng(1)))
    second = fit_reduced(count_transitions(generated))
    inside = [first.intervals[n][0] <= v <= first.intervals[n][1] for n, v in second.params.as_dict().items()]
    assert sum(inside) >= 6  # each at 95%: all 7 inside with probability ~0.7, 6 or more ~0.96


def test_fit_generate_image_fit_round_trip() -> None:
    truth = ReducedParams(a=0.6, b=0.25, c=0.35, d=0.7, f=0.75, g=0.25, k=0.05)
    seqs = list(BoundaryChain.from_params(truth).sample_many(300, 30, np.random.default_rng(2)))
    fitted = fit_reduced(count_transitions(seqs)).params
    # generate boundaries from the fitted chain and render them with the twin
    rng = np.random.default_rng(3)
    fov, px = 128.0, 512
    sp = boundary_film(size_A=(fov + 8, fov + 8), rng=rng, chain=BoundaryChain.from_params(fitted), tile_cells=9)
    geo = ScanGeometry(center_A=(0.0, 0.0), fov_A=(fov, fov), shape_px=(px, px), dwell_s=2e-6)
    optics = ProbeOptics(energy_keV=200.0, convergence_mrad=25.0, aberrations=Aberrations(C30_A=5000.0), source_fwhm_A=0.6)
    img, _ = render_frame(sp, geo, 1e4 * (fov / px) ** 2, rng, optics=optics, adf=ADFModel(z_exponent=1.7, sigma_C_A2=0.001),
                          detector=DetectorModel(read_noise=1.0))
    frame = Frame(image=img, geometry=geo, line_times_s=geo.line_start_times_s(0.0), index=0, dose_e_per_A2=1e4)
    read = sequences_from_traces(BoundaryStage().process(frame).traces)
    from_image = count_transitions(read)
    from_truth = count_transitions(truth_sequences(sp))
    # the image reads the same transitions the twin drew (frame edges cut a few)
    assert from_image.n_transitions >= 0.9 * from_truth.n_transitions > 40
    assert np.abs(from_image.class_counts() - from_truth.class_counts()).sum() <= 0.1 * from_truth.n_transitions
    refit = fit_reduced(from_image)
    inside = [refit.intervals[n][0] <= v <= refit.intervals[n][1] for n, v in fitted.as_dict().items()]
    assert sum(inside) >= 6
