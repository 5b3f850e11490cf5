"""Reading boundaries from atomic columns: registration, pointer classification, walking."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.boundaries.chain import BoundaryChain, ReducedParams
from stemagent.boundaries.config import BoundaryTraceConfig
from stemagent.boundaries.lattice import STEP_VECTORS, parse_word, word_name
from stemagent.boundaries.register import register_lattice
from stemagent.boundaries.trace import BoundaryTracer, select_columns
from stemagent.errors import InputError
from stemagent.simulators.boundary_film import grow_boundary
from stemagent.types import Atoms

A = 3.9


def _columns(boundaries: list[tuple[tuple[int, int], list[int]]], n: int = 32, angle: float = 0.12, noise: float = 0.02,
             delta: float = 0.3, seed: int = 0) -> np.ndarray:
    """Column positions of an n x n lattice (rotated, gently distorted, noisy) with boundaries."""
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ij = np.stack([i.ravel(), j.ravel()], axis=1)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    disp = np.zeros((len(ij), 2))
    for start, steps in boundaries:
        v = np.array(start)
        for s in steps:
            k = v[0] * n + v[1]
            if not disp[k].any():
                disp[k] = delta * STEP_VECTORS[s]
            v = v + STEP_VECTORS[s]
    xy = (ij * A + disp) @ rot.T
    xy += 0.4 * (ij[:, :1] / n) ** 2 * np.array([1.0, 0.3])  # slow scan distortion: 0.4 Å over the field
    return xy + rng.normal(0, noise, xy.shape)


def test_registration_finds_the_rotated_lattice_and_local_displacements() -> None:
    pts = _columns([((10, 10), list(parse_word("ENENNWWN")))])
    reg = register_lattice(pts)
    assert np.linalg.norm(reg.a1_A) == pytest.approx(A, abs=0.05)
    assert np.arctan2(reg.a1_A[1], reg.a1_A[0]) == pytest.approx(0.12, abs=0.01)
    assert reg.sigma_A == pytest.approx(0.02, rel=0.3)
    assert reg.indexed.all() and len({tuple(v) for v in reg.ij.tolist()}) == len(pts)
    with pytest.raises(InputError, match="at least 9"):
        register_lattice(pts[:5])


def test_tracer_reads_sampled_boundaries_exactly() -> None:
    chain = BoundaryChain.from_params(ReducedParams())
    rng = np.random.default_rng(4)
    truth = []
    for lo in ((1, 1), (1, 17), (17, 1), (17, 17)):
        def inside(i: int, j: int, lo: tuple[int, int] = lo) -> bool:
            return lo[0] <= i < lo[0] + 14 and lo[1] <= j < lo[1] + 14
        while True:
            steps, stop = grow_boundary(chain, (lo[0] + 6, lo[1] + 6), inside, rng, 200)
            if stop != "rejected" and len(steps) >= 6:
                break
        truth.append(((lo[0] + 6, lo[1] + 6), steps))
    res = BoundaryTracer().trace_columns(_columns(truth))
    assert res.delta_A == pytest.approx(0.3, abs=0.02)
    read = sorted(word_name(t.steps) for t in res.traces)
    assert read == sorted(word_name(s) for _, s in truth)
    for t in res.traces:
        assert t.stop in ("end", "self")
        assert np.all(t.step_confidence > 0.99) and len(t.motifs) == len(t) - 1
        assert t.motif_confidence.shape == (len(t) - 1,)


def test_a_closed_chain_is_read_as_a_cycle_with_an_uncertain_start() -> None:
    loop = list(parse_word("EENNWWSS"))  # a 2x2 square: every column points at the next
    res = BoundaryTracer().trace_columns(_columns([((12, 12), loop)]))
    assert len(res.traces) == 1
    t = res.traces[0]
    assert t.stop == "cycle" and len(t) == 8
    assert t.step_confidence[0] == pytest.approx(0.5 * t.step_confidence[1], rel=0.01)


def test_no_boundaries_in_a_clean_lattice_and_column_selection() -> None:
    res = BoundaryTracer().trace_columns(_columns([]))
    assert res.traces == [] and np.all(res.pointer == -1)
    atoms = Atoms(positions_A=np.zeros((4, 2)), classes=np.array([0, 1, 0, 1]), confidence=np.ones(4), frame_index=0,
                  class_names=("A", "B"))
    assert select_columns(atoms, None, BoundaryTraceConfig()).tolist() == [0, 2]
    plain = Atoms(positions_A=np.zeros((6, 2)), classes=np.zeros(6), confidence=np.ones(6), frame_index=0, class_names=("atom", "x"))
    bright = select_columns(plain, np.array([1.0, 50.0, 1.2, 55.0, 0.9, 60.0]), BoundaryTraceConfig(column_class="A"))
    assert bright.tolist() == [1, 3, 5]
    with pytest.raises(InputError, match="no intensities"):
        select_columns(plain, None, BoundaryTraceConfig())
