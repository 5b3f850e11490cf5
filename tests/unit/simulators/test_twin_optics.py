"""Probe optics of the digital twin: wavelength, probe size, aberrations."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.simulators.optics import (
    Aberrations,
    ProbeOptics,
    diffraction_limited_fwhm_A,
    electron_wavelength_A,
    fwhm_of_profile,
    interaction_constant,
    max_energy_transfer_eV,
)


def test_relativistic_wavelength_matches_textbook_values() -> None:
    # Kirkland, Advanced Computing in EM: 100 kV -> 0.03701 Å, 200 kV -> 0.02508 Å, 300 kV -> 0.01969 Å
    assert electron_wavelength_A(100.0) == pytest.approx(0.03701, abs=2e-5)
    assert electron_wavelength_A(200.0) == pytest.approx(0.02508, abs=2e-5)
    assert electron_wavelength_A(300.0) == pytest.approx(0.01969, abs=2e-5)
    # interaction constant at 200 kV: 7.29e-4 rad/(V Å)
    assert interaction_constant(200.0) == pytest.approx(7.29e-4, rel=5e-3)


def test_max_energy_transfer_to_carbon() -> None:
    # head-on transfer to 12C: about 20 eV at 100 keV, about 11.6 eV at 60 keV
    assert max_energy_transfer_eV(100.0, 12.0) == pytest.approx(20.1, abs=0.2)
    assert max_energy_transfer_eV(60.0, 12.0) == pytest.approx(11.6, abs=0.2)


def _probe_fwhm(optics: ProbeOptics, n: int = 1024, spacing: float = 0.025) -> float:
    img = optics.intensity((n, n), (spacing, spacing))
    assert img.sum() * spacing**2 == pytest.approx(1.0, rel=1e-6)
    r, c = np.unravel_index(np.argmax(img), img.shape)
    return 0.5 * (fwhm_of_profile(img[r, :], spacing) + fwhm_of_profile(img[:, c], spacing))


@pytest.mark.parametrize("energy_keV,alpha_mrad", [(60.0, 30.0), (200.0, 20.0)])
def test_aberration_free_probe_has_the_diffraction_limited_width(energy_keV: float, alpha_mrad: float) -> None:
    optics = ProbeOptics(energy_keV=energy_keV, convergence_mrad=alpha_mrad)
    assert _probe_fwhm(optics) == pytest.approx(diffraction_limited_fwhm_A(energy_keV, alpha_mrad), rel=0.03)


def _peak(optics: ProbeOptics, n: int = 512, spacing: float = 0.03) -> float:
    return float(optics.intensity((n, n), (spacing, spacing)).max())


def test_aberrations_and_source_size_lower_and_broaden_the_probe() -> None:
    perfect = ProbeOptics()
    for worse in (
        ProbeOptics(aberrations=Aberrations(C10_A=100.0)),
        ProbeOptics(aberrations=Aberrations(C30_A=2e6)),
        ProbeOptics(aberrations=Aberrations(C50_A=2e9)),
        ProbeOptics(aberrations=Aberrations(C12_A=60.0)),
        ProbeOptics(source_fwhm_A=0.8),
    ):
        assert _peak(worse) < 0.8 * _peak(perfect), worse
    assert _probe_fwhm(ProbeOptics(source_fwhm_A=0.8)) > 1.2 * _probe_fwhm(perfect)


def test_two_fold_astigmatism_makes_the_probe_elongated_along_its_angle() -> None:
    n, s = 512, 0.04
    for phi in (0.0, np.pi / 2):
        img = ProbeOptics(aberrations=Aberrations(C10_A=40.0, C12_A=40.0, phi12_rad=phi)).intensity((n, n), (s, s))
        y, x = np.mgrid[:n, :n]
        w = np.where(img > 0.2 * img.max(), img, 0.0)
        w = w / w.sum()
        cx, cy = (w * x).sum(), (w * y).sum()
        mxx = (w * (x - cx) ** 2).sum()
        myy = (w * (y - cy) ** 2).sum()
        assert abs(mxx - myy) / (mxx + myy) > 0.05
        if phi == 0.0:
            sign0 = np.sign(mxx - myy)
        else:
            assert np.sign(mxx - myy) == -sign0
