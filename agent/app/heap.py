"""The process's heap: keep freed memory for reuse instead of mapping large blocks afresh.

glibc's ``malloc`` serves each block above its mmap threshold (128 KiB at start, raised
adaptively) with a fresh ``mmap`` and unmaps it on ``free``; the next frame's arrays of the same
size are then faulted in page by page again. The frame path allocates and frees dozens of such
arrays per frame (the U-Net's activations, the Gaussian fit's ``(N, S, S)`` windows, ...): on
this VM ~6,000-10,000 minor page faults per 512 px U-Net ``find``, about a quarter of its CPU
time (BENCHMARKS.md, 2026-12-02). :func:`keep_freed_memory` raises the mmap threshold and the
trim threshold so blocks up to ``threshold_bytes`` come from the heap and freed ones stay there:
the process's memory then stays at its working set's peak instead of shrinking between frames.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("stemagent.agent")

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory(threshold_bytes: int = 64 * 2**20) -> bool:
    """Blocks up to ``threshold_bytes`` from the heap, freed memory kept up to twice that
    (glibc only; elsewhere nothing changes). True when glibc took both settings."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, int(threshold_bytes))) and bool(mallopt(M_TRIM_THRESHOLD, 2 * int(threshold_bytes)))
    if not ok:
        log.info("mallopt refused the heap thresholds (%d bytes): large blocks stay mapped one by one", threshold_bytes)
    return ok
