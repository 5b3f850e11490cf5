"""The heap setting the CLI makes at start (glibc's mmap and trim thresholds)."""

import ctypes
import resource
import sys

import numpy as np
import pytest

from stemagent.agent.app import heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    assert heap.keep_freed_memory(64 * 2**20) is True
    # blocks of many sizes below the threshold, freed and asked for again: served from the heap,
    # so touching them again faults (almost) no page in
    sizes = [(1 + k % 7) * 2**20 for k in range(40)]
    for n in sizes[:7]:
        np.ones(n // 8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for n in sizes:
        np.ones(n // 8)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 200  # 40 fresh mappings of 1-7 MiB would fault in ~40,000 pages


def test_an_allocator_without_mallopt_is_left_alone(monkeypatch):
    def no_libc(name):
        raise OSError("no such library")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert heap.keep_freed_memory() is False
