"""Multislice validation for the digital twin (MoS2 monolayer, 60 keV, 30 mrad, HAADF 80-180 mrad).

Prints one JSON object and writes docs/twin_multislice.png:
- wave norm after propagation (vacuum and through MoS2);
- convergence of the Mo and S2 column intensities with slice thickness and with sampling;
- frozen phonons vs a static lattice;
- the Z exponent n of the fast mode calibrated from the multislice Mo/S2 column ratio, two ways:
  the isolated-column formula ``42^n / (2 * 16^n) = ratio`` and by matching the fast-mode
  *image* peak ratio (neighbour tails included); plus the absolute cross-section ``sigma_C``;
- single atoms (C, Si, S, Mo, W) for 80-180 and 40-200 mrad: ``sigma_C`` and n against C;
- a line profile Mo -> S2 -> Mo, multislice vs the calibrated fast mode (the figure).

Usage: ``python benchmarks/bench_multislice.py``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import map_coordinates
from scipy.optimize import brentq

from stemagent.simulators.fast_adf import ADFModel
from stemagent.simulators.multislice import Cell, Multislice, MultisliceSettings, calibrate_z_exponent, mos2_cell
from stemagent.simulators.optics import ProbeOptics
from stemagent.simulators.render import render_frame
from stemagent.simulators.specimens import specimen_from_atoms
from stemagent.types import ScanGeometry

ROOT = Path(__file__).resolve().parents[1]
OPTICS = ProbeOptics(energy_keV=60.0, convergence_mrad=30.0)


def columns(cell: Cell) -> tuple[np.ndarray, np.ndarray]:
    c = np.array(cell.size_A) / 2
    mo = cell.positions_A[cell.numbers == 42][:, :2]
    s = cell.positions_A[(cell.numbers == 16) & (cell.positions_A[:, 2] > 0)][:, :2]
    return mo[np.argmin(np.linalg.norm(mo - c, axis=1))], s[np.argmin(np.linalg.norm(s - c, axis=1))]


def fast_image(cell: Cell, n: float, sigma_c: float, spacing: float = 0.05):
    """Noiseless fast-mode image of the same (tiled) projected structure, fraction of beam."""
    big = cell.tile(3, 3)
    shift = np.array(cell.size_A)
    xy = big.positions_A[:, :2] - shift  # the cell of interest sits in the middle tile
    spec = specimen_from_atoms(xy, big.numbers, u_rms_A=0.07)
    geo = ScanGeometry(center_A=(cell.size_A[0] / 2, cell.size_A[1] / 2), fov_A=cell.size_A,
                       shape_px=(int(round(cell.size_A[1] / spacing)), int(round(cell.size_A[0] / spacing))))
    _, truth = render_frame(spec, geo, 1.0, np.random.default_rng(0), optics=OPTICS,
                            adf=ADFModel(z_exponent=n, sigma_C_A2=sigma_c), noise=False)
    return geo, truth.expected_image.astype(np.float64)


def sample(geo: ScanGeometry, img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    rc = geo.sample_to_pixel(np.asarray(xy).reshape(-1, 2))
    return map_coordinates(img, [rc[:, 0], rc[:, 1]], order=1)


def main() -> dict:
    t_start = time.perf_counter()
    cell = mos2_cell().tile(4, 3)
    mo, s2 = columns(cell)
    out: dict = {
        "benchmark": "twin_multislice_validation",
        "machine": f"{platform.machine()}, python {platform.python_version()}",
        "specimen": "MoS2 monolayer, orthogonal cell tiled 4x3 (%.2f x %.2f Å)" % cell.size_A,
        "optics": {"energy_keV": 60.0, "convergence_mrad": 30.0, "detector_mrad": [80, 180]},
    }
    # norm
    vac = Multislice(Cell(np.zeros((1, 3)), np.array([6]), cell.size_A), OPTICS, MultisliceSettings(sampling_A=0.05))
    probe = vac.probes(np.array([mo]))[0]
    p = np.fft.ifft2(np.fft.fft2(probe) * vac.propagator(100.0))
    ms = Multislice(cell, OPTICS, MultisliceSettings(sampling_A=0.05, slice_thickness_A=0.5))
    out["norm"] = {
        "vacuum_100A_minus_1": float(np.sum(np.abs(p) ** 2) - 1.0),
        "mos2_at_Mo_minus_1": ms.exit_norm(tuple(mo)) - 1.0,
        "mos2_at_S2_minus_1": ms.exit_norm(tuple(s2)) - 1.0,
    }
    # slice thickness
    rows = []
    for dz in (0.25, 0.5, 1.0, 1.56, 3.2):
        I = Multislice(cell, OPTICS, MultisliceSettings(sampling_A=0.05, slice_thickness_A=dz)).adf(np.array([mo, s2]))
        rows.append({"slice_A": dz, "I_Mo": float(I[0]), "I_S2": float(I[1]), "ratio": float(I[0] / I[1])})
    out["slice_convergence"] = rows
    # sampling
    rows = []
    for dx in (0.08, 0.06, 0.05, 0.035):
        I = Multislice(cell, OPTICS, MultisliceSettings(sampling_A=dx, slice_thickness_A=0.5)).adf(np.array([mo, s2]))
        rows.append({"sampling_A": dx, "I_Mo": float(I[0]), "I_S2": float(I[1]), "ratio": float(I[0] / I[1])})
    out["sampling_convergence"] = rows
    # frozen phonons (reference setting)
    fp = Multislice(cell, OPTICS, MultisliceSettings(sampling_A=0.05, slice_thickness_A=0.5, frozen_phonons=8))
    I_fp = fp.adf(np.array([mo, s2]), rng=np.random.default_rng(1))
    static = out["slice_convergence"][1]
    out["frozen_phonons"] = {
        "configs": 8, "I_Mo": float(I_fp[0]), "I_S2": float(I_fp[1]), "ratio": float(I_fp[0] / I_fp[1]),
        "static_ratio": static["ratio"],
    }
    ratio = float(I_fp[0] / I_fp[1])
    n_iso = calibrate_z_exponent(ratio, 42, 16)

    # fast-mode image ratio as a function of n, and the n that matches multislice
    def fast_ratio(n: float) -> float:
        geo, img = fast_image(cell, n, 1.0)
        v = sample(geo, img, np.array([mo, s2]))
        return float(v[0] / v[1])

    n_img = brentq(lambda n: fast_ratio(n) - ratio, 1.0, 2.5, xtol=1e-3)
    geo, img_unit = fast_image(cell, n_img, 1.0)
    sigma_c = float(I_fp[0] / sample(geo, img_unit, np.array([mo]))[0])
    out["calibration"] = {
        "multislice_Mo_over_S2": ratio,
        "n_isolated_columns": n_iso,
        "n_fast_image": n_img,
        "fast_ratio_at_n_fast_image": fast_ratio(n_img),
        "fast_ratio_at_default_n_1.8": fast_ratio(1.8),
        "sigma_C_A2_for_80_180_mrad": sigma_c,
    }
    # line profile Mo -> S2 -> next Mo (through the S2 column)
    direction = s2 - mo
    ts = np.linspace(-0.5, 2.5, 61)
    line = mo[None, :] + ts[:, None] * direction[None, :]
    I_line = fp.adf(line, rng=np.random.default_rng(2))
    geo, img = fast_image(cell, n_img, sigma_c)
    fast_line = sample(geo, img, line)
    # single atoms: sigma_C and effective exponents against C for two detectors
    spec = specimen_from_atoms(np.array([[0.0, 0.0]]), [6], u_rms_A=0.07)
    g1 = ScanGeometry(fov_A=(6.4, 6.4), shape_px=(65, 65))
    _, t1 = render_frame(spec, g1, 1.0, np.random.default_rng(0), optics=OPTICS,
                         adf=ADFModel(z_exponent=1.8, sigma_C_A2=1.0), noise=False)
    unit_peak = float(t1.expected_image.max())
    singles = {}
    for det in ((80.0, 180.0), (40.0, 200.0)):
        I = {}
        for z in (6, 14, 16, 42, 74):
            one = Cell(np.array([[6.0, 6.0, 0.0]]), np.array([z]), (12.0, 12.0), np.array([0.07]))
            m = Multislice(one, OPTICS, MultisliceSettings(sampling_A=0.05, slice_thickness_A=1.0, inner_mrad=det[0],
                                                           outer_mrad=det[1], frozen_phonons=4))
            I[z] = float(m.adf(np.array([[6.0, 6.0]]), rng=np.random.default_rng(3))[0])
        singles[f"{det[0]:.0f}-{det[1]:.0f} mrad"] = {
            "sigma_C_A2": I[6] / unit_peak,
            "n_vs_C": {str(z): float(np.log(I[z] / I[6]) / np.log(z / 6)) for z in (14, 16, 42, 74)},
        }
    out["single_atoms"] = singles
    out["line_profile_rms_diff_rel_to_Mo_peak"] = float(np.sqrt(np.mean((fast_line - I_line) ** 2)) / I_fp[0])
    out["seconds"] = round(time.perf_counter() - t_start, 1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    d = ts * np.linalg.norm(direction)
    axes[0].plot(d, I_line, "k-", label="multislice (8 frozen phonons)")
    axes[0].plot(d, fast_line, "r--", label=f"fast mode, n={n_img:.2f}")
    axes[0].set_xlabel("distance along Mo-S2-Mo (Å)")
    axes[0].set_ylabel("fraction of beam on 80-180 mrad")
    axes[0].legend(fontsize=8)
    axes[0].set_title("MoS2 line profile, 60 keV, 30 mrad")
    sc = out["slice_convergence"]
    axes[1].plot([r["slice_A"] for r in sc], [r["I_Mo"] / sc[0]["I_Mo"] for r in sc], "o-", label="Mo")
    axes[1].plot([r["slice_A"] for r in sc], [r["I_S2"] / sc[0]["I_S2"] for r in sc], "s-", label="S2")
    axes[1].set_xlabel("slice thickness (Å)")
    axes[1].set_ylabel("intensity / finest")
    axes[1].set_title("convergence with slice thickness")
    axes[1].legend(fontsize=8)
    sp = out["sampling_convergence"]
    axes[2].plot([r["sampling_A"] for r in sp], [r["I_Mo"] / sp[-1]["I_Mo"] for r in sp], "o-", label="Mo")
    axes[2].plot([r["sampling_A"] for r in sp], [r["I_S2"] / sp[-1]["I_S2"] for r in sp], "s-", label="S2")
    axes[2].set_xlabel("sampling (Å)")
    axes[2].set_ylabel("intensity / finest")
    axes[2].set_title("convergence with sampling")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    (ROOT / "docs").mkdir(exist_ok=True)
    fig.savefig(ROOT / "docs" / "twin_multislice.png", dpi=110)
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
