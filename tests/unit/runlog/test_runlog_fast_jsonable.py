"""The run log's fast conversion gives exactly what the element-by-element one gives, falling
back to it wherever ``json.dumps`` would write something else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stemagent.runlog.writer import _jsonable, fast_jsonable

CASES = [
    {"positions_A": np.random.default_rng(0).normal(size=(50, 2)), "classes": np.arange(50, dtype=np.int32),
     "conf": np.linspace(0, 1, 50, dtype=np.float32), "ok": np.bool_(True), "n": np.int64(3), "x": np.float32(0.1)},
    {"nested": {"1": [1, 2.5, (3, 4)], "deep": [{"a": np.float64(-0.0)}]}, "path": Path("/tmp/x"), "s": "é \"q\" \n"},
    {"nan": float("nan"), "inf": [np.inf, 1.0]},  # non-finite: strings, through the fallback
    {True: 1, None: 2, 3: "int key", 1.5: "float key"},  # keys json.dumps would write otherwise
    {np.int64(4): "numpy key"},
    {"big": 2**70, "tiny": 5e-324, "e": 1e16},
    {"true": 1},  # a plain key that looks like a bool key: slow path, same result
]


@pytest.mark.parametrize("value", CASES)
def test_fast_jsonable_equals_the_walk(value):
    fast, slow = fast_jsonable(value), _jsonable(value)
    assert fast == slow and repr(fast) == repr(slow)  # repr: -0.0 against 0.0, 1 against 1.0, key order


def test_objects_that_are_not_json_pass_as_the_walk_passes_them():
    obj = object()
    assert fast_jsonable({"o": obj}) == {"o": obj}
