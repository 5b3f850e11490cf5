"""Common random numbers on the twin: events from per-channel clocks (``ChannelClocks``).

The clocked events keep the law of the Gillespie draws, and a twin seed gives the same hop for the
same hazard on the same bond whatever else the beam and the detector did in between."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from stemagent.clock import VirtualClock
from stemagent.config import TwinConfig
from stemagent.simulators.dynamics import ChannelClocks
from stemagent.simulators.factory import twin_from_config
from stemagent.simulators.twin import TwinDriver


def _twin(seed: int, crn: bool = True) -> TwinDriver:
    cfg = TwinConfig(specimen="graphene", specimen_size_A=30.0, n_si=1, vacancy_per_nm2=0.0, c_knock_on_barn=0.0,
                     si_swap_barn=1.0, common_random_numbers=crn)
    return twin_from_config(cfg, clock=VirtualClock(), seed=seed)


def _carbon_next_to_si(tw: TwinDriver) -> tuple[int, np.ndarray]:
    sp = tw.specimen
    si = int(np.flatnonzero(sp.numbers == 14)[0])
    d = np.linalg.norm(sp.positions_A[:, :2] - sp.positions_A[si, :2], axis=1)
    return si, sp.positions_A[int(np.argsort(d)[1]), :2].copy()


def _first_swap_beam_time(tw: TwinDriver, beam: np.ndarray, dwells: list[float]) -> float | None:
    """Beam time on ``beam`` (summed over the parks) at the first swap, or None."""
    done = 0.0
    for dwell in dwells:
        res = asyncio.run(tw.park(tuple(beam), dwell))
        swaps = [e for e in tw.ground_truth.events if e.kind == "swap" and e.during == "park"]
        if swaps:
            return done + swaps[0].time_s - res.start_time_s
        done += dwell
    return None


def test_the_config_switch_sets_the_clocks_and_the_default_keeps_the_rng() -> None:
    assert _twin(0, crn=False).dynamics.event_clocks is None
    assert isinstance(_twin(0).dynamics.event_clocks, ChannelClocks)
    with pytest.raises(ValueError, match="seed=-1"):
        ChannelClocks(-1)


def test_the_same_hazard_on_the_same_bond_gives_the_same_hop_whatever_came_before() -> None:
    """One 20-s park vs ten 2-s parks after a park far from the Si and draws that shift the twin's
    stream: with clocks the hop comes at the same beam time; with the one stream it does not."""
    times = {}
    for crn in (True, False):
        for variant in ("one park", "split, shifted"):
            tw = _twin(11, crn)
            si, c_xy = _carbon_next_to_si(tw)
            if variant == "split, shifted":
                asyncio.run(tw.park((c_xy[0] + 9.0, c_xy[1] + 9.0), 3.0))  # nothing to move there
                tw.rng.random(1234)  # e.g. the shot noise of a confirmation scan
                dwells = [2.0] * 10
            else:
                dwells = [20.0]
            times[crn, variant] = _first_swap_beam_time(tw, c_xy, dwells)
    assert times[True, "one park"] is not None
    assert times[True, "split, shifted"] == pytest.approx(times[True, "one park"], abs=1e-6)
    assert times[False, "one park"] is not None and times[False, "split, shifted"] != pytest.approx(times[False, "one park"], abs=1e-6)


def test_clocked_hops_keep_the_rate_law() -> None:
    """First-hop fraction within a park over 300 seeds: 1 - exp(-rate * dwell) within 4 binomial sds,
    with the clocks as with the twin's one stream."""
    n, dwell = 300, 0.5
    for crn in (True, False):
        fired = 0
        for seed in range(n):
            tw = _twin(1000 + seed, crn)
            si, c_xy = _carbon_next_to_si(tw)
            if seed == 0:
                sp = tw.specimen
                near = sp.in_box(tuple(c_xy - 4.0), tuple(c_xy + 4.0))
                chans = tw.dynamics._channels(sp, near)
                rate = float(tw.dynamics._park_rates(sp, chans, c_xy, tw.dynamics.electrons_per_s).sum())
                p = -math.expm1(-rate * dwell)
                assert 0.2 < p < 0.8, p  # a test that can tell the law apart
            fired += _first_swap_beam_time(tw, c_xy, [dwell]) is not None
        sd = math.sqrt(n * p * (1 - p))
        assert abs(fired - n * p) < 4 * sd, (crn, fired, n * p)


def test_scans_add_their_hazard_to_the_same_clocks() -> None:
    """A raster's ``sigma * dose`` counts toward a channel's threshold: two scans that together pass it
    swap the Si in the second one, and neither alone below it does."""
    tw = _twin(3)
    dyn, sp = tw.dynamics, tw.specimen
    clocks = dyn.event_clocks
    assert clocks is not None
    si, _ = _carbon_next_to_si(tw)
    near = sp.in_box(tuple(sp.positions_A[si, :2] - 2.0), tuple(sp.positions_A[si, :2] + 2.0))
    chans = [c for c in dyn._channels(sp, near) if c[0] == "swap"]
    keys = [clocks.key(sp, *c) for c in chans]
    _, thr = clocks.get(keys)
    sigma = dyn._sigma("swap", 6)
    dose = float(thr.min()) / sigma  # the areal dose at which the first of the Si's bonds fires
    ids = np.array(sorted({a for c in chans for a in c[1:]}))
    rng = np.random.default_rng(0)
    assert dyn.scan_events(sp, ids, np.zeros(len(ids)), 0.6 * dose, rng) == []
    state = rng.bit_generator.state
    events = dyn.scan_events(sp, ids, np.zeros(len(ids)), 0.6 * dose, rng)
    assert [e.kind for e in events] == ["swap"] and events[0].atoms == (si, chans[int(np.argmin(thr))][1])
    assert rng.bit_generator.state == state  # nothing drawn from the caller's stream
