"""The foundation's minimal twin: a graphene-like honeycomb lattice imaged with Poisson noise.

Enough physics to run the closed loop honestly (atoms where the ground truth says, dose from
beam current and dwell, counting noise, per-line times on an injected clock); the full physical
twin lives beside it in this package. Pace is set by the clock: with
:class:`~stemagent.clock.VirtualClock` frames come as fast as they can be computed, with
:class:`~stemagent.clock.SystemClock` at the rate a real scan would take.
"""

from __future__ import annotations

import math
from typing import AsyncIterator

import numpy as np
from scipy import ndimage

from stemagent.clock import Clock, VirtualClock
from stemagent.config import MinimalTwinConfig
from stemagent.driver import DriverFault
from stemagent import dose as dose_model
from stemagent.types import Capabilities, Frame, ParkResult, ScanGeometry


def honeycomb_positions(lattice_A: float, size_A: float) -> np.ndarray:
    """Atom positions ``(N, 2)`` (x, y) Å of a honeycomb lattice filling a square centred on 0."""
    a1 = np.array([lattice_A, 0.0])
    a2 = np.array([lattice_A / 2.0, lattice_A * math.sqrt(3) / 2.0])
    basis = np.array([[0.0, 0.0], [lattice_A / 2.0, lattice_A / (2.0 * math.sqrt(3))]])
    n = int(math.ceil(size_A / lattice_A)) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    cells = i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2
    pts = (cells[:, None, :] + basis[None, :, :]).reshape(-1, 2)
    half = size_A / 2.0
    keep = (np.abs(pts[:, 0]) <= half) & (np.abs(pts[:, 1]) <= half)
    return pts[keep]


class MinimalTwinDriver:
    """In-process :class:`~stemagent.driver.Driver` over a static honeycomb specimen."""

    name = "minimal-twin"

    def __init__(self, config: MinimalTwinConfig, *, seed: int = 0, clock: Clock | None = None) -> None:
        self.config = config
        self.clock: Clock = clock if clock is not None else VirtualClock()
        self._rng = np.random.default_rng(seed)
        self.atoms_A = honeycomb_positions(config.lattice_A, config.specimen_size_A)
        self.beam_blanked = True
        self.connected = False
        self.frames_acquired = 0
        self._busy_until_s = 0.0

    # --- ground truth (not part of the Driver protocol) ----------------------------------
    def ground_truth_positions(self, geometry: ScanGeometry, margin_A: float = 0.0) -> np.ndarray:
        """True atom positions (x, y) Å inside ``geometry``."""
        return self.atoms_A[geometry.contains(self.atoms_A, margin_A)]

    def noiseless_image(self, geometry: ScanGeometry) -> np.ndarray:
        """Expected detector signal per incident electron, ``(rows, cols)``."""
        rows, cols = geometry.shape_px
        px = float(np.mean(geometry.pixel_size_A))
        sigma_px = self.config.atom_sigma_A / px
        pad = int(np.ceil(4 * sigma_px)) + 2  # atoms this far outside still light the frame's edge
        near = self.atoms_A[geometry.contains(self.atoms_A, -(pad + 1) * px)]
        rc = geometry.sample_to_pixel(near) + pad
        r0 = np.floor(rc[:, 0]).astype(int)
        c0 = np.floor(rc[:, 1]).astype(int)
        inside = (r0 >= 0) & (c0 >= 0) & (r0 < rows + 2 * pad - 1) & (c0 < cols + 2 * pad - 1)
        rc, r0, c0 = rc[inside], r0[inside], c0[inside]
        fr = rc[:, 0] - r0
        fc = rc[:, 1] - c0
        grid = np.zeros((rows + 2 * pad, cols + 2 * pad))
        for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (1, 0, fr * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 1, fr * fc)):
            np.add.at(grid, (r0 + dr, c0 + dc), w)
        blurred = ndimage.gaussian_filter(grid, sigma_px, mode="constant")[pad:-pad, pad:-pad]
        peak = 1.0 / (2 * math.pi * sigma_px**2)
        return self.config.background + 0.5 * blurred / peak

    # --- Driver protocol -------------------------------------------------------------------
    async def connect(self) -> None:
        self.connected = True
        self._busy_until_s = self.clock.monotonic()

    async def close(self) -> None:
        self.beam_blanked = True
        self.connected = False

    async def capabilities(self) -> Capabilities:
        return Capabilities(
            name=self.name,
            max_fov_A=self.config.specimen_size_A,
            max_shape_px=(4096, 4096),
            min_dwell_s=1e-7,
            max_dwell_s=1e-2,
            can_park=True,
            detectors=("HAADF",),
            beam_energy_keV=60.0,
            beam_current_pA=self.config.beam_current_pA,
            probe_fwhm_A=self.probe_fwhm_A,
        )

    @property
    def probe_fwhm_A(self) -> float:
        """The probe is as wide as an atom's image (``atom_sigma_A``)."""
        return dose_model.FWHM_PER_SIGMA * self.config.atom_sigma_A

    def _check(self) -> None:
        if not self.connected:
            raise DriverFault("minimal twin is not connected")

    async def acquire(self, geometry: ScanGeometry) -> Frame:
        self._check()
        start = max(self.clock.monotonic(), self._busy_until_s)
        self.beam_blanked = False
        px, py = geometry.pixel_size_A
        dose = dose_model.scan_dose_e_per_A2(self.config.beam_current_pA, geometry)
        electrons = dose * px * py
        expected = electrons * self.noiseless_image(geometry)
        image = self._rng.poisson(expected).astype(np.float32)
        await self.clock.sleep(start + geometry.frame_time_s - self.clock.monotonic())
        self._busy_until_s = start + geometry.frame_time_s
        self.frames_acquired += 1
        return Frame(
            image=image,
            geometry=geometry,
            line_times_s=geometry.line_start_times_s(start),
            index=self.frames_acquired - 1,
            dose_e_per_A2=dose,
            source=self.name,
        )

    async def stream(self, geometry: ScanGeometry, n_frames: int | None = None) -> AsyncIterator[Frame]:
        i = 0
        while n_frames is None or i < n_frames:
            yield await self.acquire(geometry)
            i += 1

    async def park(self, position_A: tuple[float, float], dwell_s: float) -> ParkResult:
        self._check()
        start = max(self.clock.monotonic(), self._busy_until_s)
        self.beam_blanked = False
        n = max(1, min(10_000, int(round(dwell_s / 1e-4))))
        interval = dwell_s / n
        g = ScanGeometry(center_A=tuple(position_A), fov_A=(0.1, 0.1), shape_px=(1, 1), dwell_s=interval)  # type: ignore[arg-type]
        level = float(self.noiseless_image(g)[0, 0])
        electrons = dose_model.electrons(self.config.beam_current_pA, interval)
        signal = self._rng.poisson(electrons * level, size=n).astype(np.float32)
        await self.clock.sleep(start + dwell_s - self.clock.monotonic())
        self._busy_until_s = start + dwell_s
        return ParkResult(
            position_A=(float(position_A[0]), float(position_A[1])),
            dwell_s=dwell_s,
            start_time_s=start,
            sample_interval_s=interval,
            signal=signal,
            dose_e_per_A2=dose_model.park_dose_e_per_A2(self.config.beam_current_pA, dwell_s, self.probe_fwhm_A),
        )

    async def blank(self) -> None:
        self.beam_blanked = True
