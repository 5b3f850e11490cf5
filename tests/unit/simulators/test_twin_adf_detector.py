"""The twin's ADF detector: angles per run, a standard HAADF default per voltage, and the fast
mode's column intensities calibrated against the multislice mode for that detector (issue 12 item 1).

Frames built to show the shortfall: graphene with one Si (60 keV, 80-200 mrad) and MoS2 (80 keV,
70-200 mrad), each computed by multislice (frozen phonons) and by the fast mode; the column
intensity ratios must agree within 5 %. The older power law (n = 1.8, MAADF-like scale) misses
both by more than that, and collects several times more electrons per column.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from stemagent.config import TwinConfig
from stemagent.simulators.adf_detector import LEGACY_MAADF, AnnularDetector, calibrated_adf, standard_haadf
from stemagent.simulators.factory import adf_from_config
from stemagent.simulators.fast_adf import ADFModel
from stemagent.simulators.multislice import Cell, Multislice, MultisliceSettings, mos2_cell
from stemagent.simulators.optics import ProbeOptics
from stemagent.simulators.render import render_frame
from stemagent.simulators.specimens import specimen_from_atoms
from stemagent.types import ScanGeometry


def graphene_si_cell() -> tuple[Cell, np.ndarray, np.ndarray]:
    """A 4x3 orthogonal graphene cell (9.84 x 12.78 Å) with one Si; returns the cell, the Si
    position and the C sites 2.5-4 Å from it (their mean is the C column intensity)."""
    a = 2.46
    h = a * math.sqrt(3.0)
    base = np.array([[0.0, 0.0], [a / 2, a / (2 * math.sqrt(3.0))], [a / 2, h / 2], [0.0, h / 2 + a / (2 * math.sqrt(3.0))]])
    xy = np.concatenate([base + [i * a, j * h] for j in range(3) for i in range(4)]) + 0.3
    numbers = np.full(len(xy), 6)
    si = int(np.argmin(np.linalg.norm(xy - [2 * a, 1.5 * h], axis=1)))
    numbers[si] = 14
    d = np.linalg.norm(xy - xy[si], axis=1)
    cell = Cell(np.c_[xy, np.zeros(len(xy))], numbers, (4 * a, 3 * h), np.full(len(xy), 0.08))
    return cell, xy[si][None, :], xy[(d > 2.5) & (d < 4.0)]


def mos2_columns(cell: Cell) -> tuple[np.ndarray, np.ndarray]:
    """Every Mo and S2 column of the (periodic) cell."""
    top = cell.positions_A[:, 2] > 0
    return cell.positions_A[cell.numbers == 42][:, :2], cell.positions_A[(cell.numbers == 16) & top][:, :2]


def multislice_ratio(cell: Cell, optics: ProbeOptics, ring: AnnularDetector, heavy: np.ndarray, light: np.ndarray) -> float:
    """Mean heavy over mean light column intensity, 16 frozen-phonon configurations."""
    ms = Multislice(cell, optics, MultisliceSettings(sampling_A=0.05, slice_thickness_A=0.5, inner_mrad=ring.inner_mrad,
                                                     outer_mrad=ring.outer_mrad, frozen_phonons=16, workers=1))
    i = ms.adf(np.vstack([heavy, light]), rng=np.random.default_rng(1), batch=32)
    return float(i[: len(heavy)].mean() / i[len(heavy) :].mean())


def fast_ratio(cell: Cell, optics: ProbeOptics, adf: ADFModel, heavy: np.ndarray, light: np.ndarray) -> float:
    """The same ratio from the fast mode's noiseless image of the cell (tiled 3x3 so tails wrap)."""
    big = cell.tile(3, 3)
    shift = np.array(cell.size_A)
    u = big.u_rms_A if big.u_rms_A is not None else 0.07
    spec = specimen_from_atoms(big.positions_A[:, :2] - shift, big.numbers, u_rms_A=u)
    geo = ScanGeometry(center_A=(cell.size_A[0] / 2, cell.size_A[1] / 2), fov_A=cell.size_A,
                       shape_px=(int(round(cell.size_A[1] / 0.05)), int(round(cell.size_A[0] / 0.05))))
    _, truth = render_frame(spec, geo, 1.0, np.random.default_rng(0), optics=optics, adf=adf, noise=False)
    rc = geo.sample_to_pixel(np.vstack([heavy, light]))
    i = map_coordinates(truth.expected_image.astype(np.float64), [rc[:, 0], rc[:, 1]], order=1, mode="grid-wrap")
    return float(i[: len(heavy)].mean() / i[len(heavy) :].mean())


@pytest.fixture(scope="module")
def graphene_case() -> dict:
    optics = ProbeOptics(energy_keV=60.0, convergence_mrad=30.0)
    cell, si, c = graphene_si_cell()
    ring = standard_haadf(60.0)
    return {"ms": multislice_ratio(cell, optics, ring, si, c),
            "fast": fast_ratio(cell, optics, calibrated_adf(ring, 60.0, 30.0), si, c),
            "legacy": fast_ratio(cell, optics, ADFModel(), si, c)}


@pytest.fixture(scope="module")
def mos2_case() -> dict:
    optics = ProbeOptics(energy_keV=80.0, convergence_mrad=30.0)
    cell = mos2_cell().tile(3, 2)
    mo, s2 = mos2_columns(cell)
    ring = standard_haadf(80.0)
    return {"ms": multislice_ratio(cell, optics, ring, mo, s2),
            "fast": fast_ratio(cell, optics, calibrated_adf(ring, 80.0, 30.0), mo, s2),
            "legacy": fast_ratio(cell, optics, ADFModel(), mo, s2)}


def test_standard_haadf_default_follows_the_voltage() -> None:
    assert standard_haadf(60.0) == AnnularDetector(80.0, 200.0)
    assert standard_haadf(80.0) == AnnularDetector(70.0, 200.0)
    assert standard_haadf(200.0) == AnnularDetector(70.0, 200.0)
    with pytest.raises(ValueError, match="outer_mrad"):
        AnnularDetector(200.0, 80.0)
    with pytest.raises(ValueError, match="energy_keV"):
        standard_haadf(-1.0)


def test_twin_config_detector_angles_are_configurable_per_run() -> None:
    haadf = adf_from_config(TwinConfig(adf_detector="standard-haadf"))  # 60 keV: 80-200 mrad, calibrated
    maadf = adf_from_config(TwinConfig(adf_detector=(40.0, 200.0)))
    si_c = {m: float(m.cross_section_A2(np.array([14]))[0] / m.cross_section_A2(np.array([6]))[0]) for m in (haadf, maadf)}
    # the wider ring collects several times more per C atom and has the flatter Z contrast
    assert maadf.cross_section_A2(np.array([6]))[0] > 3.0 * haadf.cross_section_A2(np.array([6]))[0]
    assert si_c[haadf] > 1.2 * si_c[maadf]
    # older configs that tune the power law keep it
    assert TwinConfig(z_exponent=1.7).adf_detector == "power-law"
    assert adf_from_config(TwinConfig(z_exponent=1.7)).sigma_table is None
    with pytest.raises(ValueError, match="adf_detector"):
        TwinConfig(adf_detector=(200.0, 80.0))


def test_fast_mode_matches_multislice_si_over_c_on_standard_haadf(graphene_case: dict) -> None:
    r = graphene_case
    assert r["ms"] == pytest.approx(4.8, rel=0.08)  # the issue's ~4.8 at 80-200 mrad, 60 keV
    assert r["fast"] == pytest.approx(r["ms"], rel=0.05)
    # the older power law is not calibrated for this detector
    assert abs(r["legacy"] / r["ms"] - 1.0) > 0.05


def test_fast_mode_matches_multislice_mo_over_s2_on_standard_haadf(mos2_case: dict) -> None:
    r = mos2_case
    assert 2.0 < r["ms"] < 2.8
    assert r["fast"] == pytest.approx(r["ms"], rel=0.05)
    assert abs(r["legacy"] / r["ms"] - 1.0) > 0.05


def test_cross_section_table_interpolates_untabulated_elements() -> None:
    m = calibrated_adf(LEGACY_MAADF, 60.0)
    s = m.cross_section_A2(np.array([6, 14, 10, 52, 90]))
    assert s[0] == pytest.approx(dict(m.sigma_table or ())[6])
    assert s[0] < s[2] < s[1]  # Ne between C and Si
    assert dict(m.sigma_table or ())[42] < s[3] < dict(m.sigma_table or ())[74]  # Te between Mo and W
    assert s[4] > dict(m.sigma_table or ())[82]  # extrapolated beyond Pb
