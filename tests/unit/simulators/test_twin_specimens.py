"""Specimens of the twin: composition, labels, large specimens, the pluggable motif chain."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import pytest

from stemagent.clock import SystemClock
from stemagent.simulators.dynamics import CrossSections
from stemagent.simulators.perovskites import MarkovMotifChain, MotifChain, WallMotif, ferroelectric_film, srtio3
from stemagent.simulators.render import render_frame
from stemagent.simulators.specimens import graphene, tmd
from stemagent.simulators.twin import TwinDriver
from stemagent.types import ScanGeometry


def test_graphene_has_bonds_of_1_42_A_and_si_with_three_c_neighbours() -> None:
    sp = graphene(size_A=(60.0, 60.0), rng=np.random.default_rng(0), n_si=4, vacancy_per_nm2=0.2)
    xy = sp.positions_A[:, :2]
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    assert np.allclose(d[:, 1], 1.42, atol=0.01)
    si = np.flatnonzero(sp.numbers == 14)
    assert len(si) == 4
    tree = cKDTree(xy[sp.present & (sp.numbers == 6)])
    for s in si:
        assert len(tree.query_ball_point(xy[s], 1.6)) == 3
    labels = sp.site_labels()
    assert np.sum(labels == 1) == 4 and np.sum(labels == 2) == np.sum(~sp.present) > 0


def test_tmd_labels_follow_column_occupancy() -> None:
    sp = tmd("ws2", size_A=(50.0, 50.0), rng=np.random.default_rng(1), vacancy_fraction=0.1, substitution_fraction=0.1)
    labels = sp.site_labels()
    count, foreign = sp.site_occupancy()
    chal = sp.site_role == 1
    assert np.all(labels[~chal] == 0)
    assert np.all((labels == 3) == (chal & (count < 2)))
    assert np.all((labels == 2) == (chal & (count == 2) & (foreign > 0)))
    assert set(np.unique(sp.numbers)) == {74, 16, 34}


def test_a_specimen_larger_than_the_field_shows_what_the_scan_centre_selects() -> None:
    sp = tmd("mos2", size_A=(300.0, 300.0), rng=np.random.default_rng(2))
    seen = []
    for centre in ((-100.0, 50.0), (80.0, -60.0)):
        geo = ScanGeometry(center_A=centre, fov_A=(20.0, 20.0), shape_px=(64, 64))
        _, truth = render_frame(sp, geo, 10.0, np.random.default_rng(0))
        assert np.all(np.abs(truth.positions_A - np.asarray(centre)) <= 10.5)
        seen.append(set(truth.site_index.tolist()))
    assert not (seen[0] & seen[1])


@dataclass
class AlwaysKinkRight:
    """A user-supplied motif model: every row shifts the wall one cell to the right."""

    motifs: dict = field(default_factory=lambda: {"step": WallMotif(shift_cells=1, width_cells=0.3)})

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        return ["step"] * n


def test_domain_walls_follow_the_pluggable_motif_chain() -> None:
    chain = AlwaysKinkRight()
    assert isinstance(chain, MotifChain)
    film = ferroelectric_film(size_A=(60.0, 40.0), rng=np.random.default_rng(0), domain_width_A=60.0, motif_chain=chain)
    wx = film.extras["wall_x_A"][0]
    steps = np.diff(wx)
    # shifts of +1 cell per row until the wander limit of 3 cells is reached
    assert np.allclose(steps[:2], 3.9) and np.allclose(steps[3:], 0.0)
    pol = film.extras["polarization"]
    b = film.site_role == 1
    left = b & (film.sites_A[:, 0] < wx.min() - 4)
    right = b & (film.sites_A[:, 0] > wx.max() + 4)
    assert np.all(pol[left] > 0.9) and np.all(pol[right] < -0.9)
    # B columns are displaced along y by the polarisation
    assert film.extras["wall_motifs"][0] == ["step"] * film.extras["wall_x_A"].shape[1]


def test_markov_motif_chain_statistics_follow_its_transition_matrix() -> None:
    chain = MarkovMotifChain()
    seq = chain.sample(20000, np.random.default_rng(0))
    idx = np.array([chain.names.index(s) for s in seq])
    counts = np.zeros((4, 4))
    np.add.at(counts, (idx[:-1], idx[1:]), 1)
    n = counts.sum(axis=1, keepdims=True)
    est = counts / n
    sd = np.sqrt(chain.transition * (1 - chain.transition) / n) + 1e-12
    assert np.all(np.abs(est - chain.transition) < 4 * sd + 1e-9)
    with pytest.raises(ValueError, match="transition"):
        MarkovMotifChain(transition=np.eye(3))


def test_srtio3_columns_and_thickness() -> None:
    sp = srtio3(size_A=(20.0, 20.0), n_cells=7)
    numbers = sp.site_numbers()
    assert set(np.round(numbers[sp.site_role == 0])) == {38 * 7}
    assert set(np.round(numbers[sp.site_role == 1])) == {(22 + 8) * 7}
    assert set(np.round(numbers[sp.site_role == 2])) == {8 * 7}


def test_cross_sections_grow_with_beam_energy() -> None:
    cs = CrossSections()
    assert cs.at_energy("knock_on", 100.0, 6) > 100 * cs.at_energy("knock_on", 60.0, 6)
    assert cs.at_energy("swap", 60.0, 6) == pytest.approx(0.1e-8)
    assert cs.at_energy("sputter", 60.0, 16) < cs.at_energy("sputter", 80.0, 16)


def test_realtime_pace_on_the_system_clock_returns_frames_after_their_scan_time() -> None:
    sp = graphene(size_A=(30.0, 30.0), rng=np.random.default_rng(0))
    clock = SystemClock()
    twin = TwinDriver(sp, clock=clock, rng=0)
    geo = ScanGeometry(fov_A=(10.0, 10.0), shape_px=(16, 16), dwell_s=1e-5)

    async def go():
        frames = [f async for f in twin.stream(geo, n_frames=2)]
        return frames, clock.monotonic()

    frames, now = asyncio.run(go())
    # frames stay on the deadline grid; a frame missed while computing is counted, not shifted
    k = (frames[1].start_time_s - frames[0].start_time_s) / geo.frame_time_s
    assert k == pytest.approx(round(k), abs=1e-6) and round(k) == 1 + frames[1].meta["dropped_before"]
    assert now >= frames[1].end_time_s
