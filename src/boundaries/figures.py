"""Figures of the boundary analysis (matplotlib, from the ``bench`` extra; imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stemagent.boundaries.omega import AlphaCurve, GrowthFit
from stemagent.boundaries.trace import BoundaryTrace
from stemagent.types import ScanGeometry


def _plt() -> Any:
    # matplotlib is optional (the 'bench' extra): imported when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def boundary_overlay(path: str | Path, image: np.ndarray, geometry: ScanGeometry, traces: Sequence[BoundaryTrace],
                     truth_paths_A: Sequence[np.ndarray] = (), title: str = "") -> None:
    """The frame with every read boundary drawn through its columns (colour: motif confidence),
    its first column marked; ``truth_paths_A`` (optional) drawn as thin white lines underneath."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 7.5))
    ax.imshow(image, cmap="gray", interpolation="nearest")
    for p in truth_paths_A:
        rc = geometry.sample_to_pixel(np.asarray(p))
        ax.plot(rc[:, 1], rc[:, 0], color="white", lw=3.0, alpha=0.5)
    cmap = plt.get_cmap("plasma")
    for t in traces:
        rc = geometry.sample_to_pixel(t.positions_A)
        conf = np.concatenate([[t.step_confidence[0]], t.motif_confidence, [t.step_confidence[-1]]]) if len(t) > 1 else t.step_confidence
        for m in range(len(t)):
            ax.plot(rc[m : m + 2, 1], rc[m : m + 2, 0], color=cmap(float(np.clip(conf[min(m, len(conf) - 1)], 0, 1))), lw=1.6)
        ax.plot(rc[0, 1], rc[0, 0], "o", color="cyan", ms=4)
    ax.set_title(title or f"{len(traces)} boundaries read (colour: motif confidence; cyan: first column)")
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def alpha_curve(path: str | Path, curve: AlphaCurve, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(curve.d, curve.alpha, yerr=curve.alpha_stderr, fmt="o-", capsize=3, label="power-law alpha of Omega(N)")
    ax.axvline(curve.peak_d, color="gray", ls="--", label=f"peak d = {curve.peak_d:.2f}")
    ax.set_xlabel("d (Y2 -> Y1 as a stair)")
    ax.set_ylabel("alpha")
    ax2 = ax.twinx()
    ax2.plot(curve.d, curve.entropy_rate, "s:", color="tab:green", ms=4, label="entropy rate (nats/step)")
    ax2.set_ylabel("entropy rate, nats/step", color="tab:green")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower center")
    ax.set_title(title or "alpha(d): growth exponent of Omega(N) over d")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def omega_loglog(path: str | Path, n: np.ndarray, log_omega: np.ndarray, fit: GrowthFit, sampled: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 log_count: np.ndarray | None = None, title: str = "") -> None:
    """``Omega(N)`` on log-log axes: exact points, sampled points with error bars, both fits."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot(n, np.exp(log_omega), "o", ms=3, label="Omega(N), transfer matrix")
    if sampled is not None:
        sn, sy, se = sampled
        ax.errorbar(sn, np.exp(sy), yerr=[np.exp(sy) - np.exp(sy - 2 * se), np.exp(sy + 2 * se) - np.exp(sy)], fmt="s", ms=4,
                    label="Omega(N), sampled (2 s.e.)")
    if log_count is not None:
        ax.plot(n, np.exp(log_count), ".", color="gray", ms=2, label="permitted paths (count)")
    grid = np.linspace(min(n), max(n) if sampled is None else max(max(n), max(sampled[0])), 200)
    ax.plot(grid, np.exp(fit.alpha * np.log(grid) + fit.intercept), "-", label=f"power law: alpha = {fit.alpha:.2f} ± {fit.alpha_stderr:.2f}")
    c0 = None
    if np.isfinite(fit.lam):
        # intercept of the exponential form from the points
        c0 = float(np.mean(log_omega - fit.lam * n - fit.beta * np.log(n)))
        ax.plot(grid, np.exp(fit.lam * grid + fit.beta * np.log(grid) + c0), "--", label=f"exp(lambda N) N^beta: lambda = {fit.lam:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (steps)")
    ax.set_ylabel("Omega(N)")
    ax.legend(fontsize=8)
    ax.set_title(title or "microstates of segments between equivalent fixed ends")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
