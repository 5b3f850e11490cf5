"""Unmixing of neighbourhood sub-images and the lattice displacement field, on a synthetic
two-domain lattice whose B sites are displaced up in one half and down in the other."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.encoding.clustering import score_labels
from stemagent.encoding.unmixing import METHODS, lattice_displacements, neighbourhoods, scree_components, unmix
from stemagent.errors import InputError

CELL_PX = 16.0
SHIFT_PX = 1.6


def domain_film(seed: int = 0, n: int = 14, noise: float = 0.05):
    """Image, A-site and B-site pixel positions, and the domain (0 left: B up; 1 right: B down)."""
    rng = np.random.default_rng(seed)
    size = int((n + 1) * CELL_PX)
    j, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    a = np.stack([(j.ravel() + 0.7) * CELL_PX, (i.ravel() + 0.7) * CELL_PX], axis=1)  # (row, col)
    a = a + 0.15 * rng.normal(size=a.shape)
    domain = (i.ravel() >= n // 2).astype(int)
    b = a + CELL_PX / 2 + np.stack([np.where(domain == 0, -SHIFT_PX, SHIFT_PX), np.zeros(len(a))], axis=1)
    rr, cc = np.mgrid[0:size, 0:size]
    img = np.zeros((size, size))
    for (r, c), amp in [(p, 3.0) for p in a] + [(p, 1.5) for p in b]:
        img += amp * np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / (2 * 1.8**2))
    img += noise * rng.normal(size=img.shape)
    return img, a, b, domain


@pytest.fixture(scope="module")
def film():
    return domain_film()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_assigns_sites_to_their_domain(film, method: str) -> None:
    img, a, _, domain = film
    x = neighbourhoods(img, a, half_px=11)
    u = unmix(x, method, seed=0)
    assert u.loadings.shape[0] == len(a) and u.components.shape[1] == x.shape[1]
    s = score_labels(u.domains, domain, one_to_one=True)
    assert s.accuracy >= 0.95, (method, u.domains.max() + 1)


def test_scree_keeps_the_strong_components(film) -> None:
    img, a, _, _ = film
    u = unmix(neighbourhoods(img, a, 11), "pca")
    assert u.scree is not None and u.scree[0] > 0.3
    assert scree_components(np.array([0.6, 0.2, 0.01, 0.005]), floor=0.05) == 2


def test_displacements_recover_the_b_site_shift(film) -> None:
    _, a, b, domain = film
    pos = np.concatenate([a, b])
    sub = np.repeat([0, 1], len(a))
    disp, lat = lattice_displacements(pos, sub, reference=0)
    db = disp[len(a):]
    assert abs(np.median(db[domain == 0, 0]) + SHIFT_PX) < 0.1
    assert abs(np.median(db[domain == 1, 0]) - SHIFT_PX) < 0.1
    assert np.all(np.abs(disp[: len(a)]) < 0.8)  # the reference sites only jitter
    assert sorted(np.round(np.abs(lat.vectors_A).max(axis=1), 1)) == [CELL_PX, CELL_PX]


def test_neighbourhoods_are_centred_to_sub_pixel_accuracy() -> None:
    img = np.zeros((40, 40))
    rr, cc = np.mgrid[0:40, 0:40]
    img += np.exp(-((rr - 20.3) ** 2 + (cc - 17.6) ** 2) / 8.0)
    x = neighbourhoods(img, np.array([[20.3, 17.6]]), 5).reshape(11, 11)
    assert np.unravel_index(np.argmax(x), x.shape) == (5, 5)
    assert abs(x[4, 5] - x[6, 5]) < 0.02 and abs(x[5, 4] - x[5, 6]) < 0.02


def test_bad_input_names_the_field() -> None:
    with pytest.raises(InputError, match="sites"):
        neighbourhoods(np.zeros((20, 20)), np.zeros((0, 2)), 3)
    with pytest.raises(InputError, match="maps"):
        neighbourhoods(np.full((20, 20), np.nan), np.ones((3, 2)), 3)
    with pytest.raises(InputError, match="method"):
        unmix(np.ones((10, 4)), "svd")
