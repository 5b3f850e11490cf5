"""Multislice: scattering factors, wave norm, convergence, and the Z exponent of the fast mode."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.simulators.multislice import Cell, Multislice, MultisliceSettings, calibrate_z_exponent, mos2_cell
from stemagent.simulators.optics import ProbeOptics
from stemagent.simulators.potentials import BOHR_A, LOBATO_2014, projected_potential, scattering_factor_A

OPTICS = ProbeOptics(energy_keV=60.0, convergence_mrad=30.0)


def test_scattering_factors_have_the_published_limits() -> None:
    # f_e(0) of carbon is 2.51 Å (Lobato & Van Dyck 2014); Mott-Bethe at large g
    assert scattering_factor_A(6, 0.0) == pytest.approx(2.51, abs=0.01)
    for z in LOBATO_2014:
        g = 30.0
        assert scattering_factor_A(z, g) == pytest.approx(z / (2 * np.pi**2 * BOHR_A * g**2), rel=0.03), z
    # heavier atoms scatter more at every angle
    g = np.linspace(0.0, 4.0, 9)
    assert np.all(scattering_factor_A(42, g) > scattering_factor_A(16, g))


def test_projected_potential_integrates_to_the_forward_scattering_factor() -> None:
    cell = (10.0, 12.0)
    v = projected_potential(np.array([[5.0, 6.0]]), np.array([16]), cell, (200, 240))
    integral = v.mean() * cell[0] * cell[1]
    assert integral == pytest.approx(2 * np.pi * BOHR_A * 14.3996454 * float(scattering_factor_A(16, 0.0)), rel=1e-9)
    peak = np.unravel_index(np.argmax(v), v.shape)
    assert peak == (100, 120)  # row = y / dy = 6 / 0.06, col = x / dx = 5 / (10 / 240)


def _cell() -> Cell:
    return mos2_cell().tile(3, 2)


def test_wave_norm_is_conserved_in_vacuum_and_through_the_specimen() -> None:
    empty = Cell(np.array([[0.0, 0.0, 0.0]]), np.array([6]), _cell().size_A)
    empty.positions_A[:] = 0.0
    ms_vac = Multislice(empty, OPTICS, MultisliceSettings(sampling_A=0.06))
    probe = ms_vac.probes(np.array([[3.0, 4.0]]))[0]
    prop = ms_vac.propagator(50.0)
    out = np.fft.ifft2(np.fft.fft2(probe) * prop)
    assert np.sum(np.abs(out) ** 2) == pytest.approx(1.0, abs=1e-12)
    ms = Multislice(_cell(), OPTICS, MultisliceSettings(sampling_A=0.06, slice_thickness_A=0.5))
    norm = ms.exit_norm((4.0, 4.0))
    assert 0.999 < norm <= 1.0 + 1e-9


def _column_positions(cell: Cell) -> tuple[np.ndarray, np.ndarray]:
    c = np.array(cell.size_A) / 2
    mo = cell.positions_A[cell.numbers == 42][:, :2]
    s = cell.positions_A[(cell.numbers == 16) & (cell.positions_A[:, 2] > 0)][:, :2]
    return mo[np.argmin(np.linalg.norm(mo - c, axis=1))], s[np.argmin(np.linalg.norm(s - c, axis=1))]


def test_column_intensities_converge_with_slice_thickness_and_give_a_plausible_z_exponent() -> None:
    cell = _cell()
    mo, s2 = _column_positions(cell)
    res = {}
    for dz in (0.5, 1.0, 3.2):
        ms = Multislice(cell, OPTICS, MultisliceSettings(sampling_A=0.06, slice_thickness_A=dz))
        res[dz] = ms.adf(np.array([mo, s2]))
    assert res[1.0][0] == pytest.approx(res[0.5][0], rel=0.02)
    assert res[1.0][1] == pytest.approx(res[0.5][1], rel=0.02)
    ratio = res[0.5][0] / res[0.5][1]
    n = calibrate_z_exponent(ratio, 42, 16)
    assert 1.4 < n < 2.0  # ADF contrast exponents reported for HAADF are about 1.6-1.9


def test_adf_image_over_the_cell_is_brightest_on_the_metal_columns() -> None:
    cell = mos2_cell().tile(2, 2)
    ms = Multislice(cell, OPTICS, MultisliceSettings(sampling_A=0.07, slice_thickness_A=1.0, outer_mrad=150.0))
    img = ms.adf_image((14, 8))
    assert img.shape == (14, 8) and np.all(img >= 0)
    r, c = np.unravel_index(np.argmax(img), img.shape)
    xy = np.array([(c + 0.5) * cell.size_A[0] / 8, (r + 0.5) * cell.size_A[1] / 14])
    d = np.linalg.norm(cell.positions_A[:, :2] - xy, axis=1)
    assert cell.numbers[np.argmin(d)] == 42
