"""The encoding tests run torch on one thread: their tensors are small, and on a shared 2-core
machine a second OpenMP thread waiting for a busy core makes each small matmul take tens of ms."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
