"""Electron scattering factors and projected potentials (for multislice).

Parametrisation: I. Lobato and D. Van Dyck, "An accurate parameterization for scattering
factors, electron densities and electrostatic potentials for neutral atoms that obey all
physical constraints", Acta Cryst. A70 (2014) 636-649. Each element has five pairs
``(a_i, b_i)`` and the electron scattering factor is

    f_e(g) = sum_i a_i (2 + b_i g^2) / (1 + b_i g^2)^2        [Å], g in 1/Å.

The numbers below are the published coefficients for the elements the twin uses, typed in as
a table (they were read off a tabulation of the paper's values). Sanity checks in the unit
tests: ``f_e(0)`` of carbon is 2.51 Å, and for large ``g`` every element approaches the
Mott-Bethe limit ``Z / (2 pi^2 a0 g^2)``.

The projected potential of atoms at positions ``r_j`` in a periodic cell of area ``A`` has the
Fourier coefficients (Kirkland's convention, ``h^2 / (2 pi m0 e) = 2 pi a0 e = 47.878 V Å^2``)

    v_z(g) = (47.878 / A) sum_j f_e(|g|) exp(-2 pi i g . r_j)          [V Å]

which is how :func:`projected_potential` builds slices: directly in reciprocal space, so the
potential is periodic and band-limited by construction.
"""

from __future__ import annotations

import numpy as np

from stemagent.simulators.elements import atomic_number

#: Bohr radius, Å
BOHR_A = 0.529177210903
#: 2 pi a0 e in V Å^2 (e = 14.39964 V Å), the factor between f_e and the potential.
TWO_PI_A0_E = 2.0 * np.pi * BOHR_A * 14.3996454

# Z: ((a1..a5), (b1..b5)); a in Å, b in Å^2
LOBATO_2014: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {
    6: (
        (124.466088621343, -220.352857078963, 195.235352280479, -98.1079361269799, 0.0142023041213623),
        (2.42120849256005, 2.30537943752425, 2.04851932106564, 1.93352552917547, 0.0768976818478339),
    ),
    8: (
        (29.9474045242362, -77.6101266255278, 99.8817764623144, -51.2127005505673, 0.00819618954446032),
        (1.3028398788001, 1.15794105258309, 1.00988549338025, 0.943327971433266, 0.0433197611321825),
    ),
    14: (
        (2.87189142611612, -2.06173501195173, 2.17114024204478, -0.0663073633058801, 0.00301070709670513),
        (5.08487103642989, 0.429178185305126, 0.366485434192162, 0.119710611296903, 0.0143994536128397),
    ),
    16: (
        (2.67971415610199, -0.474252822230755, 0.514835948989687, -0.0958360024990722, 0.00248871963818935),
        (3.06889121199971, 0.378216702185809, 0.188721811902548, 0.0923370590031494, 0.0111920877241144),
    ),
    22: (
        (8.57595775238129, -210.331563465304, 206.097172601541, 0.0477773948977261, 0.00050571648448032),
        (6.00780668875581, 2.60285856745213, 2.55352345051105, 0.0711429484024153, 0.00485628439383726),
    ),
    34: (
        (3.64905047801926, -43.6851662221238, 43.6920288601154, 0.00844902284199144, 3.7861147411e-05),
        (3.25043267112593, 0.609666201650289, 0.596971300802123, 0.0148554512740362, 0.00133625587356563),
    ),
    38: (
        (4.77092509299826, 1.47597850155283, 0.304451355544188, 0.00359474981916728, 3.0008554923e-07),
        (13.3668881330412, 1.33738379577196, 0.177532369437782, 0.00779105033001826, 0.00028225513964854),
    ),
    42: (
        (2.83105968432053, 2.34858137489674, 0.245105888429696, 0.00235282108218515, 2.3127083834e-07),
        (10.435719575895, 1.60482868674597, 0.131696934774606, 0.00554977901383345, 0.0002227474637649),
    ),
    74: (
        (3.97629715819077, 1.52292684257341, 0.797706246390561, 0.0213666741558685, 0.00010307868938572),
        (6.29685779228774, 1.11289951157691, 0.231057040678473, 0.0151013545567204, 0.00047468247710503),
    ),
    82: (
        (3.60861020997771, 2.45056774737198, 0.478639500107257, 0.00887214235169215, 1.040019329095e-05),
        (6.58162594621962, 1.02772852660588, 0.13353368063472, 0.00684861238948429, 0.00027638887545667),
    ),
}


def _coefficients(z: int | str) -> tuple[np.ndarray, np.ndarray]:
    zi = atomic_number(z) if isinstance(z, str) else int(z)
    try:
        a, b = LOBATO_2014[zi]
    except KeyError:
        raise ValueError(f"Z={zi}: no Lobato coefficients in the twin's table {sorted(LOBATO_2014)}") from None
    return np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)


def scattering_factor_A(z: int | str, g_inv_A: np.ndarray) -> np.ndarray:
    """Electron scattering factor ``f_e(g)`` in Å at spatial frequency ``g`` (1/Å, any shape)."""
    a, b = _coefficients(z)
    g2 = np.asarray(g_inv_A, dtype=np.float64)[..., None] ** 2
    bg2 = b * g2
    return np.sum(a * (2.0 + bg2) / (1.0 + bg2) ** 2, axis=-1)


def projected_potential(
    positions_A: np.ndarray,
    numbers: np.ndarray,
    cell_A: tuple[float, float],
    shape: tuple[int, int],
    debye_waller_u_A: np.ndarray | None = None,
) -> np.ndarray:
    """Projected potential ``v_z`` in V Å of atoms in a periodic cell, on a ``shape`` grid.

    ``positions_A``: ``(N, 2)`` (x, y); ``numbers``: ``(N,)`` atomic numbers; ``cell_A`` (width
    along x, height along y). Grid index ``[row, col]`` is ``(y, x)``. The result is built in
    reciprocal space and is real. ``debye_waller_u_A``: optional ``(N,)`` rms displacement used
    as an absorptive-free thermal smear of each atom (for frozen phonons pass displaced
    positions instead and leave this None).
    """
    ny, nx = shape
    wx, wy = cell_A
    ky = np.fft.fftfreq(ny, d=wy / ny)
    kx = np.fft.fftfreq(nx, d=wx / nx)
    g = np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    pos = np.asarray(positions_A, dtype=np.float64).reshape(-1, 2)
    zs = np.asarray(numbers).reshape(-1)
    spectrum = np.zeros((ny, nx), dtype=np.complex128)
    for z in np.unique(zs):
        sel = zs == z
        fe = scattering_factor_A(int(z), g)
        # structure factor of this species: phase ramps separable in x and y
        px = np.exp(-2j * np.pi * kx[None, :] * pos[sel, 0][:, None])  # (n, nx)
        py = np.exp(-2j * np.pi * ky[None, :] * pos[sel, 1][:, None])  # (n, ny)
        if debye_waller_u_A is not None:
            u = np.asarray(debye_waller_u_A, dtype=np.float64)[sel]
            dw = np.exp(-2.0 * np.pi**2 * u[:, None, None] ** 2 * g[None] ** 2)
            s = np.einsum("ny,nx,nyx->yx", py, px, dw)
        else:
            s = py.T @ px
        spectrum += fe * s
    area = wx * wy
    v = np.fft.ifft2(spectrum).real * (nx * ny) * TWO_PI_A0_E / area
    return v
