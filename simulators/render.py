"""One frame of a specimen, with its ground truth: the twin's image-formation entry point.

:func:`render_frame` renders a given specimen (used by :class:`~stemagent.simulators.twin.TwinDriver`);
:func:`render_sample` builds a fresh random specimen around the field and renders it (the
training-data API, documented in :mod:`stemagent.simulators`). :func:`cramer_rao_bound_A`
computes the position CRLB of a site from a frame's truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stemagent.simulators.elements import symbol
from stemagent.simulators.fast_adf import ADFModel, render_fraction
from stemagent.simulators.optics import Aberrations, ProbeOptics
from stemagent.simulators.scan import NO_DRIFT, DetectorModel, DriftModel, apply_jitter, atom_scan_pixels, line_jitter_A
from stemagent.simulators.specimens import Specimen, build_specimen
from stemagent.types import ScanGeometry


@dataclass
class FrameTruth:
    """Ground truth of one rendered frame.

    Per visible *site* (atomic column; ``K`` of them): ``positions_A`` ``(K, 2)`` sample frame,
    ``pixels_rc`` ``(K, 2)`` where it appears in the image (drift, rotation and jitter applied),
    ``labels`` ``(K,)`` into ``class_names``, ``numbers`` ``(K,)`` summed Z of the column,
    ``species`` ``(K,)`` composition string (``"C"``, ``"Si"``, ``"S2"``, ``"SSe"``, ``""`` for an
    empty site), ``site_index`` ``(K,)`` into the specimen's sites, ``times_s`` ``(K,)`` when the
    beam passed.
    Per rendered *atom* (``N``): ``atom_ids``, ``atom_numbers``, ``atom_positions_A`` ``(N, 2)``,
    ``atom_pixels_rc`` ``(N, 2)``.
    Image model: ``expected_image`` ``(rows, cols)`` float32 is the noiseless mean of the image in
    the same (detector output) units; ``electrons_per_pixel`` the beam electrons per pixel;
    ``optics``, ``adf``, ``detector`` the models used; ``jitter_A`` ``(rows,)`` line jitter;
    ``drift_A`` ``(rows, 2)`` specimen drift at each line's start.
    """

    specimen_kind: str
    class_names: tuple[str, ...]
    geometry: ScanGeometry
    positions_A: np.ndarray
    pixels_rc: np.ndarray
    labels: np.ndarray
    numbers: np.ndarray
    species: np.ndarray
    site_index: np.ndarray
    times_s: np.ndarray
    atom_ids: np.ndarray
    atom_numbers: np.ndarray
    atom_positions_A: np.ndarray
    atom_pixels_rc: np.ndarray
    expected_image: np.ndarray
    electrons_per_pixel: float
    dose_e_per_A2: float
    optics: ProbeOptics
    adf: ADFModel
    detector: DetectorModel
    jitter_A: np.ndarray
    drift_A: np.ndarray
    start_s: float
    extras: dict[str, Any] = field(default_factory=dict)
    # what the renderer needs to re-render with modified atoms (for the CRLB)
    _atom_u: np.ndarray | None = field(default=None, repr=False)
    _atom_rc: np.ndarray | None = field(default=None, repr=False)  # unjittered pixel positions

    def render_expected(self, atom_pixels_rc: np.ndarray | None = None) -> np.ndarray:
        """Noiseless expected image for (possibly modified) *unjittered* atom pixel positions ``(N, 2)``."""
        rc = self._atom_rc if atom_pixels_rc is None else atom_pixels_rc
        assert rc is not None
        frac = render_fraction(
            self.geometry.shape_px,
            self.geometry.pixel_size_A,
            rc,
            self.adf.cross_section_A2(self.atom_numbers),
            self._atom_u if self._atom_u is not None else np.full(len(rc), 0.08),
            self.optics,
            self.adf,
            jitter_px=self.jitter_A / self.geometry.pixel_size_A[0],
        )
        return self.detector.mean(frac.astype(np.float64) * self.electrons_per_pixel).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for an ``.npz`` file (no pickled objects)."""
        return {
            "truth_positions_A": self.positions_A,
            "truth_pixels_rc": self.pixels_rc,
            "truth_labels": self.labels,
            "truth_numbers": self.numbers,
            "truth_species": self.species.astype("<U8"),
            "truth_site_index": self.site_index,
            "truth_times_s": self.times_s,
            "truth_atom_ids": self.atom_ids,
            "truth_atom_numbers": self.atom_numbers,
            "truth_atom_positions_A": self.atom_positions_A,
            "truth_atom_pixels_rc": self.atom_pixels_rc,
            "truth_expected_image": self.expected_image,
            "truth_jitter_A": self.jitter_A,
            "truth_drift_A": self.drift_A,
            "truth_class_names": np.asarray(self.class_names, dtype="<U16"),
        }


def _composition(numbers: np.ndarray, site_of: np.ndarray, sites: np.ndarray, n_sites: int) -> np.ndarray:
    """Composition strings of the given ``sites``, e.g. 'S2', 'SSe', 'Mo', '' (empty).

    ``numbers`` / ``site_of``: Z and site of the present atoms to consider.
    """
    wanted = np.zeros(n_sites, dtype=bool)
    wanted[sites] = True
    keep = wanted[site_of]
    key = site_of[keep].astype(np.int64) * 256 + numbers[keep]
    keys, counts = np.unique(key, return_counts=True)
    parts: dict[int, str] = {}
    cache: dict[tuple[int, int], str] = {}
    for k, c in zip(keys.tolist(), counts.tolist()):
        s, z = divmod(k, 256)
        frag = cache.get((z, c))
        if frag is None:
            frag = cache[(z, c)] = symbol(z) + (str(c) if c > 1 else "")
        parts[s] = parts.get(s, "") + frag
    return np.asarray([parts.get(s, "") for s in sites.tolist()], dtype="<U8")


def _stacked_columns(
    site: np.ndarray, xy: np.ndarray, sig: np.ndarray, u: np.ndarray, n_sites: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Group atoms into their sites' columns when every atom sits exactly at its column's (x, y)
    and columns hold several atoms: ``(column of each atom, column xy, summed cross-section,
    cross-section-weighted u)``; None when grouping would not help or would not be exact."""
    if len(site) < 2:
        return None
    first = np.full(n_sites, -1, dtype=np.int64)
    first[site[::-1]] = np.arange(len(site))[::-1]  # index of one atom per site
    used = np.flatnonzero(first >= 0)
    if len(used) * 1.5 > len(site):
        return None
    col_of_site = np.full(n_sites, -1, dtype=np.int64)
    col_of_site[used] = np.arange(len(used))
    col = col_of_site[site]
    col_xy = xy[first[used]]
    if np.max(np.abs(xy - col_xy[col])) > 1e-9:
        return None
    w = np.bincount(col, weights=sig, minlength=len(used))
    wu = np.bincount(col, weights=sig * u, minlength=len(used)) / np.maximum(w, 1e-300)
    return col, col_xy, w, wu


def frame_bounds(geometry: ScanGeometry, drift: DriftModel, start_s: float, margin_A: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Sample-frame box that can be seen during the frame (corners, drift range, margin)."""
    rows, cols = geometry.shape_px
    corners = geometry.pixel_to_sample(np.array([[0, 0], [0, cols - 1], [rows - 1, 0], [rows - 1, cols - 1]]))
    if drift.is_static:
        d = np.zeros((1, 2))
    else:
        d = drift.displacement_A(start_s + np.linspace(0.0, geometry.frame_time_s, 9))
    lo = corners.min(axis=0) - d.max(axis=0) - margin_A
    hi = corners.max(axis=0) - d.min(axis=0) + margin_A
    return (float(lo[0]), float(lo[1])), (float(hi[0]), float(hi[1]))


def render_frame(
    specimen: Specimen,
    geometry: ScanGeometry,
    electrons_per_pixel: float,
    rng: np.random.Generator,
    *,
    start_s: float = 0.0,
    optics: ProbeOptics | None = None,
    adf: ADFModel | None = None,
    detector: DetectorModel | None = None,
    drift: DriftModel | None = None,
    jitter_A: float | np.ndarray = 0.0,
    render_atoms: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    noise: bool = True,
) -> tuple[np.ndarray, FrameTruth]:
    """Render one frame of ``specimen``; returns ``(image float32 (rows, cols), FrameTruth)``.

    ``jitter_A``: rms line jitter (float) or an explicit per-line shift ``(rows,)``.
    ``render_atoms``: ``(xy (n, 2), numbers (n,), u_rms (n,))`` to image instead of the specimen's
    present atoms (the twin uses it to show atoms that moved mid-frame where the beam saw them);
    the truth still describes the specimen's state.
    """
    optics = optics or ProbeOptics()
    adf = adf or ADFModel()
    detector = detector or DetectorModel()
    drift = drift or NO_DRIFT
    rows, cols = geometry.shape_px
    jit = np.asarray(jitter_A, dtype=np.float64)
    jit = line_jitter_A(rows, float(jit), rng) if jit.ndim == 0 else jit.reshape(rows)
    lo, hi = frame_bounds(geometry, drift, start_s, adf.pad_A + 1.0)
    ids = specimen.in_box(lo, hi)
    xy = specimen.positions_A[ids, :2].copy()
    numbers = specimen.numbers[ids]
    sig_atoms = adf.cross_section_A2(numbers)
    u_atoms = specimen.u_rms_A[ids]
    columns = _stacked_columns(specimen.site_of_atom[ids], xy, sig_atoms, u_atoms, specimen.n_sites)
    if columns is not None:
        # atoms stacked along the beam share (x, y): map and splat each column once
        col_of_atom, col_xy, col_sig, col_u = columns
        rc_cols, _ = atom_scan_pixels(geometry, col_xy, start_s, drift)
        rc_atoms = rc_cols[col_of_atom]
    else:
        rc_atoms, _ = atom_scan_pixels(geometry, xy, start_s, drift)  # unjittered (jitter applied per line)
        rc_cols, col_sig, col_u = rc_atoms, sig_atoms, u_atoms
    if render_atoms is None:
        rc_img, sig_img, u_img = rc_cols, col_sig, col_u
    else:
        rc_img, _ = atom_scan_pixels(geometry, render_atoms[0], start_s, drift)
        sig_img, u_img = adf.cross_section_A2(render_atoms[1]), render_atoms[2]
    frac = render_fraction(
        geometry.shape_px,
        geometry.pixel_size_A,
        rc_img,
        sig_img,
        u_img,
        optics,
        adf,
        jitter_px=jit / geometry.pixel_size_A[0] if np.any(jit) else None,
    )
    lam = frac.astype(np.float64) * electrons_per_pixel
    image = detector.sample(lam, rng) if noise else detector.mean(lam).astype(np.float32)
    expected = detector.mean(lam).astype(np.float32)

    # --- truth: sites inside the frame ---
    labels_all = specimen.site_labels(ids)
    sites = specimen.sites_A
    in_box = np.flatnonzero(
        (sites[:, 0] >= lo[0]) & (sites[:, 0] <= hi[0]) & (sites[:, 1] >= lo[1]) & (sites[:, 1] <= hi[1])
    )
    site_rc, site_t = atom_scan_pixels(geometry, sites[in_box], start_s, drift, jitter_A=jit)
    vis = (site_rc[:, 0] >= -0.5) & (site_rc[:, 0] <= rows - 0.5) & (site_rc[:, 1] >= -0.5) & (site_rc[:, 1] <= cols - 0.5)
    sidx = in_box[vis]
    pres = ids  # rendered atoms are the present ones near the field
    comp = _composition(specimen.numbers[pres], specimen.site_of_atom[pres], sidx, specimen.n_sites)
    atom_rc_j = apply_jitter(geometry, rc_atoms, jit)
    line_t = geometry.line_start_times_s(start_s)
    extras: dict[str, Any] = {}
    if "polarization" in specimen.extras:
        extras["polarization"] = np.asarray(specimen.extras["polarization"])[sidx]
    truth = FrameTruth(
        specimen_kind=specimen.kind,
        class_names=specimen.class_names,
        geometry=geometry,
        positions_A=sites[sidx].copy(),
        pixels_rc=site_rc[vis],
        labels=labels_all[sidx],
        numbers=specimen.site_numbers(ids)[sidx].astype(np.int64),
        species=comp,
        site_index=sidx,
        times_s=site_t[vis],
        atom_ids=ids,
        atom_numbers=numbers,
        atom_positions_A=xy,
        atom_pixels_rc=atom_rc_j,
        expected_image=expected,
        electrons_per_pixel=float(electrons_per_pixel),
        dose_e_per_A2=float(electrons_per_pixel / (geometry.pixel_size_A[0] * geometry.pixel_size_A[1])),
        optics=optics,
        adf=adf,
        detector=detector,
        jitter_A=jit,
        drift_A=drift.displacement_A(line_t),
        start_s=float(start_s),
        extras=extras,
        _atom_u=specimen.u_rms_A[ids],
        _atom_rc=rc_atoms,
    )
    return image, truth


def render_sample(
    specimen_kind: str,
    geometry: ScanGeometry,
    dose_e_per_A2: float,
    rng: np.random.Generator,
    *,
    optics: ProbeOptics | None = None,
    aberrations: Aberrations | dict[str, float] | None = None,
    energy_keV: float | None = None,
    convergence_mrad: float | None = None,
    source_fwhm_A: float | None = None,
    z_exponent: float = 1.8,
    adf: ADFModel | None = None,
    detector: DetectorModel | None = None,
    drift: DriftModel | None = None,
    jitter_A: float = 0.0,
    specimen_options: dict[str, Any] | None = None,
    specimen: Specimen | None = None,
    start_s: float = 0.0,
) -> tuple[np.ndarray, FrameTruth]:
    """Training-data API: a fresh random specimen under ``geometry``, one noisy frame and its truth.

    See :mod:`stemagent.simulators` for the full description. ``dose_e_per_A2`` sets the beam
    electrons per pixel (``dose * pixel area``); the geometry's dwell only sets the timing used
    by drift. Optics: pass ``optics`` or any of ``energy_keV``, ``convergence_mrad``,
    ``source_fwhm_A``, ``aberrations`` (an :class:`Aberrations` or a dict such as
    ``{"C10_A": 20, "C12_A": 10, "phi12_rad": 0.3}``).
    """
    if not (np.isfinite(dose_e_per_A2) and dose_e_per_A2 > 0):
        raise ValueError(f"dose_e_per_A2={dose_e_per_A2!r}: must be a positive dose")
    base = optics or ProbeOptics()
    ab = aberrations if aberrations is not None else base.aberrations
    if isinstance(ab, dict):
        ab = Aberrations(**ab)
    optics = ProbeOptics(
        energy_keV=energy_keV if energy_keV is not None else base.energy_keV,
        convergence_mrad=convergence_mrad if convergence_mrad is not None else base.convergence_mrad,
        aberrations=ab,
        source_fwhm_A=source_fwhm_A if source_fwhm_A is not None else base.source_fwhm_A,
    )
    adf = adf or ADFModel(z_exponent=z_exponent)
    drift = drift or NO_DRIFT
    if specimen is None:
        lo, hi = frame_bounds(geometry, drift, start_s, adf.pad_A + 4.0)
        size = (hi[0] - lo[0], hi[1] - lo[1])
        center = ((hi[0] + lo[0]) / 2.0, (hi[1] + lo[1]) / 2.0)
        specimen = build_specimen(specimen_kind, size_A=size, center_A=center, rng=rng, **(specimen_options or {}))
    px, py = geometry.pixel_size_A
    return render_frame(
        specimen,
        geometry,
        dose_e_per_A2 * px * py,
        rng,
        start_s=start_s,
        optics=optics,
        adf=adf,
        detector=detector,
        drift=drift,
        jitter_A=jitter_A,
    )


def sample_conditions(rng: np.random.Generator, specimen_kind: str | None = None) -> dict[str, Any]:
    """Random but plausible imaging conditions for domain randomisation, as keyword arguments of
    :func:`render_sample` (plus ``dose_e_per_A2``): beam energy and aperture, small residual
    aberrations, source size, Z exponent, detector gain/offset/read noise, drift and jitter."""
    energy = float(rng.choice([60.0, 80.0, 100.0, 200.0, 300.0]))
    light = specimen_kind in (None, "graphene")
    return {
        "dose_e_per_A2": float(10 ** rng.uniform(4.0, 6.5) if light else 10 ** rng.uniform(3.5, 6.0)),
        "energy_keV": energy,
        "convergence_mrad": float(rng.uniform(20.0, 35.0)),
        "aberrations": {
            "C10_A": float(rng.normal(0.0, 15.0)),
            "C12_A": float(abs(rng.normal(0.0, 10.0))),
            "phi12_rad": float(rng.uniform(0.0, np.pi)),
            "C30_A": float(rng.normal(0.0, 5e3)),
        },
        "source_fwhm_A": float(rng.uniform(0.2, 0.8)),
        "z_exponent": float(rng.uniform(1.5, 1.9)),
        "detector": DetectorModel(
            gain=float(10 ** rng.uniform(-0.5, 1.0)),
            offset=float(rng.uniform(0.0, 10.0)),
            read_noise=float(rng.uniform(0.0, 2.0)),
        ),
        "drift": DriftModel(
            velocity_A_per_s=(float(rng.normal(0.0, 2.0)), float(rng.normal(0.0, 2.0))),
            wobble_amplitude_A=float(rng.uniform(0.0, 0.3)),
            wobble_period_s=float(rng.uniform(0.5, 5.0)),
            random_walk_A_per_sqrt_s=float(rng.uniform(0.0, 0.1)),
            seed=int(rng.integers(2**31)),
        ),
        "jitter_A": float(rng.uniform(0.0, 0.08)),
    }


def cramer_rao_bound_A(truth: FrameTruth, site: int, step_px: float = 0.05) -> tuple[float, float]:
    """1-sigma Cramér-Rao bound ``(sigma_x, sigma_y)`` in Å on the position of visible site ``site``
    (an index into ``truth.positions_A``), from the Poisson + read-noise likelihood of the image.

    All atoms of the column move together; the other columns are known. Fisher information
    ``F = sum_pixels (d mu)^T (d mu) / var`` with ``var = gain^2 eff * electrons + read_noise^2``.
    The derivative is taken in pixel units along (row, col) and converted to Å in the scan frame.
    """
    sidx = truth.site_index[site]
    # the specimen atoms of that site are those rendered with the same site position
    rc0 = truth._atom_rc
    assert rc0 is not None
    d2 = np.sum((truth.atom_positions_A - truth.positions_A[site]) ** 2, axis=1)
    members = np.flatnonzero(d2 < 0.3**2)
    if len(members) == 0:
        raise ValueError(f"site={site} (specimen site {sidx}): empty column, no position to estimate")
    det = truth.detector
    mu0 = truth.render_expected(rc0).astype(np.float64)
    var = det.gain**2 * det.efficiency * np.maximum((mu0 - det.offset) / max(det.gain * det.efficiency, 1e-30), 0.0) + det.read_noise**2
    var = np.maximum(var, 1e-12)
    grads = []
    for axis in (0, 1):
        plus = rc0.copy()
        minus = rc0.copy()
        plus[members, axis] += step_px
        minus[members, axis] -= step_px
        g = (truth.render_expected(plus).astype(np.float64) - truth.render_expected(minus).astype(np.float64)) / (2 * step_px)
        grads.append(g.reshape(-1))
    G = np.stack(grads, axis=1)  # (P, 2) in (row, col)
    F = G.T @ (G / var.reshape(-1, 1))
    cov = np.linalg.inv(F)
    px, py = truth.geometry.pixel_size_A
    return float(np.sqrt(cov[1, 1]) * px), float(np.sqrt(cov[0, 0]) * py)
