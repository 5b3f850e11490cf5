"""Motif clustering: the force-relaxed layout, HDBSCAN / GMM / robust clustering, label scoring."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.encoding.clustering import cluster_features, reduce_features, score_labels
from stemagent.encoding.layout import force_layout, knn_graph
from stemagent.errors import InputError


def two_populations(seed: int, n=(300, 60), d=12, gap=6.0) -> tuple[np.ndarray, np.ndarray]:
    """Two motif populations: the same noise, means ``gap`` noise widths apart along a random direction."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    x = rng.normal(size=(sum(n), d))
    x[n[0]:] += gap * direction
    y = np.repeat([0, 1], n)
    perm = rng.permutation(len(y))
    return x[perm] + 5.0, y[perm]


@pytest.mark.parametrize("method", ["layout", "gmm", "robust"])
def test_clustering_separates_two_synthetic_populations(method: str) -> None:
    x, y = two_populations(1)
    options = {"max_components": 4} if method == "gmm" else {}
    c = cluster_features(x, method, components=4, seed=0, **options)
    s = score_labels(c.labels, y, one_to_one=True)
    assert s.accuracy >= 0.98, (method, c.n_clusters, s.confusion)
    assert s.balanced >= 0.95


def test_clustering_does_not_split_one_population() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 10))
    for method, options in (("gmm", {"max_components": 4}), ("robust", {})):
        c = cluster_features(x, method, components=4, seed=0, **options)
        assert np.bincount(c.labels).max() >= 0.95 * len(x), method


def test_layout_is_seeded_and_pulls_populations_apart() -> None:
    x, y = two_populations(3)
    z = reduce_features(x, 4)
    a = force_layout(z, seed=5)
    b = force_layout(z, seed=5)
    np.testing.assert_array_equal(a, b)
    gap = np.linalg.norm(a[y == 0].mean(0) - a[y == 1].mean(0))
    spread = max(a[y == 0].std(0).max(), a[y == 1].std(0).max())
    assert gap > 4 * spread


def test_knn_graph_is_symmetric_with_weights_in_unit_interval() -> None:
    x, _ = two_populations(4, n=(50, 20))
    r, c, w = knn_graph(x, 6)
    pairs = dict(zip(zip(r.tolist(), c.tolist()), w.tolist()))
    assert all(abs(pairs[(j, i)] - v) < 1e-12 for (i, j), v in pairs.items())
    assert np.all((w > 0) & (w <= 1.0 + 1e-12))


def test_score_labels_many_to_one_and_one_to_one() -> None:
    truth = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([3, 3, 1, 1, 0, 0, 2, 2])  # class 0 split in two clusters
    m2o = score_labels(pred, truth)
    o2o = score_labels(pred, truth, one_to_one=True)
    assert m2o.accuracy == 1.0
    assert o2o.accuracy == 0.75 and o2o.per_class_recall[0] == 0.5
    assert o2o.balanced == pytest.approx((0.5 + 1 + 1) / 3)


def test_bad_features_are_refused() -> None:
    with pytest.raises(InputError, match="features"):
        reduce_features(np.array([[1.0, np.nan]]), 2)
    with pytest.raises(InputError, match="method"):
        cluster_features(np.ones((10, 3)), "kmeans")
    with pytest.raises(InputError, match="features.shape"):
        force_layout(np.ones((2, 3)))


def host_with_junk_and_defects(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Whitened features like a pool of U-Net atoms: 800 host atoms (unit noise), 10 odd detections
    40-80 noise widths out in one feature each, one dopant 12 out, nine vacancy neighbours and four
    dopant neighbours 7 out in their own directions. Classes 0-4 in that order."""
    rng = np.random.default_rng(seed)
    d = 4
    junk = 3.0 * rng.normal(size=(10, d))
    junk[np.arange(10), rng.integers(0, d, 10)] += rng.choice([-1.0, 1.0], 10) * rng.uniform(40, 80, 10)
    z = np.concatenate([rng.normal(size=(800, d)), junk,
                        np.array([[0.0, 0.0, 12.0, 0.0]]) + 0.5 * rng.normal(size=(1, d)),
                        np.array([0.0, 7.0, 0.0, 0.0]) + rng.normal(size=(9, d)),
                        np.array([0.0, 0.0, 0.0, 7.0]) + rng.normal(size=(4, d))])
    return z, np.repeat([0, 1, 2, 3, 4], [800, 10, 1, 9, 4])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_robust_keeps_a_lone_dopant_apart_when_far_junk_is_in_the_pool(seed: int) -> None:
    # one BIC split of all the far outliers spent its groups on the junk and left the dopant with
    # the vacancy and dopant neighbours in one group, which the library then took for host
    z, y = host_with_junk_and_defects(seed)
    lab = cluster_features(z, "robust", components=4, seed=0).labels
    dopant = lab[y == 2][0]
    assert np.sum(lab == dopant) == 1
    assert not np.isin(lab[y == 4], lab[y == 3]).any()
    assert np.bincount(lab).argmax() not in set(lab[y >= 2].tolist())


def test_robust_does_not_shatter_a_broad_cloud_of_odd_atoms() -> None:
    # a tenth of the atoms scattered 3-4 noise widths round the host, no groups among them: splitting
    # wide outlier groups again must not cut such a cloud into many small motifs
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 12))
    x[:400] += 3.0 * rng.normal(size=(400, 12))
    assert cluster_features(x, "robust", components=4, seed=0).n_clusters <= 3
