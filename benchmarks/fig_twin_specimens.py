"""docs/twin_specimens.png: one fast-mode frame of each twin specimen with its ground truth overlaid.

Each panel is ``render_sample`` output (Poisson noise at the dose given, drift and scan-line
jitter on); markers are the truth's ``pixels_rc`` coloured by class label. The film panel also
draws the domain walls from the motif chain (ground-truth wall position per unit-cell row) and
colours B columns by polarisation. Prints a JSON summary. Usage:
``python benchmarks/fig_twin_specimens.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stemagent.simulators import render_sample
from stemagent.simulators.scan import DriftModel
from stemagent.simulators.specimens import build_specimen
from stemagent.types import ScanGeometry

ROOT = Path(__file__).resolve().parents[1]

PANELS = [
    ("graphene", "graphene: Si dopants, vacancies", 25.6, 2e6, {"n_si": 3, "vacancy_per_nm2": 0.3}),
    ("mos2", "MoS2: S vacancies, Se on S", 25.6, 1e6, {"vacancy_fraction": 0.06, "substitution_fraction": 0.08}),
    ("ws2", "WS2: S vacancies, Se on S", 25.6, 1e6, {"vacancy_fraction": 0.06, "substitution_fraction": 0.08}),
    ("srtio3", "SrTiO3 [001], 10 cells", 32.0, 2e5, {"n_cells": 10}),
    ("film", "PbTiO3 film, Markov-chain domain walls", 64.0, 1e5, {"n_cells": 8, "domain_width_A": 30.0}),
]
COLOURS = ["tab:cyan", "tab:red", "yellow", "tab:green", "tab:purple"]


def main() -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(15.5, 11))
    axes = grid.reshape(-1)
    axes[-1].axis("off")
    summary = {}
    for ax, (kind, title, fov, dose, opts) in zip(axes, PANELS):
        rng = np.random.default_rng(4)
        geo = ScanGeometry(center_A=(0.0, 0.0), fov_A=(fov, fov), shape_px=(256, 256), rotation_rad=0.05, dwell_s=2e-6)
        drift = DriftModel(velocity_A_per_s=(0.5, 0.3), seed=2)
        specimen = None
        if kind == "film":
            specimen = build_specimen("film", size_A=(fov + 12, fov + 12), rng=rng, **opts)
        image, truth = render_sample(kind, geo, dose, rng, drift=drift, jitter_A=0.03, specimen_options=opts,
                                     specimen=specimen, source_fwhm_A=0.3)
        ax.imshow(image, cmap="gray", interpolation="nearest")
        counts = {}
        for k, name in enumerate(truth.class_names):
            sel = truth.labels == k
            counts[name] = int(sel.sum())
            if not sel.any():
                continue
            if kind in ("graphene", "mos2", "ws2") and name in ("C", "metal", "chalcogen"):
                size, alpha = 4, 0.35
            else:
                size, alpha = 28, 0.95
            ax.scatter(truth.pixels_rc[sel, 1], truth.pixels_rc[sel, 0], s=size * 2, facecolors="none",
                       edgecolors=COLOURS[k % len(COLOURS)], linewidths=1.0, alpha=alpha, label=f"{name} ({sel.sum()})")
        if kind == "film" and specimen is not None:
            pol = truth.extras["polarization"]
            b = truth.labels == truth.class_names.index("B")
            ax.scatter(truth.pixels_rc[b, 1], truth.pixels_rc[b, 0], c=pol[b], cmap="coolwarm", vmin=-1, vmax=1, s=10)
            wx = specimen.extras["wall_x_A"]
            wy = specimen.extras["row_y_A"]
            for w in range(wx.shape[0]):
                rc = geo.sample_to_pixel(np.stack([wx[w], wy], axis=1))
                ax.plot(rc[:, 1], rc[:, 0], "w-", lw=1.0, alpha=0.8)
            summary["film_wall_motifs_first_wall"] = specimen.extras["wall_motifs"][0][:12]
        ax.set_xlim(-0.5, 255.5)
        ax.set_ylim(255.5, -0.5)
        ax.set_title(f"{title}\n{fov:.0f} Å field, 256 px, {dose:.0e} e/Å²", fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=8, loc="lower left", framealpha=0.7)
        summary[kind] = counts
    fig.tight_layout()
    (ROOT / "docs").mkdir(exist_ok=True)
    fig.savefig(ROOT / "docs" / "twin_specimens.png", dpi=100)
    return summary


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
