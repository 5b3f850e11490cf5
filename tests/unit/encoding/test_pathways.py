"""Transformation pathways (:mod:`stemagent.encoding.pathways`) on synthetic sequences with known
switches: linking, states, events and the transition graph."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.encoding.pathways import (DEFAULT_N_SIGMA, Event, LatentFrame, Trajectories, analyze_pathways, detect_events, fit_states,
                                         group_events, group_evidence, latent_noise_cov, link_atoms, window_noise_inflation)
from stemagent.errors import InputError

MEANS = np.array([[0.0, 0.0], [2.0, 0.5], [-1.0, 2.0]])


def lattice(n: int = 8, a: float = 1.42) -> np.ndarray:
    """Graphene sites in a square patch (x, y), Å."""
    a1, a2 = np.array([1.5 * a, np.sqrt(3) / 2 * a]), np.array([1.5 * a, -np.sqrt(3) / 2 * a])
    ij = np.array([(i, j) for i in range(n) for j in range(n)], dtype=float)
    base = ij[:, :1] * a1 + ij[:, 1:] * a2
    return np.concatenate([base, base + [a, 0.0]])


def sequence(seed: int = 0, frames: int = 60, noise: float = 0.12, drift_A_per_frame=(0.0, 0.0)):
    """Frames of lattice sites whose content latents sit at ``MEANS[state]`` plus noise; the
    switches (site, first frame in the new state, from, to) are returned."""
    rng = np.random.default_rng(seed)
    pos = lattice()
    state = np.zeros((frames, len(pos)), dtype=int)
    switches = []
    sites = rng.choice(len(pos), 8, replace=False)
    for k, s in enumerate(sites):
        at = int(rng.integers(10, frames - 10))
        to = 1 + k % 2
        state[at:, s] = to
        switches.append((int(s), at, 0, to))
        if k < 3:  # and back again later: a reversible path
            back = at + int(rng.integers(8, 12))
            if back < frames - 8:
                state[back:, s] = 0
                switches.append((int(s), back, to, 0))
    out = []
    for f in range(frames):
        z = MEANS[state[f]] + noise * rng.standard_normal((len(pos), 2))
        p = pos + np.array(drift_A_per_frame) * f + 0.03 * rng.standard_normal(pos.shape)
        perm = rng.permutation(len(pos))  # detections come in any order
        out.append(LatentFrame(f, p[perm], z[perm], rng.uniform(-1, 1, len(pos)), dose_e_per_A2=1e4))
        out[-1].site = perm  # type: ignore[attr-defined]
    return out, switches


@pytest.mark.parametrize("sample_frame,drift", [(True, (0.0, 0.0)), (False, (0.3, -0.2))])
def test_atoms_are_followed_site_by_site(sample_frame, drift):
    frames, _ = sequence(frames=30, drift_A_per_frame=drift)
    ids = link_atoms(frames, sample_frame=sample_frame)
    site_of_track = {}
    for f, t in zip(frames, ids):
        for site, track in zip(f.site, t):
            assert site_of_track.setdefault(int(track), int(site)) == site
    assert len(site_of_track) == len(frames[0].positions_A)


def test_drifting_positions_without_the_shift_break_tracks():
    # the same drift, matched as if already in the sample frame: tracks break (the check above can fail)
    frames, _ = sequence(frames=30, drift_A_per_frame=(0.8, 0.0))
    ids = link_atoms(frames, sample_frame=True)
    assert len(np.unique(np.concatenate(ids))) > 2 * len(frames[0].positions_A)


def test_transition_graph_recovers_known_switches():
    frames, switches = sequence(seed=3)
    res = analyze_pathways(frames, window=4, n_sigma=6.0, seed=0)
    assert res.states.n_states == 3
    # states are numbered by weight; map each true mean to its state
    state_of = [int(res.states.predict(m[None])[0]) for m in MEANS]
    assert sorted(state_of) == [0, 1, 2]
    ids = link_atoms(frames)
    track_site = {int(t): int(s) for f, tt in zip(frames, ids) for s, t in zip(f.site, tt)}
    found = {(track_site[e.track], e.step, e.from_state, e.to_state) for e in res.events}
    expected = {(s, at, state_of[a], state_of[b]) for s, at, a, b in switches}
    assert found == expected
    counts = np.zeros((3, 3), dtype=int)
    for _, _, a, b in switches:
        counts[state_of[a], state_of[b]] += 1
    assert np.array_equal(res.graph.counts, counts)
    # rates per dose: counts over the dose spent in the source state (every frame 1e4 e/Å²)
    assert np.all(res.graph.exposure_e_per_A2 > 0)
    i, j = state_of[0], state_of[1]
    assert res.graph.rate_per_dose[i, j] == pytest.approx(counts[i, j] / res.graph.exposure_e_per_A2[i])
    assert res.graph.exposure_e_per_A2.sum() == pytest.approx(len(frames[0].positions_A) * (len(frames) - 1) * 1e4)


def test_noise_alone_gives_no_events_and_one_state():
    frames, _ = sequence(seed=1)
    for f in frames:
        f.z = MEANS[0] + 0.12 * np.random.default_rng(f.frame_index).standard_normal(f.z.shape)
    res = analyze_pathways(frames, seed=0)
    assert res.states.n_states == 1 and res.events == [] and res.graph.counts.sum() == 0


def test_states_are_seeded_and_bad_input_is_named():
    z = np.random.default_rng(0).standard_normal((300, 2))
    a, b = fit_states(z, seed=4), fit_states(z, seed=4)
    assert a.n_states == b.n_states and np.array_equal(a.means, b.means)
    with pytest.raises(InputError, match="z"):
        fit_states(np.full((10, 2), np.nan))
    with pytest.raises(InputError, match="gate_fraction"):
        link_atoms([], gate_fraction=0.7)
    with pytest.raises(InputError, match="frames"):
        analyze_pathways([])
    with pytest.raises(InputError, match="z.shape"):
        LatentFrame(0, np.zeros((3, 2)), np.zeros((2, 2)), np.zeros(3))


def test_a_short_window_places_a_brief_visit_that_a_long_one_smears():
    frames, _ = sequence(seed=2, frames=40)
    rng = np.random.default_rng(5)
    site = 7
    for f in frames:  # only one site changes: state 1 for frames 20..22, then back
        state = np.zeros(len(f.site), dtype=int)
        state[f.site == site] = 1 if 20 <= f.frame_index < 23 else 0
        f.z = MEANS[state] + 0.12 * rng.standard_normal(f.z.shape)
    long_only = analyze_pathways(frames, window=8, seed=0)
    multi = analyze_pathways(frames, window=(2, 8), seed=0)
    # a long window alone sees the 3-frame visit diluted, its peaks off where the window edges meet it
    assert {e.step for e in long_only.events} != {20, 23}
    assert [(e.step, e.from_state, e.to_state) for e in multi.events] == [(20, 0, 1), (23, 1, 0)]
    assert multi.graph.counts[0, 1] == multi.graph.counts[1, 0] == 1


def _flat_sequence(frames: int = 60, noise: float = 0.12, seed: int = 7):
    """Every site in state 0 (``MEANS[0]`` plus noise); positions fixed."""
    rng = np.random.default_rng(seed)
    pos = lattice()
    zs = [MEANS[0] + noise * rng.standard_normal((len(pos), 2)) for _ in range(frames)]
    return pos, zs


def test_small_jumps_of_an_atom_and_its_neighbours_add_up_where_one_alone_does_not():
    pos, zs = _flat_sequence()
    centre = int(np.argmin(np.hypot(*(pos - pos.mean(0)).T)))
    d = np.hypot(*(pos - pos[centre]).T)
    around = np.flatnonzero(d < 1.6)  # the site and its three neighbours
    assert len(around) == 4
    lone = int(np.argmax(d))  # far away: one site alone
    for f in range(30, len(zs)):
        zs[f][around, 0] += 0.42  # ~7 noise units of a window-8 difference each: under DEFAULT_N_SIGMA alone
        zs[f][lone, 0] += 0.42
    frames = [LatentFrame(f, pos, z, np.zeros(len(pos)), dose_e_per_A2=1e4) for f, z in enumerate(zs)]
    res = analyze_pathways(frames, seed=0)
    assert len(res.groups) == 1
    g = res.groups[0]
    assert {e.step for e in g} == {30}
    assert all(np.hypot(*(np.array(e.position_A) - pos[centre])) < 1.6 for e in g)
    assert group_evidence(g) >= DEFAULT_N_SIGMA > max(e.score for e in g)
    # each jump on its own track must reach the threshold (the rule without group evidence): none does
    assert analyze_pathways(frames, seed=0, track_n_sigma=None).groups == []


def test_strongest_first_grouping_keeps_two_simultaneous_events_apart():
    def ev(track, x, score):
        return Event(track, 10, 10, (x, 0.0), 0.0, 0, 1, score, "jump")

    # two events 5 Å apart, echoes on neighbours in between: a chain 1.4 Å per link
    events = [ev(0, 0.0, 20.0), ev(1, 1.4, 8.0), ev(2, 2.8, 6.0), ev(3, 4.2, 8.0), ev(4, 5.6, 19.0)]
    assert len(group_events(events, radius_A=2.5, steps=1, linkage="transitive")) == 1
    groups = group_events(events, radius_A=3.0, steps=2)
    assert sorted(sorted(e.track for e in g) for g in groups) == [[0, 1, 2], [3, 4]]
    with pytest.raises(InputError, match="linkage"):
        group_events(events, linkage="single")


def test_noise_covariance_is_robust_to_rare_jumps():
    rng = np.random.default_rng(3)
    cov = np.array([[0.04, 0.03], [0.03, 0.09]])
    z = rng.multivariate_normal([0.0, 0.0], cov, size=(40, 100))  # 40 tracks x 100 frames
    z[:, 50:] += 5.0  # one big jump per track
    n = z.shape[0] * z.shape[1]
    traj = Trajectories(np.repeat(np.arange(40), 100), np.tile(np.arange(100), 40), np.tile(np.arange(100), 40), np.zeros((n, 2)),
                        z.reshape(-1, 2), np.zeros(n), np.zeros(n), np.full(n, -1), np.zeros(n, dtype=np.int64))
    est = latent_noise_cov(traj, 1)[0]
    assert est == pytest.approx(cov, rel=0.15, abs=0.004)
    # a jump against a strong correlation: far out in the noise's own units, small per dimension
    corr = np.array([[0.04, 0.036], [0.036, 0.04]])
    z = rng.multivariate_normal([0.0, 0.0], corr, size=(40, 100))
    z[0, 50:] += [0.3, -0.3]
    traj.z = z.reshape(-1, 2)
    full = latent_noise_cov(traj, 1)
    diag = np.sqrt(np.diagonal(full, axis1=1, axis2=2))
    found = detect_events(traj, window=4, n_sigma=6.0, sigma_z=full, use_states=False)
    assert [(e.track, e.step) for e in found] == [(0, 50)]
    assert detect_events(traj, window=4, n_sigma=6.0, sigma_z=diag, use_states=False) == []


def test_a_jump_in_the_first_frames_is_placed_where_it_is():
    pos, zs = _flat_sequence(frames=40)
    site = int(np.argmin(np.hypot(*(pos - pos.mean(0)).T)))
    for f in range(3):  # the site starts in state 1 and leaves it at frame 3
        zs[f][site] = MEANS[1] + 0.12 * np.random.default_rng(f).standard_normal(2)
    frames = [LatentFrame(f, pos, z, np.zeros(len(pos)), dose_e_per_A2=1e4) for f, z in enumerate(zs)]
    placed = analyze_pathways(frames, seed=0, edge_window=3)
    assert [e.step for e in placed.events] == [3]
    late = analyze_pathways(frames, seed=0, edge_window=None)
    assert [e.step for e in late.events] == [4]  # full windows only: no earlier than the window
    with pytest.raises(InputError, match="edge_window"):
        analyze_pathways(frames, seed=0, edge_window=0)


def _tracks(z: np.ndarray) -> Trajectories:
    """Trajectories of ``z`` ``(tracks, frames, k)``, one row per (track, frame), state 0."""
    t, f, k = z.shape
    n = t * f
    return Trajectories(np.repeat(np.arange(t), f), np.tile(np.arange(f), t), np.tile(np.arange(f), t), np.zeros((n, 2)),
                        z.reshape(n, k), np.zeros(n), np.zeros(n), np.full(n, -1), np.zeros(n, dtype=np.int64))


def test_window_noise_is_measured_where_the_latents_drift_slowly():
    rng = np.random.default_rng(11)
    white = 0.1 * rng.standard_normal((60, 100, 2))
    flat = window_noise_inflation(_tracks(white), [4, 8])
    assert flat[4] == pytest.approx(1.0, abs=0.12) and flat[8] == pytest.approx(1.0, abs=0.15)
    # a slow random walk on top of the frame noise: a long window's difference varies more than
    # independent frames would make it, and the more so the longer the window
    walk = white + np.cumsum(0.03 * rng.standard_normal((60, 100, 2)), axis=1)
    slow = window_noise_inflation(_tracks(walk), [4, 8])
    assert 1.3 < slow[4] < slow[8]
    # the scores shrink by the root of the factor (a covariance scales by it)
    walk[0, 50:] += 1.0
    traj = _tracks(walk)
    cov = latent_noise_cov(traj, 1)
    plain = {(e.track, e.step): e.score for e in detect_events(traj, window=8, n_sigma=5.0, sigma_z=cov, use_states=False)}
    scaled = {(e.track, e.step): e.score for e in detect_events(traj, window=8, n_sigma=5.0 / 2.0, sigma_z=cov, use_states=False,
                                                                 window_inflation={8: 4.0})}
    assert (0, 50) in plain
    assert scaled[(0, 50)] == pytest.approx(plain[(0, 50)] / 2.0, rel=1e-9)
