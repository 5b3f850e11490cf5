"""Per-site motif ground truth of the twin and the ferroelectric film's polarisation variants."""

from __future__ import annotations

import numpy as np

from stemagent.simulators import render_sample
from stemagent.simulators.motifs import GRAPHENE_MOTIFS, TMD_MOTIFS, frame_motifs, site_motifs
from stemagent.simulators.perovskites import ferroelectric_film
from stemagent.simulators.specimens import build_specimen
from stemagent.types import ScanGeometry


def test_graphene_motifs_follow_the_defects() -> None:
    sp = build_specimen("graphene", size_A=(40.0, 40.0), rng=np.random.default_rng(1), n_si=3, vacancy_per_nm2=0.2)
    labels, names = site_motifs(sp)
    assert names == GRAPHENE_MOTIFS
    si = np.flatnonzero((sp.numbers == 14) & sp.present)
    vac = np.flatnonzero(~sp.present)
    assert len(si) == 3 and len(vac) >= 1
    assert np.all(labels[si] == names.index("dopant")) and np.all(labels[vac] == names.index("vacancy"))
    for centre, motif in [(si, "dopant-adjacent"), (vac, "vacancy-adjacent")]:
        for i in centre:
            d = np.linalg.norm(sp.sites_A - sp.sites_A[i], axis=1)
            nb = np.flatnonzero((d > 0.1) & (d < 1.6))
            inner = [j for j in nb if labels[j] != names.index("edge")]
            assert len(nb) == 3 and np.all(labels[inner] == names.index(motif))
    # the specimen's border is 'edge'; everything else is host
    edge = labels == names.index("edge")
    assert edge.any() and np.mean(labels == names.index("host")) > 0.75


def test_tmd_motifs_and_frame_alignment() -> None:
    rng = np.random.default_rng(2)
    geo = ScanGeometry(fov_A=(25.6, 25.6), shape_px=(128, 128), dwell_s=1e-6)
    sp = build_specimen("mos2", size_A=(40.0, 40.0), rng=rng, vacancy_fraction=0.05, substitution_fraction=0.05)
    _, truth = render_sample("mos2", geo, 1e4, rng, specimen=sp)
    labels, names = frame_motifs(sp, truth)
    assert names == TMD_MOTIFS and labels.shape == truth.labels.shape
    # motifs refine the segmentation classes: metal sites are metal / *-adjacent, chalcogens the rest
    metal = truth.labels == truth.class_names.index("metal")
    assert set(np.unique(labels[metal])) <= {0, 4, 5, 6}
    assert np.all(labels[truth.labels == truth.class_names.index("vacancy")] == names.index("vacancy"))
    assert np.all(labels[truth.labels == truth.class_names.index("substituted")] == names.index("dopant"))
    assert (labels == names.index("vacancy-adjacent")).any()


def test_default_film_keeps_up_down_domains_with_labels() -> None:
    sp = ferroelectric_film(size_A=(80.0, 40.0), rng=np.random.default_rng(3), domain_width_A=20.0)
    ex = sp.extras
    b = sp.site_role == 1
    p = ex["polarization"][b]
    inside = ex["polarization_strength"][b] > 0.9
    # variant 0 is up (+y), variant 1 down, and the labels agree with the sign of p away from walls
    assert np.all((ex["variant"][b][inside] == 0) == (p[inside] > 0))
    assert set(np.unique(ex["domain"])) == set(range(len(ex["wall_x_A"]) + 1))
    labels, names = site_motifs(sp)
    assert names[:4] == ("A", "O", "B+y", "B-y") and names[-1] == "domain-wall"


def test_film_with_four_variants_displaces_b_sites_along_each_direction() -> None:
    variants = [(0.0, 1.0), (1.0, 0.0), (0.0, -1.0), (-1.0, 0.0)]
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    plain = ferroelectric_film(size_A=(120.0, 40.0), rng=rng_a, domain_width_A=20.0, displacement_A=0.3)
    film = ferroelectric_film(size_A=(120.0, 40.0), rng=rng_b, domain_width_A=20.0, displacement_A=0.3,
                              polarization_variants=variants)
    b = film.site_role == 1
    ex = film.extras
    shift = film.sites_A - plain.sites_A + plain.extras["polarization"][:, None] * np.array([0.0, 0.3])  # undo the up/down
    seen = set()
    for v in range(4):
        sel = b & (ex["variant"] == v) & (ex["polarization_strength"] > 0.95)
        if sel.any():
            seen.add(v)
            np.testing.assert_allclose(np.median(shift[sel], axis=0), 0.3 * np.asarray(variants[v]), atol=0.02)
    assert seen == {0, 1, 2, 3}
    labels, names = site_motifs(film)
    assert {"B+y", "B+x", "B-y", "B-x"} <= set(names)
