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
