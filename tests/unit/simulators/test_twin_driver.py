"""TwinDriver: Driver protocol, pacing by an injected clock, parks, beam state, beam-induced dynamics."""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest

from stemagent.clock import VirtualClock
from stemagent.driver import Driver
from stemagent.errors import InputError
from stemagent.simulators.dynamics import CrossSections
from stemagent.simulators.specimens import graphene, tmd
from stemagent.simulators.twin import TwinDriver
from stemagent.types import ScanGeometry, dose_e_per_A2


class RecordingClock(VirtualClock):
    def __init__(self) -> None:
        super().__init__(100.0)
        self.wakeups: list[float] = []

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds)
        self.wakeups.append(self.monotonic())


def _graphene_twin(seed: int = 0, **kw) -> TwinDriver:
    spec = graphene(size_A=(40.0, 40.0), rng=np.random.default_rng(seed), n_si=1, vacancy_per_nm2=0.0)
    return TwinDriver(spec, clock=kw.pop("clock", VirtualClock()), rng=seed, **kw)


def _neighbours(twin: TwinDriver, si: int) -> np.ndarray:
    sp = twin.specimen
    c = np.flatnonzero((sp.numbers == 6) & sp.present)
    d = np.linalg.norm(sp.positions_A[c, :2] - sp.positions_A[si, :2], axis=1)
    return c[np.argsort(d)[:3]]


def test_twin_driver_implements_the_driver_protocol() -> None:
    twin = _graphene_twin()
    assert isinstance(twin, Driver)
    for name in ("connect", "close", "capabilities", "acquire", "park", "blank"):
        assert inspect.iscoroutinefunction(getattr(twin, name)), name
    assert inspect.isasyncgenfunction(twin.stream)
    caps = asyncio.run(twin.capabilities())
    assert caps.name == "twin" and caps.can_park and caps.beam_energy_keV == 60.0
    # ground truth is not part of the protocol
    assert not hasattr(Driver, "ground_truth")


def test_acquire_advances_the_injected_clock_and_reports_times_and_dose() -> None:
    clock = RecordingClock()
    twin = _graphene_twin(clock=clock, beam_current_pA=25.0)
    geo = ScanGeometry(fov_A=(20.0, 20.0), shape_px=(64, 64), dwell_s=1e-5, flyback_s=2e-4)

    async def go():
        await twin.connect()
        assert twin.beam_blanked
        f = await twin.acquire(geo)
        unblanked_after_scan = not twin.beam_blanked
        await twin.close()
        return f, unblanked_after_scan

    frame, unblanked = asyncio.run(go())
    assert unblanked and twin.beam_blanked
    assert frame.start_time_s == 100.0
    np.testing.assert_allclose(frame.line_times_s, 100.0 + np.arange(64) * geo.line_time_s)
    assert clock.monotonic() == pytest.approx(100.0 + geo.frame_time_s)
    assert frame.dose_e_per_A2 == pytest.approx(dose_e_per_A2(25.0, 1e-5, (20 / 64) ** 2))
    truth = twin.ground_truth.frame_truth(frame.index)
    assert truth is not None and len(truth.positions_A) > 50
    assert [e.state for e in twin.ground_truth.beam_log] == ["blanked", "scan", "blanked"]


def test_stream_paces_frames_by_deadline_and_drops_when_the_consumer_is_late() -> None:
    clock = RecordingClock()
    twin = _graphene_twin(clock=clock)
    geo = ScanGeometry(fov_A=(10.0, 10.0), shape_px=(32, 32), dwell_s=1e-4)
    period = geo.frame_time_s

    async def go():
        starts, dropped = [], []
        async for f in twin.stream(geo, n_frames=5):
            starts.append(f.start_time_s)
            dropped.append(f.meta["dropped_before"])
            if f.index == 2:
                clock.advance(2.5 * period)  # the consumer stalls for 2.5 frames
        return starts, dropped

    starts, dropped = asyncio.run(go())
    np.testing.assert_allclose(starts[:3], 100.0 + np.arange(3) * period)
    assert dropped[:3] == [0, 0, 0] and dropped[3] == 2
    # after the stall the stream resumes on the deadline grid
    assert (starts[3] - 100.0) / period == pytest.approx(round((starts[3] - 100.0) / period))
    assert starts[4] == pytest.approx(starts[3] + period)


def test_bad_geometry_and_park_are_refused_with_the_field_named() -> None:
    twin = _graphene_twin()
    with pytest.raises(InputError, match="fov_A"):
        asyncio.run(twin.acquire(ScanGeometry(fov_A=(1000.0, 1000.0), shape_px=(8, 8))))
    with pytest.raises(InputError, match="dwell_s"):
        asyncio.run(twin.park((0.0, 0.0), -1.0))


def test_si_hops_to_the_neighbour_next_to_the_parked_beam() -> None:
    counts = np.zeros(3, dtype=int)
    no_hop = 0
    for trial in range(120):
        twin = _graphene_twin(seed=trial, cross_sections=CrossSections(si_swap_barn=2.0), park_sample_interval_s=0.05)
        si = int(twin.ground_truth.dopant_ids()[0])
        nb = _neighbours(twin, si)
        target = int(nb[trial % 3])  # park on a different neighbour each trial
        asyncio.run(twin.park(tuple(twin.specimen.positions_A[target, :2]), 2.0))
        swaps = [e for e in twin.ground_truth.events if e.kind == "swap"]
        if not swaps:
            no_hop += 1
            continue
        first_c = swaps[0].atoms[1]
        order = [target] + [int(n) for n in nb if n != target]
        counts[order.index(first_c)] += 1
    assert no_hop < 30
    assert counts[0] > 0.95 * counts.sum(), counts
    assert counts[1] + counts[2] <= 4


def test_a_hop_shows_as_a_step_in_the_park_signal_at_the_event_time() -> None:
    for seed in range(20):
        twin = _graphene_twin(seed=seed, cross_sections=CrossSections(si_swap_barn=1.0), beam_current_pA=50.0)
        si = int(twin.ground_truth.dopant_ids()[0])
        target = _neighbours(twin, si)[0]
        result = asyncio.run(twin.park(tuple(twin.specimen.positions_A[target, :2]), 3.0))
        swaps = [e for e in twin.ground_truth.events if e.kind == "swap"]
        if len(swaps) == 1 and 0.3 < swaps[0].time_s - result.start_time_s < 2.7:
            break
    else:
        pytest.fail("no single hop in 20 seeded trials")
    s = result.signal
    k_true = int((swaps[0].time_s - result.start_time_s) / result.sample_interval_s)
    # the Si (Z=14) now sits under the beam where a C (Z=6) was: the signal steps up
    before, after = s[: k_true - 5].mean(), s[k_true + 5 :].mean()
    assert after > 2.5 * before
    # a least-squares step fit finds the event time
    c = np.cumsum(s - s.mean())
    k_fit = int(np.argmin(c))
    assert abs(k_fit - k_true) <= 3
    # ground truth replays the event
    pos_before, _ = twin.ground_truth.positions_at(swaps[0].time_s - 1e-6)
    pos_after, _ = twin.ground_truth.positions_at(swaps[0].time_s)
    np.testing.assert_allclose(pos_after[si], pos_before[target])


def test_an_unblanked_idle_beam_keeps_dosing_and_blanking_stops_it() -> None:
    def run(blank: bool) -> int:
        clock = VirtualClock()
        twin = _graphene_twin(seed=3, clock=clock, cross_sections=CrossSections(si_swap_barn=1.0))
        si = int(twin.ground_truth.dopant_ids()[0])
        target = _neighbours(twin, si)[0]

        async def go():
            await twin.park(tuple(twin.specimen.positions_A[target, :2]), 0.001)
            if blank:
                await twin.blank()
            clock.advance(200.0)
            await twin.blank()

        asyncio.run(go())
        return len([e for e in twin.ground_truth.events if e.during == "idle"])

    assert run(blank=False) >= 1
    assert run(blank=True) == 0


def test_chalcogen_sputtering_happens_under_the_beam_and_grows_with_dose() -> None:
    n_events = []
    for dwell in (0.5, 4.0):
        spec = tmd("mos2", size_A=(30.0, 30.0), rng=np.random.default_rng(0), vacancy_fraction=0.0, substitution_fraction=0.0)
        twin = TwinDriver(spec, rng=1, optics=None, cross_sections=CrossSections(chalcogen_sputter_barn=1.0),
                          beam_current_pA=50.0, park_sample_interval_s=0.1)
        sites = spec.sites_A[spec.site_role == 1]
        beam = sites[np.argmin(np.linalg.norm(sites, axis=1))]
        total = 0
        for _ in range(10):
            asyncio.run(twin.park(tuple(beam), dwell))
        ev = [e for e in twin.ground_truth.events if e.kind == "sputter"]
        dist = np.array([np.linalg.norm(np.asarray(e.positions_before_A[0]) - beam) for e in ev])
        assert np.mean(dist < 0.1) >= 0.5  # mostly the column under the beam
        assert np.all(dist < 4.5)
        total = len(ev)
        n_events.append(total)
        labels = spec.site_labels()
        assert np.sum(labels == spec.class_names.index("vacancy")) >= (1 if total else 0)
    assert n_events[1] > n_events[0]


def test_scan_dose_drives_events_in_the_field_only() -> None:
    spec = tmd("mos2", size_A=(80.0, 80.0), rng=np.random.default_rng(0), vacancy_fraction=0.0, substitution_fraction=0.0)
    twin = TwinDriver(spec, rng=2, cross_sections=CrossSections(chalcogen_sputter_barn=50.0), beam_current_pA=100.0)
    geo = ScanGeometry(center_A=(-20.0, 0.0), fov_A=(20.0, 20.0), shape_px=(64, 64), dwell_s=1e-4)
    frame = asyncio.run(twin.acquire(geo))
    ev = twin.ground_truth.events
    assert len(ev) > 3
    xy = np.array([e.positions_before_A[0] for e in ev])
    assert np.all(geo.contains(xy))
    times = np.array([e.time_s for e in ev])
    assert np.all((times >= frame.start_time_s) & (times <= frame.end_time_s))


def test_knock_on_makes_vacancies_at_high_energy_only() -> None:
    from stemagent.simulators.optics import ProbeOptics

    made = {}
    for energy in (60.0, 120.0):
        spec = graphene(size_A=(30.0, 30.0), rng=np.random.default_rng(0), n_si=0, vacancy_per_nm2=0.0)
        twin = TwinDriver(spec, rng=4, optics=ProbeOptics(energy_keV=energy), beam_current_pA=100.0,
                          park_sample_interval_s=0.1)
        target = spec.positions_A[np.argmin(np.linalg.norm(spec.positions_A[:, :2], axis=1)), :2]
        asyncio.run(twin.park(tuple(target), 5.0))
        ev = [e for e in twin.ground_truth.events if e.kind == "knock_on"]
        made[energy] = len(ev)
        assert np.sum(spec.site_labels() == spec.class_names.index("vacancy")) == len(ev)
    assert made[60.0] == 0 and made[120.0] >= 1
