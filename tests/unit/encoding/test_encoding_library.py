"""The motif library keeps ids stable over a sequence of frames and grows on novelty."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.encoding.library import MotifLibrary
from stemagent.errors import InputError

MEANS = np.array([[0.0] * 6, [4.0, 0, 0, 0, 0, 0], [0, 0, -5.0, 0, 0, 2.0]])


def frame(rng: np.random.Generator, sizes: dict[int, int], drift: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of one frame with ``sizes[motif]`` atoms per true motif, the cluster ids a
    per-frame clustering would give (a random permutation of the motifs) and the true motifs."""
    truth = np.concatenate([np.full(n, k) for k, n in sizes.items()])
    x = MEANS[truth] + 0.3 * rng.normal(size=(len(truth), MEANS.shape[1])) + drift
    perm = rng.permutation(len(sizes))
    cid = {k: int(perm[i]) for i, k in enumerate(sizes)}
    clusters = np.asarray([cid[k] for k in truth])
    order = rng.permutation(len(truth))
    return x[order], clusters[order], truth[order]


def test_labels_stay_stable_over_a_sequence_and_the_library_grows_on_novelty() -> None:
    rng = np.random.default_rng(0)
    lib = MotifLibrary()
    seen: dict[int, int] = {}
    for i in range(8):
        sizes = {0: 200, 1: 40} if i < 4 else {0: 180, 1: 30, 2: 12}  # motif 2 appears at frame 4
        x, clusters, truth = frame(rng, sizes, drift=0.02 * i)
        upd = lib.update(x, clusters, frame_index=i)
        for k in np.unique(truth):
            ids = np.unique(upd.ids[truth == k])
            assert len(ids) == 1  # one id per true motif in every frame
            assert seen.setdefault(int(k), int(ids[0])) == int(ids[0])  # and the same id in every frame
        assert len(upd.new) == {0: 2, 4: 1}.get(i, 0)
    assert len(lib) == 3
    assert lib.motifs[seen[2]].first_frame == 4
    assert len(set(seen.values())) == 3


def test_an_over_split_frame_maps_both_clusters_to_one_motif() -> None:
    rng = np.random.default_rng(1)
    lib = MotifLibrary()
    x, clusters, truth = frame(rng, {0: 200, 1: 50})
    lib.update(x, clusters)
    x, clusters, truth = frame(rng, {0: 200, 1: 50})
    split = clusters.copy()
    host = truth == 0
    split[np.flatnonzero(host)[::2]] = 7  # the host was split in two clusters this time
    upd = lib.update(x, split, frame_index=1)
    assert len(np.unique(upd.ids[host])) == 1 and len(lib) == 2


def test_library_refuses_mismatched_features() -> None:
    lib = MotifLibrary()
    lib.update(np.zeros((5, 4)), np.zeros(5, dtype=int))
    with pytest.raises(InputError, match="features.shape"):
        lib.update(np.zeros((5, 3)), np.zeros(5, dtype=int))
    with pytest.raises(InputError, match="features"):
        lib.update(np.full((5, 4), np.nan), np.zeros(5, dtype=int))
    with pytest.raises(InputError, match="sigmas"):
        MotifLibrary(sigmas=0.0)


def test_a_motif_seen_once_is_retired_when_it_leaves_the_pool_and_a_recurring_one_stays() -> None:
    rng = np.random.default_rng(3)
    lib = MotifLibrary()
    host = rng.normal(size=(300, 6)) * 0.3
    odd = np.array([[0.0, 0, 0, 0, 30.0, 0]])  # one odd detection: founds a motif
    dopant = MEANS[1] + 0.3 * rng.normal(size=(1, 6))  # a lone dopant: founds one too
    upd = lib.update(np.concatenate([host, odd, dopant]), np.repeat([0, 1, 2], [300, 1, 1]), 0, replace=True)
    odd_id, dopant_id = int(upd.ids[300]), int(upd.ids[301])
    assert len(lib) == 3 and len(upd.new) == 3
    # the next pool: the odd detection is gone, three dopants are in it
    dopants = MEANS[1] + 0.3 * rng.normal(size=(3, 6))
    upd = lib.update(np.concatenate([host, dopants]), np.repeat([0, 1], [300, 3]), 1, replace=True)
    assert set(upd.ids[300:].tolist()) == {dopant_id}
    assert len(lib) == 2 and not lib.motifs[odd_id].active
    # the dopants leave the pool: the dopant motif was seen as 3 atoms, so it stays, and comes back with its id
    lib.update(host, np.zeros(300, dtype=int), 2, replace=True)
    assert len(lib) == 2
    upd = lib.update(np.concatenate([host, MEANS[1][None, :]]), np.repeat([0, 1], [300, 1]), 3, replace=True)
    assert int(upd.ids[300]) == dopant_id and not upd.new
    # an odd detection like the retired one founds a new id; the retired id is never reused
    upd = lib.update(np.concatenate([host, odd]), np.repeat([0, 1], [300, 1]), 4, replace=True)
    assert int(upd.ids[300]) not in (odd_id, dopant_id) and upd.new


def test_retired_motifs_do_not_count_towards_the_cap() -> None:
    lib = MotifLibrary(max_motifs=3)
    host = np.random.default_rng(4).normal(size=(200, 6)) * 0.3
    for i in range(5):  # five odd detections, one pool each, each gone by the next pool
        odd = np.zeros((1, 6))
        odd[0, i % 6] = 20.0 + 10.0 * i
        upd = lib.update(np.concatenate([host, odd]), np.repeat([0, 1], [200, 1]), i, replace=True)
        assert upd.new and int(upd.ids[200]) == len(lib.motifs) - 1  # a motif of its own, not merged by the cap
    assert len(lib) == 2 and len(lib.motifs) == 6
    with pytest.raises(InputError, match="min_members"):
        MotifLibrary(min_members=0)


def test_a_small_cluster_founds_its_motif_in_the_same_update_as_the_host() -> None:
    # the first update founds every motif: a cluster of 8 atoms 4 noise widths from the host founded in
    # that same update is new (4 > 6 / sqrt(8)); a prototype founded a moment earlier counts its atoms
    rng = np.random.default_rng(5)
    host = rng.normal(size=(300, 6))
    small = rng.normal(size=(8, 6)) * 0.5 + np.array([0, 0, 0, 4.0, 0, 0])
    upd = MotifLibrary().update(np.concatenate([host, small]), np.repeat([0, 1], [300, 8]), 0, replace=True)
    assert len(upd.new) == 2 and upd.ids[300] != upd.ids[0]
    # and a cluster of host atoms (half the host, labelled apart) joins the host's motif
    split = np.repeat([0, 1], [150, 150])
    upd = MotifLibrary().update(host, split, 0, replace=True)
    assert len(upd.new) == 1
