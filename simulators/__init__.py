"""The digital twin: specimens, probe optics, image formation, scan/drift, beam-induced dynamics.

Training-data API (stable; used by the segmenter)
--------------------------------------------------
::

    from stemagent.simulators import render_sample, cramer_rao_bound_A
    image, truth = render_sample(
        specimen_kind,            # "graphene" | "mos2" | "ws2" | "mose2" | "srtio3" | "film"
        geometry,                 # stemagent.types.ScanGeometry (field, pixels, rotation, dwell)
        dose_e_per_A2,            # electrons per Å² (per pixel: dose * pixel area)
        rng,                      # numpy.random.Generator: specimen, defects and noise all from it
        *,
        optics=None,              # ProbeOptics, or the shortcuts below
        energy_keV=None, convergence_mrad=None, source_fwhm_A=None,
        aberrations=None,         # Aberrations(...) or {"C10_A": .., "C12_A": .., "phi12_rad": .., "C30_A": .., "C50_A": ..}
        z_exponent=1.8,           # ADF contrast ~ Z**n
        adf=None,                 # ADFModel (cross-section scale, background, ...)
        detector=None,            # DetectorModel(gain, offset, read_noise, efficiency)
        drift=None,               # DriftModel (linear + wobble + random walk), seeded
        jitter_A=0.0,             # rms scan-line jitter along the fast axis, Å
        specimen_options=None,    # passed to the specimen builder (defect densities etc.)
    )

``image`` is ``(rows, cols)`` float32 detector output (counts x gain + offset + read noise).
``truth`` is a :class:`FrameTruth`; per visible atomic column ("site"):

- ``truth.positions_A`` ``(K, 2)`` (x, y) in Å, sample frame;
- ``truth.pixels_rc`` ``(K, 2)`` fractional (row, col) where it appears in *this* image (drift,
  scan rotation and line jitter applied);
- ``truth.labels`` ``(K,)`` int into ``truth.class_names``: graphene ``("C", "Si", "vacancy")``;
  TMDs ``("metal", "chalcogen", "substituted", "vacancy")``; perovskites ``("A", "B", "O", "vacancy")``;
  vacancy sites are listed with their lattice position;
- ``truth.numbers`` ``(K,)`` summed Z of the column, ``truth.species`` ``(K,)`` e.g. ``"S2"``,
  ``"SSe"``, ``"Si"``, ``""`` (empty site); ``truth.times_s`` when the beam passed.

Per rendered atom: ``truth.atom_ids``, ``truth.atom_numbers``, ``truth.atom_positions_A``,
``truth.atom_pixels_rc``. For Cramér-Rao bounds: ``truth.expected_image`` is the noiseless mean
image (same units), ``truth.render_expected(atom_pixels_rc)`` re-renders it for moved atoms,
``truth.electrons_per_pixel``, ``truth.optics``, ``truth.adf``, ``truth.detector`` are the models,
and :func:`cramer_rao_bound_A(truth, k) <stemagent.simulators.render.cramer_rao_bound_A>` returns
the (sigma_x, sigma_y) bound in Å for visible site ``k``. ``truth.to_arrays()`` gives flat arrays
for ``.npz`` files.

Domain randomisation: ``kw = sample_conditions(rng, kind)`` draws plausible conditions (dose,
energy, aperture, residual aberrations, source size, Z exponent, detector, drift, jitter);
``render_sample(kind, geometry, kw.pop("dose_e_per_A2"), rng, **kw)``.

Other entry points
------------------
- :class:`TwinDriver` (``stemagent.simulators.twin``): the ``Driver`` protocol over a live,
  evolving specimen::

      TwinDriver(specimen, *, clock=None (VirtualClock), rng=0, optics=None, adf=None,
                 detector=None, drift=None, jitter_A=0.0, beam_current_pA=20.0,
                 cross_sections=None, dynamics=True, park_sample_interval_s=1e-3,
                 max_fov_A=512.0, max_shape_px=(2048, 2048), min_dwell_s=1e-7, max_dwell_s=1e-2)

  or ``stemagent.simulators.factory.twin_from_config(TwinConfig, clock, seed)`` (what
  ``build_driver`` does for ``driver.kind: twin``). Frames are paced on the injected clock by
  deadlines ``start + i * frame_time``; ``park`` returns the ADF signal sampled every
  ``park_sample_interval_s`` (a Si hop is a step). ``driver.beam_blanked`` tells whether the
  beam is blanked. Ground truth, never through the protocol: ``driver.ground_truth`` (a
  :class:`GroundTruth`): ``.specimen`` (live), ``.initial``, ``.events`` (time, kind, atoms,
  positions before/after, beam position, during scan/park/idle), ``.drift_at(t)``,
  ``.positions_at(t)``, ``.frame_truth(frame.index)`` (a :class:`FrameTruth`), ``.beam_log``.
- :mod:`.specimens`, :mod:`.perovskites` (``MotifChain`` for domain walls), :mod:`.optics`,
  :mod:`.fast_adf`, :mod:`.multislice`, :mod:`.scan`, :mod:`.dynamics`.

``stemagent.simulators.minimal`` (the foundation's minimal twin) is separate and unchanged.
"""

from stemagent.simulators.dynamics import CrossSections, Event
from stemagent.simulators.fast_adf import ADFModel
from stemagent.simulators.optics import Aberrations, ProbeOptics, electron_wavelength_A
from stemagent.simulators.perovskites import MarkovMotifChain, MotifChain, WallMotif
from stemagent.simulators.render import FrameTruth, cramer_rao_bound_A, render_frame, render_sample, sample_conditions
from stemagent.simulators.scan import DetectorModel, DriftModel
from stemagent.simulators.specimens import SPECIMEN_KINDS, Specimen, build_specimen
from stemagent.simulators.twin import GroundTruth, TwinDriver

__all__ = [
    "ADFModel",
    "Aberrations",
    "CrossSections",
    "DetectorModel",
    "DriftModel",
    "Event",
    "FrameTruth",
    "GroundTruth",
    "MarkovMotifChain",
    "MotifChain",
    "ProbeOptics",
    "SPECIMEN_KINDS",
    "Specimen",
    "TwinDriver",
    "WallMotif",
    "build_specimen",
    "cramer_rao_bound_A",
    "electron_wavelength_A",
    "render_frame",
    "render_sample",
    "sample_conditions",
]
