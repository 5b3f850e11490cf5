"""Pluggable Si–C swap rates on the twin: the physical default unchanged, empirical and random models, ground truth."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stemagent.clock import VirtualClock
from stemagent.config import TwinConfig
from stemagent.simulators.factory import twin_from_config
from stemagent.simulators.hop_rates import (
    Bump,
    BumpSwapRate,
    PhysicalSwapRate,
    SiteVariation,
    bond_offsets,
    from_bond_frame,
    sample_random_swap_rate,
    to_bond_frame,
)
from stemagent.simulators.specimens import graphene
from stemagent.simulators.twin import TwinDriver


def _twin(seed: int = 0, **kw) -> TwinDriver:  # type: ignore[no-untyped-def]
    cfg = TwinConfig(specimen="graphene", specimen_size_A=30.0, n_si=1, vacancy_per_nm2=0.0, c_knock_on_barn=0.0, **kw)
    return twin_from_config(cfg, clock=VirtualClock(), seed=seed)


def _si_and_bond(tw: TwinDriver) -> tuple[int, int, np.ndarray, np.ndarray]:
    sp = tw.specimen
    si = int(np.flatnonzero(sp.numbers == 14)[0])
    d = np.linalg.norm(sp.positions_A[:, :2] - sp.positions_A[si, :2], axis=1)
    c = int(np.argsort(d)[1])
    return si, c, sp.positions_A[si, :2].copy(), sp.positions_A[c, :2].copy()


def test_the_physical_model_gives_the_default_rates() -> None:
    tw = _twin()
    assert tw.dynamics.swap_rate is None and tw.ground_truth.swap_rate == {"model": "physical"}
    si, c, s_xy, c_xy = _si_and_bond(tw)
    beam = c_xy + np.array([0.2, -0.1])
    near = tw.specimen.in_box(tuple(beam - 4), tuple(beam + 4))
    chans = tw.dynamics._channels(tw.specimen, near)
    flux = tw.dynamics.electrons_per_s
    default = tw.dynamics._park_rates(tw.specimen, chans, beam, flux)
    sigma = tw.dynamics.cross_sections.at_energy("swap", tw.optics.energy_keV, 6)
    tw.set_swap_rate(PhysicalSwapRate(sigma, tw.dynamics.probe_density))
    plugged = tw.dynamics._park_rates(tw.specimen, chans, beam, flux)
    assert np.allclose(plugged, default, rtol=1e-9, atol=0)
    assert tw.ground_truth.swap_rate["model"] == "physical"


def test_bond_frame_offsets() -> None:
    off, unit = bond_offsets(np.array([2.0, 1.0]), np.array([[0.0, 0.0]]), np.array([[1.0, 0.0]]))
    along, across = to_bond_frame(off, unit)
    assert along[0] == pytest.approx(1.0) and across[0] == pytest.approx(1.0)  # beyond the C, to the left of Si→C
    assert np.allclose(from_bond_frame(along, across, unit), off)


def test_random_rate_functions_are_per_seed_and_their_scan_cross_section_is_their_integral() -> None:
    probe = _twin().dynamics.probe_density
    a = sample_random_swap_rate(np.random.default_rng(1), 1e-9, probe)
    b = sample_random_swap_rate(np.random.default_rng(1), 1e-9, probe)
    c = sample_random_swap_rate(np.random.default_rng(2), 1e-9, probe)
    assert a.describe() == b.describe() != c.describe()
    assert 1 <= len(a.bumps) <= 3 and all(np.hypot(x.along_A, x.across_A) <= 1.2 and x.along_A >= -0.5 for x in a.bumps)
    g = np.arange(-5.0, 5.0, 0.02)
    ga, gc = np.meshgrid(g, g, indexing="ij")
    q = a.in_bond_frame(ga.ravel(), gc.ravel())
    assert q.min() >= 0
    assert q.sum() * 0.02**2 == pytest.approx(a.scan_cross_section_A2(np.zeros(1, dtype=int))[0], rel=0.02)


def test_site_variation_is_a_fixed_factor_per_site() -> None:
    v = SiteVariation(0.3, seed=4)
    f1, f2 = v(np.array([5, 6, 5])), SiteVariation(0.3, seed=4)(np.array([5]))
    assert f1[0] == f1[2] == f2[0] != f1[1]
    assert np.all(SiteVariation(0.0, 4)(np.arange(10)) == 1.0)
    f = SiteVariation(0.3, seed=1)(np.arange(4000))
    assert np.std(np.log(f)) == pytest.approx(0.3, rel=0.1)


def test_a_random_model_from_the_config_is_in_the_ground_truth() -> None:
    tw = _twin(3, swap_rate_model="random", swap_site_sigma=0.2)
    gt = tw.ground_truth.swap_rate
    assert gt["model"] == "random" and gt["bumps"] and gt["site_sigma"] == 0.2
    assert _twin(3, swap_rate_model="random").ground_truth.swap_rate == gt | {"site_sigma": 0.0}
    assert _twin(4, swap_rate_model="empirical").ground_truth.swap_rate["model"] == "empirical"
    assert _twin(3).dynamics.swap_rate is None  # old configs build the same twin as before


def test_hops_follow_the_plugged_rate_function() -> None:
    """A bump beside the bond, away from the carbon: parking there moves the Si, on the carbon hardly."""
    spec = graphene(size_A=(24.0, 24.0), n_si=1, vacancy_per_nm2=0.0, rng=np.random.default_rng(0))
    counts = {}
    for where in ("bump", "carbon"):
        tw = TwinDriver(spec.copy(), rng=5, clock=VirtualClock(), cross_sections=None)
        tw.dynamics.cross_sections = type(tw.dynamics.cross_sections)(c_knock_on_barn=0.0)
        tw.set_swap_rate(BumpSwapRate(4e-8, (Bump(1.0, 0.0, 0.9, 0.25, 0.25),), tw.dynamics.probe_density))
        si, c, s_xy, c_xy = _si_and_bond(tw)
        u = (c_xy - s_xy) / np.linalg.norm(c_xy - s_xy)
        beam = c_xy + (0.9 * np.array([-u[1], u[0]]) if where == "bump" else 0.0)
        asyncio.run(tw.park(tuple(beam), 2.0))
        swaps = [e for e in tw.ground_truth.events if e.kind == "swap"]
        counts[where] = len(swaps)
        if swaps:
            assert swaps[0].atoms == (si, c) and swaps[0].beam_A == pytest.approx(tuple(beam))
    assert counts["bump"] >= 1 and counts["carbon"] == 0
