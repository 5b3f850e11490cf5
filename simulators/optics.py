"""Probe-forming optics: wavelength, aberration function, aperture, probe intensity.

Conventions: aberration coefficients in Å (``C10`` defocus, ``C12`` two-fold astigmatism with
azimuth ``phi12_rad``, ``C30`` spherical aberration, ``C50`` fifth-order spherical), convergence
semi-angle in mrad, beam energy in keV. The aberration phase (Krivanek notation) is

    chi(theta, phi) = 2 pi / lambda * ( C10 theta^2 / 2 + C12 theta^2 cos(2 (phi - phi12)) / 2
                                        + C30 theta^4 / 4 + C50 theta^6 / 6 )

with ``theta = lambda k``. The probe wave is ``IFFT[A(k) exp(-i chi(k))]`` and its intensity,
blurred by a Gaussian for the finite (incoherent) source size, is normalised to integrate to one
(units 1/Å²).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

ELECTRON_REST_ENERGY_KEV = 510.99895
HC_KEV_A = 12.398419843


def electron_wavelength_A(energy_keV: float) -> float:
    """Relativistic electron wavelength ``h c / sqrt(E (E + 2 m c^2))`` in Å."""
    if not (math.isfinite(energy_keV) and energy_keV > 0):
        raise ValueError(f"energy_keV={energy_keV!r}: must be a positive energy")
    return HC_KEV_A / math.sqrt(energy_keV * (energy_keV + 2.0 * ELECTRON_REST_ENERGY_KEV))


def interaction_constant(energy_keV: float) -> float:
    """Relativistic interaction constant ``sigma`` in rad / (V Å) (phase = sigma * v_z)."""
    lam = electron_wavelength_A(energy_keV)
    e0 = ELECTRON_REST_ENERGY_KEV
    return 2.0 * math.pi / (lam * energy_keV * 1e3) * (e0 + energy_keV) / (2.0 * e0 + energy_keV)


def max_energy_transfer_eV(energy_keV: float, mass_u: float) -> float:
    """Largest energy a beam electron can give a nucleus of mass ``mass_u`` (head-on), eV."""
    mc2 = mass_u * 931494.10242  # keV
    e = energy_keV
    return 2.0 * e * (e + 2.0 * ELECTRON_REST_ENERGY_KEV) / mc2 * 1e3


def diffraction_limited_fwhm_A(energy_keV: float, convergence_mrad: float) -> float:
    """FWHM of the Airy intensity of an aberration-free probe: ``0.5145 lambda / alpha``."""
    return 0.5145 * electron_wavelength_A(energy_keV) / (convergence_mrad * 1e-3)


@dataclass(frozen=True)
class Aberrations:
    """Axial aberration coefficients in Å (angle in rad). All zero: a perfect lens."""

    C10_A: float = 0.0
    C12_A: float = 0.0
    phi12_rad: float = 0.0
    C30_A: float = 0.0
    C50_A: float = 0.0

    def chi(self, kx: np.ndarray, ky: np.ndarray, wavelength_A: float) -> np.ndarray:
        """Aberration phase in rad at spatial frequencies ``kx, ky`` (1/Å)."""
        tx = kx * wavelength_A
        ty = ky * wavelength_A
        t2 = tx * tx + ty * ty
        phi = np.arctan2(ty, tx)
        out = 0.5 * self.C10_A * t2
        if self.C12_A:
            out = out + 0.5 * self.C12_A * t2 * np.cos(2.0 * (phi - self.phi12_rad))
        if self.C30_A:
            out = out + 0.25 * self.C30_A * t2 * t2
        if self.C50_A:
            out = out + self.C50_A * t2 * t2 * t2 / 6.0
        return (2.0 * np.pi / wavelength_A) * out


@dataclass(frozen=True)
class ProbeOptics:
    """Beam energy, convergence aperture, aberrations and source size."""

    energy_keV: float = 60.0
    convergence_mrad: float = 30.0
    aberrations: Aberrations = field(default_factory=Aberrations)
    source_fwhm_A: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.convergence_mrad) and self.convergence_mrad > 0):
            raise ValueError(f"convergence_mrad={self.convergence_mrad!r}: must be positive")
        if not (math.isfinite(self.source_fwhm_A) and self.source_fwhm_A >= 0):
            raise ValueError(f"source_fwhm_A={self.source_fwhm_A!r}: must be non-negative")
        electron_wavelength_A(self.energy_keV)

    @property
    def wavelength_A(self) -> float:
        return electron_wavelength_A(self.energy_keV)

    @property
    def aperture_cutoff_inv_A(self) -> float:
        """Largest spatial frequency passed by the aperture, ``alpha / lambda`` (1/Å)."""
        return self.convergence_mrad * 1e-3 / self.wavelength_A

    @property
    def source_sigma_A(self) -> float:
        return self.source_fwhm_A / (2.0 * math.sqrt(2.0 * math.log(2.0)))

    def max_grid_spacing_A(self) -> float:
        """Coarsest grid on which the probe intensity is not aliased (Nyquist of 2 alpha/lambda)."""
        return 1.0 / (4.0 * self.aperture_cutoff_inv_A)

    def wave_fourier(self, kx: np.ndarray, ky: np.ndarray, k_step: float) -> np.ndarray:
        """Aperture times ``exp(-i chi)`` at ``(kx, ky)``; the aperture edge is soft over ``k_step``."""
        k = np.sqrt(kx * kx + ky * ky)
        kc = self.aperture_cutoff_inv_A
        aperture = np.clip((kc - k) / max(k_step, 1e-12) + 0.5, 0.0, 1.0)
        return aperture * np.exp(-1j * self.aberrations.chi(kx, ky, self.wavelength_A))

    def probe_wave(self, shape: tuple[int, int], spacing_A: tuple[float, float]) -> np.ndarray:
        """Complex probe ``(ny, nx)`` centred at index ``(0, 0)`` (periodic), ``sum |psi|^2 = 1``."""
        ny, nx = shape
        sy, sx = spacing_A
        ky = np.fft.fftfreq(ny, d=sy)[:, None]
        kx = np.fft.fftfreq(nx, d=sx)[None, :]
        step = max(1.0 / (ny * sy), 1.0 / (nx * sx))
        wf = self.wave_fourier(kx, ky, step)
        psi = np.fft.ifft2(wf)
        norm = np.sqrt(np.sum(np.abs(psi) ** 2))
        return psi / norm

    def intensity_spectrum(self, shape: tuple[int, int], spacing_A: tuple[float, float]) -> np.ndarray:
        """Real-FFT ``(ny, nx//2+1)`` of the probe intensity density (1/Å²), source blur included.

        Multiplying a grid of point weights' ``rfft2`` by this and inverting gives the weights
        convolved with the probe, i.e. ``sum_j w_j P(r - r_j)``.
        """
        return _intensity_spectrum_cached(self, tuple(shape), tuple(float(s) for s in spacing_A))

    def intensity(self, shape: tuple[int, int], spacing_A: tuple[float, float], centered: bool = True) -> np.ndarray:
        """Probe intensity density (1/Å²) on a grid; ``centered`` puts the probe at the middle.

        Computed on a window of at least :data:`MIN_WINDOW_A` (so the aperture is finely sampled
        in reciprocal space) and cropped, i.e. not folded periodically."""
        ny, nx = shape
        sy, sx = spacing_A
        my = max(1, int(math.ceil(MIN_WINDOW_A / (ny * sy))))
        mx = max(1, int(math.ceil(MIN_WINDOW_A / (nx * sx))))
        big = np.fft.fftshift(_raw_intensity(self, (ny * my, nx * mx), (float(sy), float(sx))))
        cy, cx = (ny * my) // 2, (nx * mx) // 2
        img = big[cy - ny // 2 : cy - ny // 2 + ny, cx - nx // 2 : cx - nx // 2 + nx]
        return img if centered else np.fft.ifftshift(img)


#: smallest real-space window (Å) on which probe intensities are computed
MIN_WINDOW_A = 25.0


def _raw_intensity(optics: ProbeOptics, shape: tuple[int, int], spacing: tuple[float, float]) -> np.ndarray:
    """Periodic probe intensity density on exactly this grid, probe at index (0, 0)."""
    ny, nx = shape
    sy, sx = spacing
    psi = optics.probe_wave(shape, spacing)
    inten = np.abs(psi) ** 2 / (sy * sx)
    sig = optics.source_sigma_A
    if sig > 0:  # incoherent source: Gaussian blur of the intensity
        ky = np.fft.fftfreq(ny, d=sy)[:, None]
        kx = np.fft.rfftfreq(nx, d=sx)[None, :]
        blur = np.exp(-2.0 * np.pi**2 * sig**2 * (kx * kx + ky * ky))
        inten = np.fft.irfft2(np.fft.rfft2(inten) * blur, s=shape)
    return inten


@lru_cache(maxsize=32)
def _intensity_spectrum_cached(optics: ProbeOptics, shape: tuple[int, int], spacing: tuple[float, float]) -> np.ndarray:
    ny, nx = shape
    sy, sx = spacing
    # compute on a window of at least MIN_WINDOW_A and fold it onto this periodic grid
    my = max(1, int(math.ceil(MIN_WINDOW_A / (ny * sy))))
    mx = max(1, int(math.ceil(MIN_WINDOW_A / (nx * sx))))
    big = _raw_intensity(optics, (ny * my, nx * mx), spacing)
    inten = big.reshape(my, ny, mx, nx).sum(axis=(0, 2))
    spec = np.fft.rfft2(inten)
    spec.setflags(write=False)
    return spec


def fwhm_of_profile(profile: np.ndarray, spacing_A: float) -> float:
    """Full width at half maximum of a 1-D peaked profile, linear interpolation between samples."""
    p = np.asarray(profile, dtype=np.float64)
    i = int(np.argmax(p))
    half = p[i] / 2.0
    left = i
    while left > 0 and p[left] > half:
        left -= 1
    right = i
    while right < len(p) - 1 and p[right] > half:
        right += 1
    xl = left + (half - p[left]) / (p[left + 1] - p[left])
    xr = right - 1 + (p[right - 1] - half) / (p[right - 1] - p[right])
    return (xr - xl) * spacing_A
