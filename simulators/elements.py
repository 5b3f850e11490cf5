"""Element data the twin needs: atomic numbers, masses and symbols.

Only the elements the built-in specimens use are listed; add a row to extend.
Masses are standard atomic weights in unified atomic mass units (u).
"""

from __future__ import annotations

import numpy as np

# symbol: (Z, mass in u)
_ELEMENTS: dict[str, tuple[int, float]] = {
    "C": (6, 12.011),
    "O": (8, 15.999),
    "Si": (14, 28.085),
    "S": (16, 32.06),
    "Ti": (22, 47.867),
    "Fe": (26, 55.845),
    "Se": (34, 78.971),
    "Sr": (38, 87.62),
    "Mo": (42, 95.95),
    "Te": (52, 127.60),
    "Ba": (56, 137.327),
    "W": (74, 183.84),
    "Au": (79, 196.967),
    "Pb": (82, 207.2),
    "Bi": (83, 208.98),
}

_BY_Z: dict[int, str] = {z: s for s, (z, _) in _ELEMENTS.items()}


def atomic_number(symbol: str) -> int:
    try:
        return _ELEMENTS[symbol][0]
    except KeyError:
        raise ValueError(f"element={symbol!r}: not in the twin's element table {sorted(_ELEMENTS)}") from None


def symbol(z: int) -> str:
    try:
        return _BY_Z[int(z)]
    except KeyError:
        raise ValueError(f"Z={z!r}: not in the twin's element table") from None


def mass_u(z: int) -> float:
    return _ELEMENTS[symbol(z)][1]


def symbols(zs: np.ndarray) -> np.ndarray:
    """Element symbols for an array of atomic numbers (``<U2`` array of the same shape)."""
    zs = np.asarray(zs)
    out = np.empty(zs.shape, dtype="<U2")
    for z in np.unique(zs):
        out[zs == z] = symbol(int(z)) if z > 0 else ""
    return out
