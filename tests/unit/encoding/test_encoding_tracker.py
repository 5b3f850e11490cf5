"""The motif tracker's recluster budget: unexplained atoms are counted over frames, a recluster
needs enough of them and a gap of frames since the last one, and labels stay those of the
classifier on reclustered frames too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stemagent.encoding.config import EncodingConfig, PipelineEncodingConfig
from stemagent.encoding.stage import EncodingStage
from stemagent.encoding.tracker import MotifTracker, refine_labels
from stemagent.errors import InputError

HOST = np.zeros(6)
OTHER = np.array([6.0, 0, 0, 0, 0, 0])
NEW = np.array([0, 0, -9.0, 0, 0, 4.0])  # a motif no pool has seen


def atoms(rng: np.random.Generator, host: int, other: int = 30, new: int = 0) -> np.ndarray:
    x = np.concatenate([np.tile(HOST, (host, 1)), np.tile(OTHER, (other, 1)), np.tile(NEW, (new, 1))])
    return x + 0.3 * rng.normal(size=x.shape)


def tracker(**kw: object) -> MotifTracker:
    return MotifTracker("robust", 3, {"min_cluster_size": 3}, pool_size=2000, recluster_every=0, **kw)  # type: ignore[arg-type]


def test_the_old_rule_reclusters_on_the_first_unexplained_atom() -> None:
    rng = np.random.default_rng(0)
    t = tracker()
    assert t.process(atoms(rng, 300), 0).reclustered
    res = t.process(atoms(rng, 300, new=2), 1)
    assert res.reclustered and res.novel.sum() == 2


def test_unexplained_atoms_are_counted_over_frames_before_a_recluster() -> None:
    rng = np.random.default_rng(1)
    t = tracker(min_unexplained=6)
    t.process(atoms(rng, 300), 0)
    host_id = int(np.bincount(t.process(atoms(rng, 300), 1).ids).argmax())
    flags = []
    for i in range(2, 6):
        res = t.process(atoms(rng, 300, new=2), i)  # 2 unexplained atoms a frame: 2, 4, 6 -> recluster
        flags.append(res.reclustered)
        if not any(flags):
            assert res.novel.sum() == 2
            assert set(res.ids[res.novel].tolist()) <= set(t.classifier.ids.tolist())  # nearest motif, never -1
            assert np.all(res.ids[:300] == host_id)
    assert flags == [False, False, True, False]
    assert t.unexplained_since == 0
    # the rare motif's atoms of the three frames were kept in the pool: the recluster founded it
    assert not res.novel.any() and len(t.library) >= 3
    other_id = int(np.bincount(res.ids[300:330]).argmax())
    new_ids = set(res.ids[330:].tolist())
    assert len(new_ids) == 1 and not new_ids & {host_id, other_id}


def test_a_frame_budget_holds_reclusters_apart_and_a_large_share_triggers_alone() -> None:
    rng = np.random.default_rng(2)
    t = tracker(min_unexplained=1000, min_unexplained_fraction=0.05, min_frames_between=4)
    t.process(atoms(rng, 300), 0)
    seen = [t.process(atoms(rng, 270, new=40), i).reclustered for i in range(1, 6)]  # 40 of 340 atoms are new
    assert seen == [False, False, False, True, False]  # the 4th frame after the first recluster: budget spent
    assert len(t.library) >= 3


def test_a_reclustered_frame_is_labelled_by_the_refitted_classifier() -> None:
    rng = np.random.default_rng(3)
    t = tracker(relabel=True)
    t.process(atoms(rng, 300), 0)
    x = atoms(rng, 300, new=5)
    res = t.process(x, 1)
    assert res.reclustered
    expected = t.classifier.ids[np.argmin(t.classifier.distances2(x), axis=1)]
    assert np.array_equal(res.ids, expected)


@pytest.mark.parametrize(("field", "value"), [("min_unexplained", 0), ("min_unexplained_fraction", 1.5),
                                              ("min_frames_between", -1)])
def test_bad_budget_values_are_named(field: str, value: float) -> None:
    with pytest.raises(InputError, match=field):
        tracker(**{field: value})
    with pytest.raises(ValueError, match=field):
        PipelineEncodingConfig(**{field: value})


def test_the_pipeline_defaults_budget_reclusters_and_the_library_keeps_the_old_rule() -> None:
    lib, pipe = EncodingConfig(), PipelineEncodingConfig()
    assert (lib.min_unexplained, lib.min_frames_between, lib.relabel, lib.num_threads) == (1, 0, False, None)
    assert pipe.min_unexplained > 1 and pipe.min_frames_between > 1 and pipe.relabel and pipe.num_threads == 1


def test_the_stage_runs_on_its_threads_and_restores_torch_s(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    stage = EncodingStage(PipelineEncodingConfig())
    monkeypatch.setattr(stage, "_process", lambda frame, atoms: seen.append(torch.get_num_threads()) or {})
    torch.set_num_threads(2)
    stage.process(None, None)  # type: ignore[arg-type]
    assert seen == [1] and torch.get_num_threads() == 2


def test_refinement_moves_a_hard_boundary_to_where_the_densities_cross() -> None:
    rng = np.random.default_rng(7)
    # a host of 2000 and a defect of 100, 3.5 noise widths apart along the first feature
    x = np.concatenate([rng.normal(size=(2000, 3)), rng.normal(size=(100, 3)) + np.array([3.5, 0, 0])])
    truth = np.r_[np.zeros(2000, dtype=int), np.ones(100, dtype=int)]
    hard = (x[:, 0] > 4.0).astype(np.int64)  # an outlier rule far out: a third of the defect
    refined = refine_labels(x, hard, 3, 5)
    assert np.mean(refined[truth == 1] == 1) > np.mean(hard[truth == 1] == 1) + 0.15
    assert np.mean(refined == truth) > np.mean(hard == truth)
    assert set(np.unique(refined)) <= {0, 1}
    np.testing.assert_array_equal(refine_labels(x, hard, 3, 0), hard)  # 0 rounds: unchanged
    with pytest.raises(InputError, match="refine_iterations"):
        tracker(refine_iterations=-1)


def _novel_stream(t: MotifTracker, seed: int, frames: int = 7) -> list:
    """Frame 0 founds the classifier; frames 1.. carry 40 atoms of a motif no pool has seen."""
    rng = np.random.default_rng(seed)
    out = [t.process(atoms(rng, 300), 0)]
    out += [t.process(atoms(rng, 300, new=40), i) for i in range(1, frames)]
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_background_recluster_is_adopted_exactly_k_frames_after_it_started(k: int) -> None:
    t = tracker(min_unexplained=10, min_frames_between=0, relabel=True, adopt_after_frames=k)
    rng = np.random.default_rng(4)
    first = t.process(atoms(rng, 300), 0)
    assert first.reclustered and not first.recluster_started  # the first recluster founds the classifier on its frame
    before = len(t.library)
    started, adopted, sizes = [], [], []
    for i in range(1, 7):
        res = t.process(atoms(rng, 300, new=40), i)
        started += [i] if res.recluster_started else []
        adopted += [i] if res.reclustered else []
        sizes.append(len(t.library))
    t.close()
    assert started == [1] and adopted == [1 + k]  # by frames, never by timing
    # the library the frame path sees changes only on the adopting frame: the new motif is founded there
    assert sizes[: k] == [before] * k and sizes[k] > before
    assert t.unexplained_since == 0  # unexplained atoms are counted again from the adoption


def test_a_background_recluster_founds_what_the_frame_path_recluster_founds() -> None:
    # the same pool snapshot and library: the adopted library equals the one reclustered on the frame
    sync = tracker(min_unexplained=10, min_frames_between=0, relabel=True)
    back = tracker(min_unexplained=10, min_frames_between=0, relabel=True, adopt_after_frames=2)
    s, b = _novel_stream(sync, 5, 4), _novel_stream(back, 5, 4)
    back.close()
    assert [r.reclustered for r in s] == [True, True, False, False]
    assert [r.reclustered for r in b] == [True, False, False, True] and b[1].recluster_started
    assert len(sync.library) == len(back.library) >= 3
    for m, n in zip(sync.library.motifs, back.library.motifs):
        np.testing.assert_array_equal(m.centroid, n.centroid)
        assert (m.id, m.count, m.first_frame) == (n.id, n.count, n.first_frame)
    np.testing.assert_array_equal(sync.classifier.means, back.classifier.means)
    # and from frame 3 on both label the new motif's atoms alike
    assert np.array_equal(s[3].ids, b[3].ids)


def test_bad_adoption_lag_is_named() -> None:
    with pytest.raises(InputError, match="recluster_adopt_after_frames"):
        tracker(adopt_after_frames=-1)
    with pytest.raises(ValueError, match="recluster_adopt_after_frames"):
        PipelineEncodingConfig(recluster_adopt_after_frames=-1)
    assert EncodingConfig().recluster_adopt_after_frames == 0 and PipelineEncodingConfig().recluster_adopt_after_frames == 2
