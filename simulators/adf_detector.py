"""The twin's annular dark-field detector: inner/outer angles and the fast mode's calibration.

The fast renderer (:mod:`stemagent.simulators.fast_adf`) needs one cross-section per element
(fraction of the beam an atom sends into the detector, Å²). Those depend on the detector's
angles and the beam energy: a 40-200 mrad (MAADF-like) ring collects 3-5x more than a standard
80-200 mrad HAADF ring and with a flatter Z dependence. :func:`calibrated_adf` measures them
with the accurate mode (:mod:`stemagent.simulators.multislice`): one atom of each element in a
small periodic cell, the probe on the atom, thermal vibration averaged, divided by the fast mode's own peak
for a unit cross-section under the same probe. Column ratios (Si/C in graphene, Mo/S2 in MoS2)
of the fast mode then follow the multislice mode within a few % (tests/unit/simulators).

Angles in mrad, energies in keV, lengths in Å.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from stemagent.simulators.fast_adf import ADFModel
from stemagent.simulators.multislice import Cell, Multislice, MultisliceSettings
from stemagent.simulators.optics import ProbeOptics

#: elements tabulated by default: those the twin's multislice potentials cover (C, O, Si, S, Ti, Se, Sr, Mo, W, Pb);
#: others (Te, Au, ...) follow the log-log interpolation of ADFModel.sigma_table
CALIBRATION_Z: tuple[int, ...] = (6, 8, 14, 16, 22, 34, 38, 42, 74, 82)
#: rms thermal vibration used for the calibration atoms (the specimens' typical value)
CALIBRATION_U_RMS_A = 0.07


@dataclass(frozen=True)
class AnnularDetector:
    """An annular detector collecting scattering angles in ``[inner_mrad, outer_mrad)``."""

    inner_mrad: float
    outer_mrad: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.inner_mrad) and self.inner_mrad >= 0.0):
            raise ValueError(f"inner_mrad={self.inner_mrad!r}: must be a finite angle >= 0 mrad")
        if not (math.isfinite(self.outer_mrad) and self.outer_mrad > self.inner_mrad):
            raise ValueError(f"outer_mrad={self.outer_mrad!r}: must be finite and larger than inner_mrad={self.inner_mrad!r}")

    @property
    def label(self) -> str:
        return f"{self.inner_mrad:g}-{self.outer_mrad:g} mrad"


#: the older twin detector (MAADF-like) that the power-law default (n = 1.8, sigma_C 0.0025) stood for
LEGACY_MAADF = AnnularDetector(40.0, 200.0)


def standard_haadf(energy_keV: float) -> AnnularDetector:
    """A standard HAADF ring for the beam energy: 80-200 mrad at 60 keV (graphene's usual
    voltage; inner angle well above the C Bragg/thermal-diffuse tail), 70-200 mrad from 80 keV
    up (the usual TMD and perovskite settings)."""
    if not (math.isfinite(energy_keV) and energy_keV > 0):
        raise ValueError(f"energy_keV={energy_keV!r}: must be a positive beam energy")
    return AnnularDetector(80.0, 200.0) if energy_keV < 70.0 else AnnularDetector(70.0, 200.0)


def _sampling_A(energy_keV: float, outer_mrad: float, band_limit: float = 2.0 / 3.0) -> float:
    lam = ProbeOptics(energy_keV=energy_keV).wavelength_A
    # band limit k_max = band_limit / (2 dx) must exceed outer / lambda (5 % margin)
    need = band_limit * lam / (2.0 * outer_mrad * 1e-3 * 1.05)
    return min(0.05, need)


def _unit_peak(optics: ProbeOptics, u_rms_A: float) -> float:
    """Fast-mode peak (fraction of beam) of one atom with cross-section 1 Å² under ``optics``."""
    from stemagent.simulators.render import render_frame  # lazy: only a calibration renders (the factory imports this module)
    from stemagent.simulators.specimens import specimen_from_atoms  # lazy: as above
    from stemagent.types import ScanGeometry  # lazy: as above

    spec = specimen_from_atoms(np.array([[0.0, 0.0]]), np.array([6]), u_rms_A=u_rms_A)
    geo = ScanGeometry(fov_A=(3.25, 3.25), shape_px=(65, 65))
    _, truth = render_frame(spec, geo, 1.0, np.random.default_rng(0), optics=optics,
                            adf=ADFModel(sigma_C_A2=1.0, z_exponent=1.0), noise=False)
    return float(np.max(truth.expected_image))


@lru_cache(maxsize=64)
def _table(energy_keV: float, convergence_mrad: float, inner_mrad: float, outer_mrad: float,
           numbers: tuple[int, ...], quadrature: int) -> tuple[tuple[int, float], ...]:
    optics = ProbeOptics(energy_keV=energy_keV, convergence_mrad=convergence_mrad)
    settings = MultisliceSettings(sampling_A=_sampling_A(energy_keV, outer_mrad), slice_thickness_A=1.0,
                                  inner_mrad=inner_mrad, outer_mrad=outer_mrad, workers=1)
    peak = _unit_peak(optics, CALIBRATION_U_RMS_A)
    # thermal vibration of a lone atom = the static atom seen by a probe displaced the other way:
    # average the static result over a Gauss-Hermite grid of offsets (exact, no phonon sampling noise)
    x, w = np.polynomial.hermite.hermgauss(quadrature)
    d = math.sqrt(2.0) * CALIBRATION_U_RMS_A * x
    wx = w / math.sqrt(math.pi)
    offsets = np.array([[dx, dy] for dy in d for dx in d])
    weights = np.outer(wx, wx).reshape(-1)
    out = []
    for z in numbers:
        cell = Cell(np.array([[6.0, 6.0, 0.0]]), np.array([z]), (12.0, 12.0))
        i = Multislice(cell, optics, settings).adf(np.array([6.0, 6.0]) + offsets, batch=len(offsets))
        out.append((int(z), float(np.sum(weights * i)) / peak))
    return tuple(out)


def calibrated_adf(
    detector: AnnularDetector,
    energy_keV: float,
    convergence_mrad: float = 30.0,
    *,
    background: float = 0.0,
    numbers: tuple[int, ...] = CALIBRATION_Z,
    quadrature: int = 5,
) -> ADFModel:
    """An :class:`ADFModel` whose per-element cross-sections come from single-atom multislice
    runs for ``detector`` at ``energy_keV`` / ``convergence_mrad``, thermal vibration averaged on a
    ``quadrature`` x ``quadrature`` Gauss-Hermite grid (cached per setting; about a second the
    first time). ``sigma_C_A2`` and ``z_exponent`` of the result are the table's C
    value and its C->Si exponent (for display; the table is what is rendered)."""
    if not (math.isfinite(convergence_mrad) and convergence_mrad > 0):
        raise ValueError(f"convergence_mrad={convergence_mrad!r}: must be positive")
    if not numbers or any(int(z) < 1 or int(z) > 103 for z in numbers):
        raise ValueError(f"numbers={numbers!r}: need atomic numbers 1-103")
    zs = tuple(sorted({int(z) for z in numbers}))
    table = _table(round(float(energy_keV), 3), round(float(convergence_mrad), 1), float(detector.inner_mrad),
                   float(detector.outer_mrad), zs, int(quadrature))
    sig = dict(table)
    c = sig.get(6, table[0][1])
    n = math.log(sig[14] / sig[6]) / math.log(14 / 6) if 6 in sig and 14 in sig else 1.8
    return ADFModel(z_exponent=float(n), sigma_C_A2=float(c), sigma_table=table, background=background)
